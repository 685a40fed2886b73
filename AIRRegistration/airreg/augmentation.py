"""Training-time intensity augmentation that leaves the geometry alone.

Each case of a batch gets one draw per modality — gamma, a smooth multiplicative bias field, in-plane blur,
Gaussian noise, and for the MR only a contrast inversion (``1 - x``: T2 and T1-like contrasts swap the order of
most tissues) — applied to its whole volume. The draw is made once per case per batch, so the aligned pair, G's
estimate and every misaligned pair that D sees from one case share the same intensities, and D can only tell
them apart by alignment. Voxels are only remapped in place: masks, landmarks, ground truth and perturbations are
untouched. TRUS voxels outside the fan (exactly 0) stay 0.

Inputs are normalised to [0, 1] (:mod:`airreg.intensity`); outputs are clipped to [0, 1]. Draws come from the
batch's seeded generator for the global batch, so they do not depend on the number of processes and resume
exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class AugmentSpec:
    """Ranges of the draws: ``log_gamma`` ± (gamma in [e^-x, e^x]), bias field log-amplitude, noise std (0..1
    scale), blend towards an in-plane blur (0..1), probability of inverting the MR contrast."""

    log_gamma: float = 0.4
    bias: float = 0.3
    noise: float = 0.04
    blur: float = 1.0
    invert_mr: float = 0.2


@dataclass
class AugmentDraw:
    """Per-case parameters (first dimension: the batch) for one modality."""

    gamma: torch.Tensor  # (B,)
    bias: torch.Tensor  # (B, 6): coefficients of x, y, z, x^2, y^2, z^2 in the log bias field
    noise: torch.Tensor  # (B,)
    blur: torch.Tensor  # (B,)
    invert: torch.Tensor  # (B,) bool
    noise_seed: int

    def select(self, index: slice) -> AugmentDraw:
        """The draws of a contiguous share of the batch (one rank's)."""
        fields = (self.gamma, self.bias, self.noise, self.blur, self.invert)
        return AugmentDraw(*(f[index] for f in fields), self.noise_seed + (index.start or 0))


def draw(gen: torch.Generator, n: int, spec: AugmentSpec, invertible: bool) -> AugmentDraw:
    """Draw ``n`` cases' parameters from ``gen`` (CPU); ``invertible``: whether contrast inversion may be drawn."""
    gamma = torch.exp((torch.rand(n, generator=gen) * 2 - 1) * spec.log_gamma)
    bias = (torch.rand(n, 6, generator=gen) * 2 - 1) * spec.bias
    noise = torch.rand(n, generator=gen) * spec.noise
    blur = torch.rand(n, generator=gen) * spec.blur
    invert = torch.rand(n, generator=gen) < (spec.invert_mr if invertible else 0.0)
    noise_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    return AugmentDraw(gamma, bias, noise, blur, invert, noise_seed)


def _bias_field(coeffs: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, 1, D, H, W) multiplicative field ``exp(sum c_k t_k)`` over coordinates in [-1, 1]."""
    device = coeffs.device
    z, y, x = (torch.linspace(-1, 1, n, device=device) for n in shape)
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    terms = (x, y, z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3)
    c = coeffs[:, :, None, None, None]
    log_field = sum(c[:, k] * terms[k] for k in range(len(terms)))
    return torch.exp(log_field)[:, None]


def _blur_in_plane(volume: torch.Tensor) -> torch.Tensor:
    """A [1, 2, 1]/4 binomial blur along H and W of (B, 1, D, H, W) (edges replicated)."""
    kernel = torch.tensor([0.25, 0.5, 0.25], device=volume.device, dtype=volume.dtype)
    b, c, d, h, w = volume.shape
    flat = volume.reshape(b * c * d, 1, h, w)
    flat = F.conv2d(F.pad(flat, (1, 1, 0, 0), mode="replicate"), kernel.view(1, 1, 1, 3))
    flat = F.conv2d(F.pad(flat, (0, 0, 1, 1), mode="replicate"), kernel.view(1, 1, 3, 1))
    return flat.reshape(b, c, d, h, w)


def apply(volume: torch.Tensor, params: AugmentDraw, fan: bool) -> torch.Tensor:
    """Augmented copy of (B, 1, D, H, W) or (B, D, H, W) intensities in [0, 1]; ``fan``: keep zeros at zero."""
    squeeze = volume.dim() == 4
    x = volume[:, None] if squeeze else volume
    device = x.device
    shape = (-1, 1, 1, 1, 1)
    inside = x > 0
    blur = params.blur.to(device).view(shape)
    x = (1 - blur) * x + blur * _blur_in_plane(x)
    x = torch.where(params.invert.to(device).view(shape), 1 - x, x)
    x = x.clamp(0, 1) ** params.gamma.to(device).view(shape)
    x = x * _bias_field(params.bias.to(device), tuple(x.shape[2:]))
    noise = torch.stack(  # one generator per case: the same noise whatever share of the batch a rank holds
        [
            torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(params.noise_seed + i))
            for i in range(len(x))
        ]
    ).to(device)
    x = (x + params.noise.to(device).view(shape) * noise).clamp(0, 1)
    if fan:
        x = torch.where(inside, x, torch.zeros_like(x))
    return x[:, 0] if squeeze else x
