"""From a pair of images to what the networks see, identically in training and at inference.

1. Intensities: each volume is normalised once with :class:`~airreg.intensity.NormalizationSpec` (percentiles of
   the whole volume; only the voxels that the sampling below reads are scaled).
2. MR: sampled onto the network grid (a box in MR space, MR axes, centred on the MR volume) -> (S, H, W).
3. TRUS: sampled once, through a start transform (the ground truth in training, the initial transform at
   inference), onto a *cache grid*: the same frame as the network grid but wider, so that every perturbation or
   estimate can later be applied by sampling the cache through a rigid matrix in the frame (the spatial
   transformer) without touching the original file again.

The same two-stage sampling is used in training and at inference, so a model sees TRUS with the same
interpolation history in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from . import geometry, resampling
from .errors import InputError
from .geometry import orthonormalized, to_world
from .intensity import NormalizationSpec, scale
from .resampling import GridSpec

#: In-plane spacing of the cache grid relative to the network grid; finer keeps the double interpolation sharp.
CACHE_OVERSAMPLING = 1.25
#: Margin (mm) around the network grid that the cache covers, for in-plane rotation and translation.
CACHE_MARGIN_MM = 12.0
#: Above this many voxels read per grid point, sampling reads each point's 8 neighbours instead of scaling the
#: whole footprint (measured on this project's CPU: the break-even is near 5-10).
GATHER_RATIO = 10


def cache_spec(grid: GridSpec, dof: int) -> GridSpec:
    """The TRUS cache grid for a network grid: covers the grid under ±25° rotations and ±5 mm shifts.

    3-DOF moves points only in-plane, so the cache keeps the grid's slices; 6-DOF tilts the grid, so the cache
    also extends and samples finely along the slice normal.
    """
    spacing = grid.spacing[1] / CACHE_OVERSAMPLING
    half_diagonal = math.hypot(*grid.extent_mm[:2]) / 2
    n_plane = int(math.ceil(2 * (half_diagonal + CACHE_MARGIN_MM) / spacing)) + 1
    if dof == 3:
        return GridSpec((grid.size[0], n_plane, n_plane), (grid.spacing[0], spacing, spacing))
    z_spacing = min(grid.spacing[0], 2 * spacing)
    z_extent = grid.extent_mm[2] + 2 * (half_diagonal * math.sin(math.radians(30)) + CACHE_MARGIN_MM)
    return GridSpec(
        (int(math.ceil(z_extent / z_spacing)) + 1, n_plane, n_plane), (z_spacing, spacing, spacing)
    )


@dataclass
class PreparedPair:
    """One MR-TRUS pair ready for the networks.

    ``mr``: (S, H, W) on the network grid; ``trus_cache``: (Zc, Yc, Xc) on the cache grid, TRUS brought into
    MR space through ``start`` (MR->TRUS LPS); ``frame``: the grid's ``frame_to_world``.
    """

    mr: torch.Tensor
    trus_cache: torch.Tensor
    frame: np.ndarray
    start: np.ndarray


def normalized_stack(
    image: sitk.Image,
    spec: NormalizationSpec,
    modality: str,
    volume_from_frame: np.ndarray,
    grid: GridSpec,
    device,
    what: str,
) -> torch.Tensor:
    """(S, H, W) float32: an image normalised with ``spec`` and sampled on ``grid`` (``volume_from_frame``: frame mm
    to voxel index).

    The percentiles are the whole volume's, but only the voxels the samples can read are scaled (the
    :func:`~airreg.resampling.footprint`, or for a large volume only each sample's 8 neighbours): the same values
    as scaling the whole volume first, at a cost that follows the grid rather than the file.
    """
    array = sitk.GetArrayViewFromImage(image)
    low, high = spec.intensity_range(array, modality, what)
    index_map = volume_from_frame @ grid.index_to_frame()
    box = resampling.footprint(index_map, grid, array.shape)
    if box is None:
        return torch.zeros(grid.size, device=device)
    if math.prod(s.stop - s.start for s in box) > GATHER_RATIO * math.prod(grid.size):
        stack = resampling.sample_points(array, index_map, grid, lambda v: scale(v, low, high, what))
        return torch.from_numpy(stack).to(device)
    crop = torch.from_numpy(scale(array[box], low, high, what))[None, None].to(device)
    to_crop = geometry.homogeneous(np.eye(3), [-box[2].start, -box[1].start, -box[0].start])
    return resampling.sample(crop, torch.as_tensor(to_crop @ volume_from_frame), grid)[0]


def prepare_pair(
    mr: sitk.Image,
    trus: sitk.Image,
    start: np.ndarray,
    grid: GridSpec,
    dof: int,
    normalization: NormalizationSpec,
    device: torch.device | str = "cpu",
    center_mm=None,
) -> PreparedPair:
    """Normalise and sample an MR-TRUS pair (see module docstring). Raises InputError if they do not overlap."""
    frame = resampling.mr_frame(mr, center_mm)
    mr_to_grid = resampling.grid_to_volume(resampling.index_to_world(mr), np.eye(4), frame)
    mr_stack = normalized_stack(mr, normalization, "mr", mr_to_grid, grid, device, "MR image")
    trus_to_cache = resampling.grid_to_volume(resampling.index_to_world(trus), start, frame)
    cache = cache_spec(grid, dof)
    trus_cache = normalized_stack(trus, normalization, "trus", trus_to_cache, cache, device, "TRUS image")
    if not bool((trus_cache > 0).any()):
        raise InputError("the TRUS volume does not overlap the MR field of view under the start transform")
    return PreparedPair(mr_stack, trus_cache, frame, np.asarray(start, dtype=float))


def cache_to_index(grid: GridSpec, dof: int) -> np.ndarray:
    """4x4 ``L`` mapping frame mm to cache voxel indices (for :func:`resampling.sample` on the cache)."""
    return np.linalg.inv(cache_spec(grid, dof).index_to_frame())


def sample_trus(
    trus_cache: torch.Tensor, grid: GridSpec, dof: int, transform_in_frame: torch.Tensor | None
) -> torch.Tensor:
    """Sample (B, 1, Zc, Yc, Xc) TRUS caches onto the network grid through (B, 4, 4) frame transforms."""
    lmat = torch.as_tensor(cache_to_index(grid, dof), device=trus_cache.device)
    return resampling.sample(trus_cache, lmat, grid, transform_in_frame)


def frame_transform_to_world(pair: PreparedPair, transform_in_frame: np.ndarray) -> np.ndarray:
    """MR->TRUS LPS matrix of ``start ∘ (frame transform)``: where an estimate in the grid frame lands."""
    return orthonormalized(pair.start @ to_world(np.asarray(transform_in_frame, dtype=float), pair.frame))
