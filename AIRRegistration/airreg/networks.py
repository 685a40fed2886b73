"""The generator (G) and discriminator (D) of AIR-net (Yan et al., MLMI 2018, section 2.1).

Both share one body, applied to the MR and TRUS stacks concatenated along channels (slices are channels, so each
3D pair is a multi-channel 2D image):

    3x3 conv, ``width`` filters, dilation 2, ReLU
    -> two 3x3 convs, stride 2, ReLU
    -> residual block of three 3x3 convs with a skip connection, ReLU
    -> 1x1 conv to 8 channels, ReLU -> flatten -> FC 256, ReLU -> FC head

G's head has one output per transform parameter (3 for the paper's axial experiment, 6 for 3D rigid) and starts at
the identity transform (zero weights and bias), so an untrained G leaves the TRUS where it is. D's head has one
output: the raw critic value that the Wasserstein loss sees; ``sigmoid`` of its calibrated value is the D-score.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .errors import ModelError


class ResidualBlock(nn.Module):
    """Three 3x3 convolutions with an identity skip connection (He et al., 2016)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class AirBody(nn.Module):
    """Shared feature extractor; maps (B, 2*slices, H, W) to a (B, 256) feature vector."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        w = config.width
        slices, rows, cols = config.grid.size
        self.features = nn.Sequential(
            nn.Conv2d(2 * slices, w, 3, padding=2, dilation=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            ResidualBlock(w),
            nn.Conv2d(w, config.bottleneck, 1),
            nn.ReLU(inplace=True),
        )
        flat = config.bottleneck * _halved_twice(rows) * _halved_twice(cols)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(flat, config.hidden), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _halved_twice(n: int) -> int:
    """Spatial size after two stride-2, padding-1, 3x3 convolutions."""
    for _ in range(2):
        n = (n - 1) // 2 + 1
    return n


def pair_input(mr: torch.Tensor, trus: torch.Tensor) -> torch.Tensor:
    """Concatenate (B, S, H, W) MR and TRUS stacks into the (B, 2S, H, W) "two-channel" network input."""
    return torch.cat([mr, trus], dim=1)


class Generator(nn.Module):
    """Estimates the rigid parameters that align TRUS to MR, in the grid frame (degrees, mm).

    Outputs are scaled by ``config.parameter_scale`` so the last layer works with values of order one.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.body = AirBody(config)
        self.head = nn.Linear(config.hidden, config.dof)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer(
            "scale", torch.tensor(config.parameter_scale, dtype=torch.float32), persistent=False
        )

    def forward(self, mr: torch.Tensor, trus: torch.Tensor) -> torch.Tensor:
        """(B, S, H, W) x 2 -> (B, dof) parameters ordered as ``geometry.PARAMETER_NAMES[dof]``."""
        return self.head(self.body(pair_input(mr, trus))) * self.scale


class Discriminator(nn.Module):
    """The critic: a higher value means a better aligned MR-TRUS pair."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.body = AirBody(config)
        self.head = nn.Linear(config.hidden, 1)

    def forward(self, mr: torch.Tensor, trus: torch.Tensor) -> torch.Tensor:
        """(B, S, H, W) x 2 -> (B,) raw critic values."""
        return self.head(self.body(pair_input(mr, trus)))[:, 0]


def parameter_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def load_weights(net: nn.Module, weights: dict, what: str) -> nn.Module:
    """``net`` with ``weights`` loaded, in eval mode; a ModelError saying ``what`` does not match otherwise."""
    try:
        net.load_state_dict(weights)
    except (RuntimeError, KeyError) as exc:
        raise ModelError(what) from exc
    return net.eval()
