"""Batched, differentiable resampling of volumes onto the network grid (the spatial transformer).

This is the only module that calls ``affine_grid`` / ``grid_sample``. Conventions:

* A volume tensor has shape (B, 1, Z, Y, X): index order (k, j, i) as SimpleITK's ``GetArrayFromImage``.
* Geometric matrices are 4x4 and act on column vectors of *voxel indices* ``(i, j, k, 1)`` (x fastest), or on
  LPS millimetres; names say which (``index_to_world``, ``grid_to_volume``).
* The network grid is a box in MR space: axes = the MR's canonical axes (:func:`canonical_axes`: chosen from
  physical facts, never from how the file orders its voxels), origin = the grid centre,
  ``size = (slices, rows, cols)`` and ``spacing = (slice, row, col)`` in mm; the slice axis is the MR's coarse axis. Slices become channels: the output
  of :func:`sample` has shape (B, slices, rows, cols), the paper's multi-channel 2D image.
* ``align_corners=True``: voxel centres of the first and last index map to -1 and +1, so a voxel index maps to
  normalised coordinates by ``u = 2 i / (n - 1) - 1``; points outside the volume read 0 (zeros padding).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import geometry


@dataclass(frozen=True)
class GridSpec:
    """The network's sampling grid, in the frame of the MR volume (see module docstring)."""

    size: tuple[int, int, int] = (16, 48, 48)
    spacing: tuple[float, float, float] = (3.0, 1.6, 1.6)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        if any(v < 2 for v in self.size) or any(v <= 0 for v in self.spacing):
            raise ValueError(f"GridSpec: size must be >= 2 and spacing > 0, got {self.size}, {self.spacing}")

    @property
    def extent_mm(self) -> np.ndarray:
        """Extent (x, y, z) in mm between the first and last voxel centres."""
        return (np.array(self.size[::-1]) - 1) * np.array(self.spacing[::-1])

    def index_to_frame(self) -> np.ndarray:
        """4x4 mapping a grid index (i=col, j=row, k=slice) to frame mm, with the grid centre at 0."""
        spacing_xyz = np.array(self.spacing[::-1])
        return geometry.homogeneous(np.diag(spacing_xyz), -self.extent_mm / 2)

    def to_dict(self) -> dict:
        return asdict(self)


def index_to_world(image: sitk.Image) -> np.ndarray:
    """4x4 mapping a voxel index (i, j, k) of a SimpleITK image to LPS mm."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    return geometry.homogeneous(direction * spacing, image.GetOrigin())


def physical_center(image: sitk.Image) -> np.ndarray:
    """LPS centre of an image's voxel box (midway between the first and last voxel centres)."""
    return geometry.apply(index_to_world(image), (np.asarray(image.GetSize(), dtype=float) - 1) / 2)


#: MR axes whose spacing is within this factor of the coarsest are "equally coarse" (a near-isotropic MR): the
#: slice axis is then the one of them closest to inferior-superior.
SLICE_SPACING_RATIO = 1.2


def canonical_axes(image: sitk.Image) -> np.ndarray:
    """3x3 rotation whose columns are the network frame's (x, y, slice) axes in LPS, from physical facts only.

    The same anatomy stored with its voxel axes in any order or direction gives the same axes (up to float
    rounding), so the network sees the same stacks. Rules, in order:

    * slice axis: the coarsest voxel axis; among axes within :data:`SLICE_SPACING_RATIO` of the coarsest, the
      one closest to inferior-superior; its sign makes its largest LPS component positive;
    * in-plane: of the four signed orders of the two other axes that make a right-handed frame, the one
      closest to LPS (largest trace).

    An axial MR stored as ITK writes it (direction near the identity) keeps its own axes: the frame that the
    bundled models were trained with. The direction is orthonormalised (SVD) first, so that tiny rounding in
    the file does not make the frame non-rigid.
    """
    u, _, vt = np.linalg.svd(np.asarray(image.GetDirection(), dtype=float).reshape(3, 3))
    axes = u @ vt
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    coarse = np.flatnonzero(spacing * SLICE_SPACING_RATIO >= spacing.max())
    k = int(coarse[np.argmax(np.abs(axes[2, coarse]))])
    normal = axes[:, k] * _sign_of_largest(axes[:, k])
    i, j = (a for a in range(3) if a != k)
    candidates = [
        np.column_stack([si * axes[:, a], sj * axes[:, b], normal])
        for a, b in ((i, j), (j, i))
        for si in (1.0, -1.0)
        for sj in (1.0, -1.0)
    ]
    return max((c for c in candidates if np.linalg.det(c) > 0), key=np.trace)


def _sign_of_largest(vector: np.ndarray) -> float:
    """+1 or -1: the sign of the vector's largest component (the first, where two tie to 1e-9)."""
    magnitude = np.abs(vector)
    first = int(np.flatnonzero(magnitude >= magnitude.max() - 1e-9)[0])
    return 1.0 if vector[first] > 0 else -1.0


def mr_frame(mr: sitk.Image, center_mm=None) -> np.ndarray:
    """``frame_to_world`` of the network grid: the MR's :func:`canonical_axes`, origin at ``center_mm`` (default:
    the MR centre)."""
    center = physical_center(mr) if center_mm is None else np.asarray(center_mm, dtype=float)
    return geometry.frame(canonical_axes(mr), center)


def grid_to_volume(
    volume_index_to_world: np.ndarray, mr_to_volume: np.ndarray, frame_to_world: np.ndarray
) -> np.ndarray:
    """4x4 ``L`` with ``volume_index = L @ frame_mm``: frame mm -> MR world -> volume world -> volume index.

    The full sampling map of a grid index is ``L @ M @ spec.index_to_frame()``, where ``M`` is a transform
    estimated in the grid frame (identity for the start position).
    """
    return np.linalg.inv(volume_index_to_world) @ mr_to_volume @ frame_to_world


def footprint(index_map: np.ndarray, spec: GridSpec, shape_zyx) -> tuple[slice, slice, slice] | None:
    """(z, y, x) slices of the voxels that trilinear samples at every grid point can read, or None if none.

    ``index_map`` maps a grid index (i, j, k) to a voxel index of a volume of array shape ``shape_zyx``. The box
    holds both neighbours of every sample along each axis, one voxel of margin against float32 rounding, and at
    least 2 voxels per axis where the volume has them (``grid_sample`` reads a 1-voxel axis at its only voxel).
    Sampling the box with the map shifted by its start gives what sampling the whole volume gives.
    """
    corners = np.array(list(np.ndindex(2, 2, 2)), dtype=float) * (np.array(spec.size[::-1]) - 1)
    points = geometry.apply(index_map, corners)
    boxes = []
    for axis, n in enumerate(np.asarray(shape_zyx)[::-1]):  # x, y, z
        lo = max(0, int(np.floor(points[:, axis].min())) - 1)
        hi = min(int(n), int(np.floor(points[:, axis].max())) + 3)
        if lo >= hi:
            return None
        if hi - lo < 2:
            hi = min(int(n), lo + 2)
            lo = max(0, hi - 2)
        boxes.append(slice(lo, hi))
    return boxes[2], boxes[1], boxes[0]


def sample_points(array: np.ndarray, index_map: np.ndarray, spec: GridSpec, transfer) -> np.ndarray:
    """(S, H, W) float32: trilinear samples of ``transfer(voxels)`` at the grid points, reading only the 8 voxels
    around each point.

    The values of :func:`sample` on ``transfer(array)`` (zeros outside, ``align_corners``), at a cost that follows
    the grid and not the volume: for a large volume of which the grid reads a small share.

    Args:
        array: (Z, Y, X) voxels (any real dtype, read-only is fine).
        index_map: 4x4 mapping a grid index (i, j, k) to a voxel index of ``array``.
        spec: the grid.
        transfer: maps an array of voxel values to float32 (e.g. the intensity normalisation).
    """
    flat = np.asarray(array).reshape(-1)
    m = np.asarray(index_map, dtype=np.float32)
    grid = [np.arange(n, dtype=np.float32) for n in spec.size[::-1]]  # i, j, k
    shapes = [(1, 1, -1), (1, -1, 1), (-1, 1, 1)]
    strides = (1, array.shape[2], array.shape[2] * array.shape[1])
    corners = []  # per axis: ((index, weight) of the lower neighbour, (index, weight) of the upper)
    for axis, n in enumerate(array.shape[::-1]):
        coord = m[axis, 3] + sum(m[axis, a] * grid[a].reshape(shapes[a]) for a in range(3))  # (S, H, W)
        below = np.floor(coord)
        frac = coord - below
        below = below.astype(np.int64)
        pair = []
        for index, weight in ((below, 1.0 - frac), (below + 1, frac)):
            inside = (index >= 0) & (index < n)
            pair.append((np.clip(index, 0, n - 1) * strides[axis], np.where(inside, weight, np.float32(0))))
        corners.append(pair)
    indices, weights = [], []
    for cx, cy, cz in itertools.product(*corners):
        indices.append(cx[0] + cy[0] + cz[0])
        weights.append(cx[1] * cy[1] * cz[1])
    # each point's 8 neighbours side by side: a cache line of the volume is fetched once per point, not per corner
    values = transfer(flat.take(np.stack(indices, axis=-1)))  # (S, H, W, 8)
    return np.einsum("...c,...c->...", np.stack(weights, axis=-1), values, dtype=np.float32)


def _index_to_normalized(size_xyz) -> torch.Tensor:
    """4x4 mapping voxel indices (i, j, k) to ``grid_sample``'s normalised coordinates (align_corners=True)."""
    n = torch.as_tensor(size_xyz, dtype=torch.float64)
    scale = 2.0 / torch.clamp(n - 1, min=1)
    m = torch.eye(4, dtype=torch.float64)
    m[:3, :3] = torch.diag(scale)
    m[:3, 3] = -1.0
    return m


def sample(
    volume: torch.Tensor,
    grid_to_volume_mm: torch.Tensor,
    spec: GridSpec,
    transform_in_frame: torch.Tensor | None = None,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Sample volumes onto the network grid through an optional (differentiable) transform in the grid frame.

    Args:
        volume: (B, 1, Z, Y, X) or (1, 1, Z, Y, X) broadcast over the batch; any float dtype.
        grid_to_volume_mm: (B, 4, 4) or (4, 4) matrices ``L`` from :func:`grid_to_volume`.
        spec: the output grid.
        transform_in_frame: (B, 4, 4) rigid matrices ``M`` in the grid frame (e.g. from
            :func:`rigid_matrices`), or None for the identity. Gradients flow through it.
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"``.

    Returns:
        (B, slices, rows, cols) in ``volume``'s dtype: slices as channels.
    """
    device, dtype = volume.device, volume.dtype
    lmat = torch.as_tensor(grid_to_volume_mm, device=device, dtype=torch.float32)
    if lmat.ndim == 2:
        lmat = lmat.unsqueeze(0)
    batch = max(
        volume.shape[0], lmat.shape[0], 1 if transform_in_frame is None else transform_in_frame.shape[0]
    )
    grid_index = torch.as_tensor(spec.index_to_frame(), device=device, dtype=torch.float32)
    full = lmat @ grid_index if transform_in_frame is None else lmat @ transform_in_frame.float() @ grid_index
    to_norm = _index_to_normalized(volume.shape[-3:][::-1]).to(device=device, dtype=torch.float32)
    from_norm = torch.linalg.inv(_index_to_normalized(spec.size[::-1])).to(device=device, dtype=torch.float32)
    theta = (to_norm @ full @ from_norm)[:, :3, :].expand(batch, 3, 4)
    coords = affine_grid(theta, spec.size)
    vol = volume.expand(batch, *volume.shape[1:]) if volume.shape[0] == 1 else volume
    out = F.grid_sample(vol, coords.to(dtype), mode=mode, padding_mode="zeros", align_corners=True)
    return out[:, 0]  # (B, D, H, W)


def affine_grid(theta: torch.Tensor, size) -> torch.Tensor:
    """``F.affine_grid(theta, (B, 1, *size), align_corners=True)`` by broadcasting: 4x faster on a CPU (one thread).

    Args:
        theta: (B, 3, 4) maps normalised output coordinates (x, y, z, 1) to normalised input coordinates.
        size: (D, H, W) of the output grid.

    Returns:
        (B, D, H, W, 3), the last axis (x, y, z) as ``grid_sample`` wants. Differentiable in ``theta``.
    """
    d, h, w = size
    axes = [torch.linspace(-1.0, 1.0, n, device=theta.device, dtype=theta.dtype) for n in (w, h, d)]
    x = theta[:, None, None, None, :, 0] * axes[0][None, None, None, :, None]  # (B, 1, 1, W, 3)
    y = theta[:, None, None, None, :, 1] * axes[1][None, None, :, None, None]  # (B, 1, H, 1, 3)
    z = theta[:, None, None, None, :, 2] * axes[2][None, :, None, None, None]  # (B, D, 1, 1, 3)
    return (z + theta[:, None, None, None, :, 3]) + y + x


def rigid_matrices(params: torch.Tensor, dof: int) -> torch.Tensor:
    """(B, 4, 4) rigid matrices from (B, dof) parameters, as ``geometry.RigidTransform.from_vector`` (centre 0).

    3-DOF: (γ° about z, tx, ty); 6-DOF: (α°, β°, γ°, tx, ty, tz) with ``R = Rz Ry Rx``.
    """
    b = params.shape[0]
    zeros = params.new_zeros(b)
    if dof == 3:
        angles = torch.stack([zeros, zeros, params[:, 0]], dim=1)
        trans = torch.stack([params[:, 1], params[:, 2], zeros], dim=1)
    elif dof == 6:
        angles, trans = params[:, :3], params[:, 3:]
    else:
        raise ValueError(f"dof must be 3 or 6, got {dof}")
    a, bt, g = torch.deg2rad(angles).unbind(1)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), bt.cos(), bt.sin(), g.cos(), g.sin()
    rot = torch.stack(
        [
            torch.stack([cg * cb, cg * sb * sa - sg * ca, cg * sb * ca + sg * sa], 1),
            torch.stack([sg * cb, sg * sb * sa + cg * ca, sg * sb * ca - cg * sa], 1),
            torch.stack([-sb, cb * sa, cb * ca], 1),
        ],
        1,
    )
    top = torch.cat([rot, trans.unsqueeze(2)], dim=2)
    bottom = params.new_tensor([0.0, 0.0, 0.0, 1.0]).expand(b, 1, 4)
    return torch.cat([top, bottom], dim=1)


def matrix_params(matrices: torch.Tensor, dof: int) -> torch.Tensor:
    """(B, dof) parameters of (B, 4, 4) rigid matrices; inverse of :func:`rigid_matrices` (|β| < 90°)."""
    r, t = matrices[:, :3, :3], matrices[:, :3, 3]
    gamma = torch.rad2deg(torch.atan2(r[:, 1, 0], r[:, 0, 0]))
    if dof == 3:
        return torch.stack([gamma, t[:, 0], t[:, 1]], dim=1)
    alpha = torch.rad2deg(torch.atan2(r[:, 2, 1], r[:, 2, 2]))
    beta = torch.rad2deg(torch.asin(torch.clamp(-r[:, 2, 0], -1.0, 1.0)))
    return torch.cat([torch.stack([alpha, beta, gamma], dim=1), t], dim=1)


def invert_rigid(matrices: torch.Tensor) -> torch.Tensor:
    """Exact inverse of (B, 4, 4) rigid matrices."""
    rt = matrices[:, :3, :3].transpose(1, 2)
    out = torch.zeros_like(matrices)
    out[:, :3, :3] = rt
    out[:, :3, 3] = -(rt @ matrices[:, :3, 3:4])[..., 0]
    out[:, 3, 3] = 1.0
    return out


def image_tensor(image: sitk.Image, device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """(1, 1, Z, Y, X) tensor of a SimpleITK image's voxels."""
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    return torch.from_numpy(array)[None, None].to(device=device, dtype=dtype)
