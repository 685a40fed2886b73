"""The ``synth`` phantom family: label-driven MR/TRUS pairs with heavy domain randomisation.

Built another way than :mod:`airreg.phantom` (the ``classic`` family), in the spirit of SynthMorph (Hoffmann et
al., IEEE TMI 2022): the anatomy is one label map made of level sets of smooth random fields, and each modality
gets a random intensity per label. The gland is a randomly deformed ellipsoid (a smooth field added to its
quadratic form) split into a transition zone and a peripheral zone the same way; lesions are field-perturbed balls
inside it, calcifications small balls; background structures are the argmax of several smooth random fields
(between 4 and 12 of them), with a bladder, bony or gas reflectors and the rectum around the probe on top.

The label grid is isotropic (1 mm) and its axes are the MR's, so the MR's slice profile is a filter along one
array axis. MR: random per-label contrast (half the cases keep a T2-like order), texture, blur, a bias field
drawn as a smooth random field, Rician noise and a gamma; in-plane spacing 0.3-0.9 mm, slices 1-4 mm, random
field of view and oblique slice direction. TRUS: a transrectal fan of random width, radius and depth; per-label
echogenicity, scatterer density, impedance and attenuation; speckle whose size follows the probe frequency
(times a random factor); a time-gain curve drawn per depth band, so attenuation is not compensated exactly;
shadows behind calcifications and reflectors; log compression. Probe pressure (``deform=True``) is a radial push
out from the probe axis, strongest in front of the probe.

Frames, files and ground truth are those of :mod:`airreg.phantom`: ``gt`` maps MR LPS points to TRUS LPS points,
``SimpleITK.Resample(trus, mr, geometry.to_sitk(gt))`` puts the TRUS on the MR grid, and with ``deform=True`` the
TRUS masks and landmarks follow the push, ``gt`` being the rigid part. :class:`SynthKnobs` lists the ranges.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from . import geometry
from .phantom import (
    PhantomCase,
    _fan_mask,
    _image,
    _jsonable,
    _polar_axes,
    _probe_to_world,
    _sample_labels,
    _scan_convert,
    _seed_sequence,
    _TRUSGeometry,
)

# label values of the anatomy map; background structures take BACKGROUND, BACKGROUND + 1, ...
LUMEN, WALL, PERIPHERAL, TRANSITION, LESION, CALCIFICATION, BLADDER, REFLECTOR, BACKGROUND = range(1, 10)
GLAND_LABELS = (PERIPHERAL, TRANSITION, LESION, CALCIFICATION)
_GRID_MM = 1.0  # spacing of the label grid


@dataclass(frozen=True)
class SynthKnobs:
    """Ranges ``(low, high)`` of the family's random draws (mm, degrees, MHz, dB); each case draws uniformly."""

    gland_volume_ml: tuple[float, float] = (20.0, 80.0)
    gland_irregularity: tuple[float, float] = (
        0.05,
        0.3,
    )  # amplitude of the field added to the quadratic form
    background_structures: tuple[int, int] = (4, 12)
    structure_scale_mm: tuple[float, float] = (12.0, 40.0)
    mr_inplane_mm: tuple[float, float] = (0.3, 0.9)
    mr_slice_mm: tuple[float, float] = (1.0, 4.0)
    mr_fov_mm: tuple[float, float] = (80.0, 160.0)
    mr_oblique_deg: tuple[float, float] = (
        -30.0,
        30.0,
    )  # about the left-right axis; a third of it about the others
    mr_blur_mm: tuple[float, float] = (0.0, 1.0)
    mr_bias: tuple[float, float] = (0.0, 0.4)  # std of the log bias field
    mr_noise: tuple[float, float] = (0.01, 0.06)  # relative to the brightest label
    mr_gamma: tuple[float, float] = (0.7, 1.4)
    probe_radius_mm: tuple[float, float] = (8.0, 12.0)
    fan_half_angle_deg: tuple[float, float] = (35.0, 75.0)
    fan_depth_mm: tuple[float, float] = (50.0, 90.0)
    trus_spacing_mm: tuple[float, float] = (0.6, 0.9)
    frequency_mhz: tuple[float, float] = (5.0, 10.0)
    speckle_scale: tuple[float, float] = (0.7, 1.5)
    attenuation_db_cm_mhz: tuple[float, float] = (0.3, 1.2)
    tgc_error_db: tuple[float, float] = (0.0, 8.0)  # std of the time-gain curve's error per depth band
    dynamic_range_db: tuple[float, float] = (40.0, 65.0)
    push_mm: tuple[float, float] = (1.0, 3.0)
    gt_rotation_deg: tuple[float, float, float] = (10.0, 10.0, 30.0)  # +- about x, y, z
    gt_translation_mm: float = 10.0  # +- along each axis


KNOBS = SynthKnobs()


def _draw(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


# --- smooth random fields ---------------------------------------------------------------------------------------


def _upsample_linear(coarse: np.ndarray, shape: tuple[int, ...], step: float) -> np.ndarray:
    """Separable linear interpolation of samples spaced ``step`` output voxels apart onto ``shape``."""
    out = coarse
    for axis in reversed(range(len(shape))):  # the last pass gathers whole slabs: the cheap order
        n = shape[axis]
        position = np.arange(n, dtype=np.float32) / np.float32(step)
        low = np.minimum(position.astype(int), out.shape[axis] - 2)
        weight = (position - low).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = np.take(out, low, axis=axis) * (1 - weight) + np.take(out, low + 1, axis=axis) * weight
    return out.astype(np.float32)


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], scale_mm: float, spacing_mm: float
) -> np.ndarray:
    """Random field with unit standard deviation, smooth over about ``scale_mm``, on a grid of ``spacing_mm``.

    White noise on a lattice a quarter of the scale apart is Gaussian-smoothed there and interpolated linearly:
    the cost is a few passes over the output, not a convolution at full resolution.
    """
    step = max(scale_mm / 4 / spacing_mm, 1.0)
    coarse_shape = tuple(int(np.ceil((n - 1) / step)) + 2 for n in shape)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), 1.5, mode="wrap")
    coarse /= max(float(coarse.std()), 1e-6)
    return _upsample_linear(coarse, shape, step)


# --- grids ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """A voxel grid: ``index_to_world`` maps (i, j, k) to LPS mm; arrays are (z, y, x) of ``shape``."""

    index_to_world: np.ndarray
    shape: tuple[int, int, int]

    def coords(self, affine: np.ndarray) -> list[np.ndarray]:
        """Broadcastable (z, y, x) arrays of ``affine @ world(i, j, k)``, one per row of the 3x4 or 4x4 ``affine``."""
        m = (affine @ self.index_to_world).astype(np.float32)
        i, j, k = (np.arange(n, dtype=np.float32) for n in self.shape[::-1])
        return [
            (m[c, 0] * i)[None, None, :]
            + (m[c, 1] * j)[None, :, None]
            + (m[c, 2] * k + m[c, 3])[:, None, None]
            for c in range(3)
        ]

    def world_points(self, index_zyx: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm of (N, 3) voxel indices in (z, y, x) order."""
        return geometry.apply(self.index_to_world, np.asarray(index_zyx, dtype=float)[:, ::-1])


@dataclass(frozen=True)
class _MRGeometry:
    grid: _Grid
    spacing: np.ndarray  # (x, y, z) mm
    direction: np.ndarray  # columns: the voxel axes in LPS
    fov_drawn: float  # mm; the grid's is larger when the gland needs it


def _draw_gland(rng: np.random.Generator, knobs: SynthKnobs) -> dict:
    """Centre (LPS mm), semi-axes (mm), orientation and irregularity of the gland."""
    volume = float(np.exp(rng.uniform(*np.log(knobs.gland_volume_ml))))
    dims = np.array([45.0, 30.0, 35.0]) * rng.uniform(0.8, 1.2, 3)
    dims *= (volume * 1000 / (np.pi / 6 * dims.prod())) ** (1 / 3)
    return {
        "center": rng.uniform(-40, 40, 3),
        "radii": dims / 2,
        "rotation": geometry.rotation_matrix(rng.uniform(-20, 20, 3) * [1, 0.5, 0.5]),
        "irregularity": _draw(rng, knobs.gland_irregularity),
        "posterior_flattening": rng.uniform(1.0, 1.5),
        "volume_drawn_ml": volume,
    }


def _draw_mr(rng: np.random.Generator, knobs: SynthKnobs, gland: dict) -> _MRGeometry:
    """An MR grid covering the gland: random spacing, field of view, slab and oblique direction.

    In-plane spacing finer than ``0.75 - 0.15 * slice`` mm is only drawn with thick slices (as in clinical T2
    protocols: thin slices come with near-isotropic voxels), which keeps volumes to a few million voxels; the
    field of view and the slab grow beyond the drawn ones when the gland would not fit.
    """
    s_z = _draw(rng, knobs.mr_slice_mm)
    low, high = knobs.mr_inplane_mm
    s_xy = rng.uniform(min(max(low, 0.75 - 0.15 * s_z), high), high)
    fov = _draw(rng, knobs.mr_fov_mm)
    tilt = _draw(rng, knobs.mr_oblique_deg)
    direction = geometry.rotation_matrix([tilt, tilt / 3 * rng.uniform(-1, 1), tilt / 3 * rng.uniform(-1, 1)])
    in_plane = max(_reach(gland, direction[:, 0]), _reach(gland, direction[:, 1]))
    n = max(int(np.clip(round(fov / s_xy), 96, 320)), int(np.ceil((2 * in_plane + 30) / s_xy)))
    nz = max(12, round((2 * _reach(gland, direction[:, 2]) + 8 + rng.uniform(10, 40)) / s_z))
    spacing = np.array([s_xy, s_xy, s_z])
    centre_index = (np.array([n, n, nz]) - 1) / 2 + rng.uniform(-10, 10, 3) / spacing * [1, 1, 0.3]
    origin = gland["center"] - direction @ (spacing * centre_index)
    index_to_world = geometry.homogeneous(direction @ np.diag(spacing), origin)
    return _MRGeometry(_Grid(index_to_world, (nz, n, n)), spacing, direction, fov)


def _extent(gland: dict, direction: np.ndarray) -> float:
    """Half-extent (mm) of the gland's ellipsoid along a unit direction."""
    return float(np.linalg.norm(gland["radii"] * (gland["rotation"].T @ direction)))


def _reach(gland: dict, direction: np.ndarray) -> float:
    """A bound (mm) on the irregular gland's half-extent: the field (unit std) rarely goes below -3, where the
    level ``|q|^2 + a f < 1`` reaches ``|q| = sqrt(1 + 3a)``."""
    return _extent(gland, direction) * float(np.sqrt(1 + 3 * gland["irregularity"]))


def _draw_probe(rng: np.random.Generator, knobs: SynthKnobs, gland: dict) -> tuple[np.ndarray, dict]:
    """Probe frame -> LPS (x lateral, y depth towards the gland, z along the probe) and the rectum around it."""
    radius = _draw(rng, knobs.probe_radius_mm)
    axis = geometry.rotation_matrix(rng.uniform(-15, 15, 3) * [1, 0.5, 0]) @ [0.0, 0.0, 1.0]
    posterior = np.array([0.0, 1.0, 0.0])
    gap = rng.uniform(0.0, 4.0)
    wall = rng.uniform(2.0, 5.0)
    offset = _extent(gland, posterior) + gap + wall + radius
    origin = gland["center"] + posterior * offset + rng.uniform(-4, 4, 3) * [1, 0, 0]
    depth = -posterior - axis * np.dot(-posterior, axis)
    depth /= np.linalg.norm(depth)
    roll = np.deg2rad(rng.uniform(-12, 12))
    depth = np.cos(roll) * depth + np.sin(roll) * np.cross(axis, depth)
    probe = geometry.homogeneous(np.column_stack([np.cross(depth, axis), depth, axis]), origin)
    return probe, {"radius_mm": radius, "wall_mm": wall, "gap_mm": gap}


def _draw_fan(rng: np.random.Generator, knobs: SynthKnobs, gland: dict, probe: np.ndarray, radius: float):
    """The TRUS grid and fan (probe coordinates): wide and deep enough for the gland, capped at 4 M voxels."""
    centre = geometry.apply(geometry.invert(probe), gland["center"])
    lateral = abs(centre[0]) + _reach(gland, probe[:3, 0]) + 3
    low, high = np.deg2rad(knobs.fan_half_angle_deg)
    half_angle = rng.uniform(min(max(low, np.arctan2(lateral, centre[1])), high), high)
    needed = centre[1] + _reach(gland, probe[:3, 1]) + 8
    r_max = max(_draw(rng, knobs.fan_depth_mm), needed)
    spacing = _draw(rng, knobs.trus_spacing_mm)
    half_width = r_max * np.sin(min(half_angle, np.pi / 2)) + 2
    y0 = radius * np.cos(half_angle) - 2
    length = 2 * _reach(gland, probe[:3, 2]) + rng.uniform(20, 40)
    box = np.array([2 * half_width, r_max - y0, length])
    spacing = max(spacing, float(np.cbrt(box.prod() / 4e6)))
    size = tuple(int(round(b / spacing)) + 1 for b in box)
    origin = np.array([-half_width, y0, centre[2] - length / 2 + rng.uniform(-5, 5)])
    return _TRUSGeometry(origin, spacing, size, radius, r_max, half_angle)


def _anatomy_grid(mr: _MRGeometry, trus: _TRUSGeometry, probe: np.ndarray, margin: float) -> _Grid:
    """The 1 mm label grid, axes along the MR's, covering the MR volume and the TRUS volume (plus a margin)."""
    nz, ny, nx = mr.grid.shape
    corners = [[a, b, c] for a in (0, nx - 1) for b in (0, ny - 1) for c in (0, nz - 1)]
    points = [geometry.apply(mr.grid.index_to_world, np.array(corners, dtype=float))]
    tx, ty, tz = (s - 1 for s in trus.size)
    t_corners = np.array([[a, b, c] for a in (0, tx) for b in (0, ty) for c in (0, tz)], dtype=float)
    points.append(geometry.apply(probe @ trus.index_to_probe(), t_corners))
    aligned = np.concatenate(points) @ mr.direction  # coordinates along the MR axes
    low, high = aligned.min(axis=0) - margin, aligned.max(axis=0) + margin
    shape = np.ceil((high - low) / _GRID_MM).astype(int) + 1
    index_to_world = geometry.homogeneous(mr.direction * _GRID_MM, mr.direction @ low)
    return _Grid(index_to_world, tuple(int(s) for s in shape[::-1]))


# --- the label map ----------------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, knobs: SynthKnobs, grid: _Grid) -> tuple[np.ndarray, int]:
    """Argmax of J smooth random fields: labels BACKGROUND .. BACKGROUND + J - 1 (uint8)."""
    count = int(rng.integers(knobs.background_structures[0], knobs.background_structures[1] + 1))
    best = np.full(grid.shape, -np.inf, dtype=np.float32)
    labels = np.full(grid.shape, BACKGROUND, dtype=np.uint8)
    for j in range(count):
        field = _smooth_field(rng, grid.shape, _draw(rng, knobs.structure_scale_mm), _GRID_MM)
        better = field > best
        labels[better] = BACKGROUND + j
        np.maximum(best, field, out=best)
    return labels, count


def _ellipsoid_level(grid: _Grid, center, radii, rotation) -> np.ndarray:
    """``|R^T (p - c) / radii|^2`` on the grid (float32)."""
    to_local = np.diag(1.0 / np.asarray(radii)) @ np.asarray(rotation).T
    affine = geometry.homogeneous(to_local, -to_local @ np.asarray(center))
    q = grid.coords(affine)
    return q[0] * q[0] + q[1] * q[1] + q[2] * q[2]


def _gland_level(rng: np.random.Generator, grid: _Grid, gland: dict) -> np.ndarray:
    """Level function of the gland (< 1 inside): a flattened-posterior ellipsoid plus a smooth random field."""
    r = gland["rotation"]
    to_local = np.diag(1.0 / gland["radii"]) @ r.T
    q = grid.coords(geometry.homogeneous(to_local, -to_local @ gland["center"]))
    posterior = np.where(q[1] > 0, np.float32(gland["posterior_flattening"]), np.float32(1.0))
    level = q[0] * q[0] + (q[1] * posterior) ** 2 + q[2] * q[2]
    field = _smooth_field(rng, grid.shape, 20.0, _GRID_MM)
    return level + np.float32(gland["irregularity"]) * field


def _paint_reflectors(rng: np.random.Generator, labels: np.ndarray, grid: _Grid, gland: dict) -> int:
    """0-3 bony or gas blobs anterior or lateral to the gland (strong reflectors that shadow in TRUS)."""
    count = int(rng.integers(0, 4))
    for _ in range(count):
        direction = np.array([rng.uniform(-1, 1), rng.uniform(-1, -0.2), rng.uniform(-0.5, 0.5)])
        direction /= np.linalg.norm(direction)
        center = gland["center"] + direction * (_extent(gland, direction) + rng.uniform(12, 30))
        level = _ellipsoid_level(
            grid, center, rng.uniform(4, 12, 3), geometry.rotation_matrix(rng.uniform(-45, 45, 3))
        )
        labels[level < 1] = REFLECTOR
    return count


def _paint_bladder(rng: np.random.Generator, labels: np.ndarray, grid: _Grid, gland: dict) -> bool:
    """A fluid-filled bladder above the gland's base, in four cases of five."""
    if rng.random() >= 0.8:
        return False
    radii = rng.uniform([25, 20, 15], [45, 35, 35])
    up = gland["rotation"][:, 2]
    center = gland["center"] + up * (_extent(gland, up) + 0.7 * radii[2]) + [0, -rng.uniform(0, 10), 0]
    level = _ellipsoid_level(grid, center, radii, np.eye(3))
    labels[level + 0.15 * _smooth_field(rng, grid.shape, 30.0, _GRID_MM) < 1] = BLADDER
    return True


def _paint_gland(rng: np.random.Generator, labels: np.ndarray, grid: _Grid, gland: dict) -> np.ndarray:
    """Peripheral and transition zones; returns the gland's boolean mask on the grid."""
    inside = _gland_level(rng, grid, gland) < 1
    labels[inside] = PERIPHERAL
    scale = rng.uniform(0.45, 0.8)
    centre = gland["center"] + gland["rotation"] @ (gland["radii"] * [0, -0.15, 0.1])
    tz_radii = gland["radii"] * scale * rng.uniform(0.85, 1.15, 3)
    level = _ellipsoid_level(grid, centre, tz_radii, gland["rotation"])
    level += np.float32(0.2) * _smooth_field(rng, grid.shape, 10.0, _GRID_MM)
    labels[inside & (level < 1)] = TRANSITION
    return inside


def _paint_rectum(labels: np.ndarray, grid: _Grid, probe: np.ndarray, rectum: dict) -> None:
    """Lumen (the probe) and wall: distances from the probe axis below the radius, and the wall beyond it."""
    x, y, _ = grid.coords(geometry.invert(probe))
    distance = np.sqrt(x * x + y * y)
    labels[distance < rectum["radius_mm"] + rectum["wall_mm"]] = WALL
    labels[distance < rectum["radius_mm"]] = LUMEN


def _paint_blobs(
    rng: np.random.Generator, labels: np.ndarray, grid: _Grid, kind: int, count: int, size
) -> list:
    """Field-perturbed balls of label ``kind`` centred on random gland voxels; their centroids (LPS mm)."""
    centroids = []
    for _ in range(count):
        candidates = np.flatnonzero(np.isin(labels, (PERIPHERAL, TRANSITION)).ravel())
        if len(candidates) == 0:
            break
        centre = np.array(np.unravel_index(rng.choice(candidates), labels.shape))
        radius = rng.uniform(*size)
        half = int(np.ceil(1.6 * radius / _GRID_MM)) + 1
        lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, labels.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        zz, yy, xx = np.meshgrid(
            *(np.arange(a, b) - c for a, b, c in zip(lo, hi, centre, strict=True)), indexing="ij"
        )
        level = (zz * zz + yy * yy + xx * xx) * (_GRID_MM / radius) ** 2
        bumps = ndimage.gaussian_filter(rng.standard_normal(level.shape), 1.5)
        level += 0.3 * bumps / max(float(bumps.std()), 1e-6)
        sub = labels[box]
        painted = (level < 1) & np.isin(sub, GLAND_LABELS)
        if painted.sum() < 4:
            continue
        sub[painted] = kind
        centroids.append(grid.world_points((np.argwhere(painted) + lo).mean(axis=0, keepdims=True))[0])
    return centroids


def _gland_landmarks(labels: np.ndarray, grid: _Grid, gland: dict) -> list[tuple[str, np.ndarray]]:
    """Centroid, apex, base, left and right lobe of the gland: means of gland voxels (LPS mm)."""
    points = grid.world_points(np.argwhere(np.isin(labels, GLAND_LABELS)))
    local = (points - gland["center"]) @ gland["rotation"]
    lo_z, hi_z = np.percentile(local[:, 2], [4, 96])
    lo_x, hi_x = np.percentile(local[:, 0], [20, 80])
    parts = {
        "gland_centroid": np.ones(len(points), dtype=bool),
        "apex": local[:, 2] <= lo_z,
        "base": local[:, 2] >= hi_z,
        "lobe_right": local[:, 0] <= lo_x,
        "lobe_left": local[:, 0] >= hi_x,
    }
    return [(name, points[chosen].mean(axis=0)) for name, chosen in parts.items()]


@dataclass
class _Anatomy:
    labels: np.ndarray
    grid: _Grid
    landmarks: list[tuple[str, np.ndarray]]
    params: dict


def _build_anatomy(
    rng, knobs: SynthKnobs, grid: _Grid, gland: dict, probe: np.ndarray, rectum: dict
) -> _Anatomy:
    """Paint the label map in order (background, reflectors, bladder, gland, lesions, calcifications, rectum)."""
    labels, structures = _background(rng, knobs, grid)
    reflectors = _paint_reflectors(rng, labels, grid, gland)
    bladder = _paint_bladder(rng, labels, grid, gland)
    _paint_gland(rng, labels, grid, gland)
    _paint_rectum(labels, grid, probe, rectum)
    lesions = _paint_blobs(rng, labels, grid, LESION, int(rng.choice(4, p=[0.2, 0.4, 0.3, 0.1])), (3.0, 8.0))
    calcifications = _paint_blobs(rng, labels, grid, CALCIFICATION, int(rng.integers(0, 4)), (1.0, 2.0))
    landmarks = _gland_landmarks(labels, grid, gland)
    landmarks += [(f"lesion_{n + 1}", p) for n, p in enumerate(lesions)]
    params = {
        "background_structures": structures,
        "reflectors": reflectors,
        "bladder": bladder,
        "lesions": len(lesions),
        "calcifications": len(calcifications),
        "gland_volume_ml": float(np.isin(labels, GLAND_LABELS).sum() * _GRID_MM**3 / 1000),
    }
    return _Anatomy(labels, grid, landmarks, params)


# --- probe pressure ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RadialPush:
    """Probe pressure as a backward map in MR space: the TRUS-side point ``a`` shows the anatomy at ``a - u(a)``,
    ``u`` pushing tissue radially away from the probe axis by ``amplitude * exp(-(d - radius) / decay)`` (``d``
    the distance from the axis, clamped at the probe surface), weighted by ``(1 + cos)/2`` of the angle from the
    depth axis and a Gaussian along the probe centred on the gland. With the knobs' ranges ``u`` is a contraction
    (Lipschitz constant below about 0.8), so the map is invertible."""

    probe: np.ndarray
    radius: float
    amplitude: float
    decay: float
    along_sigma: float
    gland_z: float

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """``u`` (3, ...) in MR mm at points (3, ...)."""
        inverse = geometry.invert(self.probe)
        local = [sum(inverse[r, c] * points[c] for c in range(3)) + inverse[r, 3] for r in range(3)]
        d = np.sqrt(local[0] ** 2 + local[1] ** 2) + 1e-6
        cos = local[1] / d
        weight = self.amplitude * np.exp(-np.maximum(d - self.radius, 0) / self.decay) * (1 + cos) / 2
        weight = weight * np.exp(-0.5 * ((local[2] - self.gland_z) / self.along_sigma) ** 2)
        radial = [local[0] / d, local[1] / d]
        axes = self.probe[:3, :2]
        return np.stack(
            [weight * (axes[c, 0] * radial[0] + axes[c, 1] * radial[1]) for c in range(3)]
        ).astype(points.dtype)

    def backward(self, points: np.ndarray) -> np.ndarray:
        """Anatomy points of TRUS-side points, both (3, ...) in MR mm."""
        return points - self.displacement(points)

    def forward(self, point: np.ndarray) -> np.ndarray:
        """TRUS-side position of one anatomy point (MR mm): the inverse of :meth:`backward` by fixed point."""
        point = np.asarray(point, dtype=float)
        a = point.copy()
        for _ in range(100):
            a = point + self.displacement(a.reshape(3, 1))[:, 0]
        return a


def _draw_push(rng: np.random.Generator, knobs: SynthKnobs, probe, rectum: dict, gland: dict) -> _RadialPush:
    gland_z = float(geometry.apply(geometry.invert(probe), gland["center"])[2])
    return _RadialPush(
        probe,
        rectum["radius_mm"],
        _draw(rng, knobs.push_mm),
        rng.uniform(12, 20),
        rng.uniform(20, 35),
        gland_z,
    )


# --- MR ---------------------------------------------------------------------------------------------------------


def _mr_contrast(rng: np.random.Generator, n_labels: int) -> tuple[np.ndarray, bool]:
    """Mean intensity per label in [0, 1]: random (SynthMorph) or, in half the cases, a jittered T2-like order."""
    means = rng.uniform(0.05, 1.0, n_labels).astype(np.float32)
    t2_like = bool(rng.random() < 0.5)
    if t2_like:
        order = {LUMEN: 0.03, WALL: 0.25, PERIPHERAL: 0.7, TRANSITION: 0.4, LESION: 0.25, CALCIFICATION: 0.05}
        order.update({BLADDER: 1.0, REFLECTOR: 0.1})
        for label, value in order.items():
            means[label] = np.clip(value * rng.uniform(0.8, 1.2), 0.01, 1.0)
    return means, t2_like


def _draw_mr_look(rng: np.random.Generator, knobs: SynthKnobs, n_labels: int) -> dict:
    means, t2_like = _mr_contrast(rng, n_labels)
    return {
        "means": means,
        "t2_like": t2_like,
        "texture": rng.uniform(0.0, 0.2, n_labels).astype(np.float32),
        "texture_mm": rng.uniform(1.5, 5.0),
        "blur_mm": _draw(rng, knobs.mr_blur_mm),
        "bias": _draw(rng, knobs.mr_bias),
        "noise": _draw(rng, knobs.mr_noise),
        "gamma": _draw(rng, knobs.mr_gamma),
        "scale": rng.uniform(500, 3000),
    }


def _resample_to_mr(volume: np.ndarray, grid: _Grid, mr: _MRGeometry, order: int = 1) -> np.ndarray:
    """Sample a label-grid volume at the MR voxel centres (the two grids share axes: a diagonal affine)."""
    to_grid = np.linalg.inv(grid.index_to_world) @ mr.grid.index_to_world  # MR index -> grid index, (x, y, z)
    scale, offset = np.diag(to_grid)[:3][::-1], to_grid[:3, 3][::-1]
    return ndimage.affine_transform(
        volume, scale, offset, output_shape=mr.grid.shape, order=order, mode="nearest"
    )


def _slice_profile(volume: np.ndarray, mr: _MRGeometry) -> np.ndarray:
    """Average over the slice thickness (a box along the grid's slice axis) and the in-plane voxel."""
    size = [max(1, round(s / _GRID_MM)) for s in mr.spacing[::-1]]
    return ndimage.uniform_filter(volume, size, mode="nearest")


def _synthesize_mr(rng: np.random.Generator, anatomy: _Anatomy, mr: _MRGeometry, look: dict):
    """MR image (int16) and gland mask on the MR grid."""
    grid = anatomy.grid
    texture = _smooth_field(rng, grid.shape, look["texture_mm"], _GRID_MM)
    image = look["means"][anatomy.labels] * (1 + look["texture"][anatomy.labels] * texture)
    if look["blur_mm"] > 0:
        image = ndimage.gaussian_filter(image, look["blur_mm"] / _GRID_MM)
    image *= np.exp(np.float32(look["bias"]) * _smooth_field(rng, grid.shape, 80.0, _GRID_MM))
    image = _resample_to_mr(_slice_profile(image, mr), grid, mr)
    gland = np.isin(anatomy.labels, GLAND_LABELS).astype(np.float32)
    mask = _resample_to_mr(_slice_profile(gland, mr), grid, mr) >= 0.5
    sigma = np.float32(look["noise"])
    noisy = np.hypot(
        image + sigma * rng.standard_normal(image.shape, dtype=np.float32),
        sigma * rng.standard_normal(image.shape, dtype=np.float32),
    )
    noisy = np.clip(noisy, 0, None) ** np.float32(look["gamma"]) * np.float32(look["scale"])
    return np.clip(np.rint(noisy), 0, 32767).astype(np.int16), mask


# --- TRUS -------------------------------------------------------------------------------------------------------


def _draw_acoustics(rng: np.random.Generator, knobs: SynthKnobs, n_labels: int) -> dict:
    """Per-label echo properties and per-case transducer settings."""
    echo = np.exp(rng.normal(0, 0.6, n_labels)).astype(np.float32)
    density = rng.uniform(0.1, 1.0, n_labels).astype(np.float32)
    impedance = rng.uniform(1.45, 1.75, n_labels).astype(np.float32)
    attenuation = rng.uniform(*knobs.attenuation_db_cm_mhz, n_labels).astype(np.float32)
    for label, (e, z, a) in {
        LUMEN: (0.0, 1.50, 0.002),
        BLADDER: (0.03, 1.52, 0.005),
        CALCIFICATION: (4.0, 6.0, 40.0),
        REFLECTOR: (3.0, rng.uniform(3.0, 7.0), rng.uniform(10.0, 40.0)),
    }.items():
        echo[label], impedance[label], attenuation[label] = e, z, a
    return {
        "echo": echo,
        "density": np.maximum(density, np.float32(0.05)),
        "impedance": impedance,
        "attenuation": attenuation,
        "frequency_mhz": _draw(rng, knobs.frequency_mhz),
        "speckle_scale": _draw(rng, knobs.speckle_scale),
        "tgc_error_db": rng.normal(0, _draw(rng, knobs.tgc_error_db), 6),
        "tgc_compensation": rng.uniform(0.5, 1.0),
        "dynamic_range_db": _draw(rng, knobs.dynamic_range_db),
        "gain_db": rng.uniform(-6, 6),
        "specular_gain": rng.uniform(5, 30),
    }


def _speckle(
    rng: np.random.Generator, labels: np.ndarray, trus: _TRUSGeometry, acoustics: dict
) -> np.ndarray:
    """Complex scatterer field convolved with the PSF (z, r, theta): real and imaginary parts stacked."""
    r, theta = _polar_axes(trus)
    dr, dtheta = r[1] - r[0], theta[1] - theta[0]
    wavelength = 1.54 / acoustics["frequency_mhz"]  # mm
    axial, lateral, elevation = np.array([0.6, 1.8, 2.5]) * wavelength * acoustics["speckle_scale"]
    sigma = (elevation / trus.spacing, axial / dr, lateral / (0.5 * (trus.r0 + trus.r_max) * dtheta))
    density = acoustics["density"][labels]
    amplitude = acoustics["echo"][labels] * (rng.random(labels.shape, dtype=np.float32) < density)
    amplitude /= np.sqrt(density)
    norm = np.float32(np.sqrt((2 * np.sqrt(np.pi)) ** 3 * np.prod(sigma)))
    parts = [
        ndimage.gaussian_filter(amplitude * rng.standard_normal(labels.shape, dtype=np.float32), sigma) * norm
        for _ in range(2)
    ]
    return np.stack(parts)


def _transmission_db(
    labels: np.ndarray, trus: _TRUSGeometry, acoustics: dict
) -> tuple[np.ndarray, np.ndarray]:
    """Two-way loss (dB) before each sample along the rays, and the radial log-impedance step (specular)."""
    r, _ = _polar_axes(trus)
    dr = r[1] - r[0]
    step = 2 * acoustics["frequency_mhz"] * acoustics["attenuation"][labels] * np.float32(dr / 10)
    log_z = np.log(acoustics["impedance"])[labels]
    jump = np.diff(log_z, axis=1, prepend=log_z[:, :1])
    reflection = np.minimum((jump / 2) ** 2, 0.95)  # intensity reflection coefficient of each step
    loss = step - np.float32(20 / np.log(10)) * np.log1p(-reflection)
    return np.cumsum(loss, axis=1) - loss, np.abs(jump)


def _tgc_db(trus: _TRUSGeometry, acoustics: dict) -> np.ndarray:
    """Time-gain compensation along depth (dB): a mean attenuation partly compensated, plus per-band errors."""
    r, _ = _polar_axes(trus)
    mean_attenuation = float(np.median(acoustics["attenuation"]))
    slope = 2 * acoustics["frequency_mhz"] * mean_attenuation * acoustics["tgc_compensation"] / 10
    bands = np.linspace(r[0], r[-1], len(acoustics["tgc_error_db"]))
    return slope * (r - r[0]) + np.interp(r, bands, acoustics["tgc_error_db"])


def _simulate_rays(
    rng: np.random.Generator, labels: np.ndarray, trus: _TRUSGeometry, acoustics: dict
) -> np.ndarray:
    """Log-compressed echo (z, r, theta) float32 in [1, 255] from polar labels."""
    re, im = _speckle(rng, labels, trus, acoustics)
    loss_db, jump = _transmission_db(labels, trus, acoustics)
    specular = np.float32(acoustics["specular_gain"]) * ndimage.gaussian_filter1d(jump, 0.8, axis=1)
    envelope = np.hypot(re + specular, im) * 10 ** ((_tgc_db(trus, acoustics)[None, :, None] - loss_db) / 20)
    reference = 8 * np.median(envelope[::2, ::2, ::2]) * 10 ** (acoustics["gain_db"] / 20) + 1e-6
    dr = np.float32(acoustics["dynamic_range_db"])
    envelope += np.float32(reference * 10 ** ((5 - dr) / 20)) * rng.rayleigh(1.0, labels.shape).astype(
        np.float32
    )
    db = 20 * np.log10(envelope / np.float32(reference) + np.float32(1e-6))
    return 1 + 254 * np.clip((db + dr) / dr, 0, 1)


def _simulate_trus(rng, anatomy: _Anatomy, probe, push: _RadialPush | None, trus: _TRUSGeometry, acoustics):
    """TRUS image (z, y, x) uint8 and the gland mask on the Cartesian TRUS grid."""
    world_to_index = np.linalg.inv(anatomy.grid.index_to_world)

    def labels_at(x, y, z) -> np.ndarray:
        world = _probe_to_world(probe, x, y, z)
        return _sample_labels(anatomy.labels, world_to_index, world if push is None else push.backward(world))

    r, theta = _polar_axes(trus)
    _, _, z = trus.axes()
    polar = labels_at(
        (r[:, None] * np.sin(theta))[None], (r[:, None] * np.cos(theta))[None], z[:, None, None]
    )
    image = _scan_convert(_simulate_rays(rng, polar, trus, acoustics), trus)
    x, y, z = trus.axes()
    cartesian = labels_at(x[None, None, :], y[None, :, None], z[:, None, None])
    mask = np.isin(cartesian, GLAND_LABELS) & _fan_mask(trus)[None]
    return image, mask


# --- cases ------------------------------------------------------------------------------------------------------


def _draw_gt(rng: np.random.Generator, knobs: SynthKnobs, center: np.ndarray) -> geometry.RigidTransform:
    angles = rng.uniform(-1, 1, 3) * np.asarray(knobs.gt_rotation_deg)
    return geometry.RigidTransform(angles, rng.uniform(-1, 1, 3) * knobs.gt_translation_mm, center)


def generate_case(
    seed: int | np.random.SeedSequence, deform: bool = False, knobs: SynthKnobs = KNOBS
) -> PhantomCase:
    """Draw one label-driven anatomy and simulate its MR and TRUS; deterministic for a seed.

    ``deform`` adds probe pressure on the TRUS side; every random draw is the same with or without it, so the MR
    and ``gt`` of a seed do not depend on ``deform``.
    """
    ss = _seed_sequence(seed)
    rng = np.random.default_rng(ss)
    gland = _draw_gland(rng, knobs)
    mr = _draw_mr(rng, knobs, gland)
    probe, rectum = _draw_probe(rng, knobs, gland)
    trus = _draw_fan(rng, knobs, gland, probe, rectum["radius_mm"])
    gt_rigid = _draw_gt(rng, knobs, gland["center"])
    push = _draw_push(rng, knobs, probe, rectum, gland)
    grid = _anatomy_grid(mr, trus, probe, margin=push.amplitude + 3)
    anatomy = _build_anatomy(rng, knobs, grid, gland, probe, rectum)
    n_labels = int(anatomy.labels.max()) + 1
    look, acoustics = _draw_mr_look(rng, knobs, n_labels), _draw_acoustics(rng, knobs, n_labels)
    mr_image, mr_mask = _synthesize_mr(rng, anatomy, mr, look)
    trus_image, trus_mask = _simulate_trus(rng, anatomy, probe, push if deform else None, trus, acoustics)

    gt = gt_rigid.matrix
    trus_to_world = gt @ probe @ trus.index_to_probe()
    landmarks = [
        (name, np.asarray(p, dtype=float), geometry.apply(gt, push.forward(p) if deform else p))
        for name, p in anatomy.landmarks
    ]
    draws = {"gland": gland, "mr": mr, "trus": trus, "probe": probe, "rectum": rectum, "look": look}
    draws.update({"acoustics": acoustics, "gt": gt_rigid, "push": push, "anatomy": anatomy})
    params = _case_params(ss, deform, knobs, draws)
    return PhantomCase(
        mr=_image(mr_image, mr.grid.index_to_world),
        trus=_image(trus_image, trus_to_world),
        mr_mask=_image(mr_mask.astype(np.uint8), mr.grid.index_to_world),
        trus_mask=_image(trus_mask.astype(np.uint8), trus_to_world),
        gt=gt,
        landmarks=landmarks,
        params=_jsonable(params),
    )


def _case_params(ss: np.random.SeedSequence, deform: bool, knobs: SynthKnobs, draws: dict) -> dict:
    """The JSON record of a case: family, seed, knobs and every drawn value worth knowing."""
    gland, mr, trus, probe, rectum = (draws[k] for k in ("gland", "mr", "trus", "probe", "rectum"))
    look, acoustics, gt_rigid, push = (draws[k] for k in ("look", "acoustics", "gt", "push"))
    return {
        "family": "synth",
        "seed": {"entropy": ss.entropy, "spawn_key": list(ss.spawn_key)},
        "deform": deform,
        "knobs": asdict(knobs),
        "anatomy": {
            **draws["anatomy"].params,
            "gland_center_mm": gland["center"],
            "gland_radii_mm": gland["radii"],
            "gland_angles_deg": geometry.euler_angles(gland["rotation"]),
            "gland_irregularity": gland["irregularity"],
            "rectum": rectum,
        },
        "mr": {
            "size": mr.grid.shape[::-1],
            "spacing_mm": mr.spacing,
            "fov_drawn_mm": mr.fov_drawn,
            "index_to_world": mr.grid.index_to_world,
            "oblique_deg": geometry.euler_angles(mr.direction),
            **{k: look[k] for k in ("t2_like", "blur_mm", "bias", "noise", "gamma", "texture_mm")},
        },
        "trus": {
            "size": trus.size,
            "spacing_mm": trus.spacing,
            "origin_in_probe_mm": trus.origin,
            "probe_radius_mm": trus.r0,
            "max_depth_mm": trus.r_max,
            "half_angle_deg": np.rad2deg(trus.half_angle),
            "probe_to_mr": probe,
            **{
                k: acoustics[k]
                for k in ("frequency_mhz", "speckle_scale", "tgc_error_db", "dynamic_range_db")
            },
        },
        "gt": {
            "angles_deg": gt_rigid.angles_deg,
            "translation_mm": gt_rigid.translation_mm,
            "center_mm": gt_rigid.center_mm,
        },
        "probe_push": {
            "amplitude_mm": push.amplitude,
            "decay_mm": push.decay,
            "along_sigma_mm": push.along_sigma,
        },
    }
