"""How the discriminator judges one alignment: the statistic behind the D-score.

A WGAN critic is trained on ``mean D(fake) - mean D(real)``, in which every case appears on both sides: a constant
added to all of one case's scores changes nothing, so raw critic values carry a case-specific offset that a
calibration across cases cannot remove. Two statistics are computed, and training's calibration keeps the one
that separates TRE > 5 mm better on the validation cases (stored in the checkpoint):

* ``critic`` — the raw critic value of the alignment;
* ``contrast`` — the critic value of the alignment minus the mean critic value of small probe displacements
  around it (±4 mm along each axis the model estimates, ±8° about each rotation axis). The case offset cancels;
  a correct alignment is a local peak of the critic, so the contrast is high there and falls with the error.

A critic refined to rank alignments across cases (``airreg refine-critic``) has no such offset; its calibration
usually keeps ``critic``, and then no probe is evaluated at inference.
"""

from __future__ import annotations

import torch

from . import resampling
from .resampling import GridSpec

STATISTICS = ("critic", "contrast")
PROBE_SHIFT_MM = 4.0
PROBE_ROTATION_DEG = 8.0


def probe_matrices(dof: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(K, 4, 4) probe displacements in the grid frame: ±shift per translation axis, ±rotation per angle."""
    n_rot = 1 if dof == 3 else 3
    params = []
    for axis in range(dof):
        for sign in (1.0, -1.0):
            p = [0.0] * dof
            p[axis] = sign * (PROBE_ROTATION_DEG if axis < n_rot else PROBE_SHIFT_MM)
            params.append(p)
    return resampling.rigid_matrices(torch.tensor(params, device=device), dof)


@torch.no_grad()
def judge(
    critic: torch.nn.Module,
    mr: torch.Tensor,
    trus_volume: torch.Tensor,
    volume_from_frame: torch.Tensor,
    transforms: torch.Tensor,
    grid: GridSpec,
    dof: int,
    statistics: tuple[str, ...] = STATISTICS,
) -> dict[str, torch.Tensor]:
    """The named statistics (default: both) for (B, 4, 4) frame transforms; the probes only for ``contrast``.

    Args:
        critic: the discriminator D.
        mr: (B, S, H, W) MR stacks.
        trus_volume: (B, 1, Z, Y, X) TRUS volumes (caches, or stacks treated as volumes).
        volume_from_frame: 4x4 mapping frame mm to the volume's voxel indices.
        transforms: (B, 4, 4) alignments to judge, in the grid frame.

    Returns:
        ``{name: (B,)}`` for each name in ``statistics``.
    """
    unknown = set(statistics) - set(STATISTICS)
    if unknown:
        raise ValueError(f"unknown D statistics {sorted(unknown)}; choose from {STATISTICS}")
    raw = critic(mr, resampling.sample(trus_volume, volume_from_frame, grid, transforms))
    if "contrast" not in statistics:
        return {"critic": raw}
    probes = probe_matrices(dof, transforms.device)
    k, b = len(probes), transforms.shape[0]
    one_volume = trus_volume.shape[0] == 1 or trus_volume.stride(0) == 0
    if one_volume and torch.as_tensor(volume_from_frame).ndim == 2:  # registration: every probe in one pass
        moved = (transforms[None] @ probes[:, None]).reshape(k * b, 4, 4)
        stacks = resampling.sample(trus_volume[:1], volume_from_frame, grid, moved)
        around = critic(mr.repeat(k, 1, 1, 1), stacks).reshape(k, b)
    else:  # one probe at a time: the volumes are sampled in place, never copied per probe
        around = torch.stack(
            [
                critic(mr, resampling.sample(trus_volume, volume_from_frame, grid, transforms @ p))
                for p in probes
            ]
        )
    return {
        name: value
        for name, value in (("critic", raw), ("contrast", raw - around.mean(dim=0)))
        if name in statistics
    }
