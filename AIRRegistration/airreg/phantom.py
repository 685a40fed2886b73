"""Synthetic MR (T2-like) / TRUS phantom pairs with an exact rigid ground truth.

One anatomy per case is a set of smooth implicit shapes (ellipsoids with a low-order random perturbation of
their radius) placed in MR physical space (LPS mm; x left, y posterior, z superior). The anatomy is rasterised
once into a tissue-label grid aligned with the MR volume: in-plane at the MR spacing, each MR slice split into
near-isotropic sub-slices. The MR is the sub-slice average of per-tissue T2 intensities (partial volume) with
texture, a bias field and Rician noise. The TRUS is simulated along the rays of a transrectal fan that samples
the same labels: speckle blurred by an anisotropic PSF, specular echoes from the impedance gradient, attenuation
with TGC, shadows behind calcifications and bone, log compression, then scan conversion.

Frames. ``probe`` maps probe coordinates (x lateral, y depth along the central ray, z along the probe axis; mm,
origin on the probe axis) to MR physical space. The TRUS volume's index axes are the probe axes, and its
physical space is ``gt`` applied to MR space, so ``gt`` (4x4, MR -> TRUS LPS, the resampling convention of
:mod:`airreg.geometry`) satisfies ``SimpleITK.Resample(trus, mr, geometry.to_sitk(gt))`` == TRUS on the MR grid.
With ``deform=True`` a probe-pressure displacement (smooth, near the posterior gland) is added on the TRUS side
only; TRUS masks and landmarks follow it, so ``gt`` is then the rigid part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from . import geometry
from .errors import InputError
from .fileio import atomic_path, write_text

# name: (T2 intensity, T2 texture (relative std), echogenicity, scatterer density, impedance MRayl,
#        attenuation dB/cm/MHz). The rectal lumen is air in MR and the probe's water-filled sheath in TRUS.
_TISSUE_TABLE: dict[str, tuple[float, float, float, float, float, float]] = {
    "fat": (620.0, 0.06, 1.20, 0.35, 1.38, 0.6),
    "muscle": (170.0, 0.08, 0.45, 0.9, 1.65, 1.0),
    "bone": (430.0, 0.12, 0.60, 1.0, 4.00, 10.0),
    "cortex": (40.0, 0.05, 2.00, 1.0, 7.80, 20.0),
    "bladder_wall": (200.0, 0.05, 0.90, 1.0, 1.62, 0.8),
    "urine": (1100.0, 0.02, 0.02, 0.05, 1.52, 0.002),
    "rectal_wall": (210.0, 0.08, 0.85, 1.0, 1.62, 0.8),
    "rectal_lumen": (40.0, 0.10, 0.00, 0.05, 1.52, 0.002),
    "seminal_vesicle": (850.0, 0.25, 0.30, 0.5, 1.56, 0.6),
    "neurovascular_bundle": (300.0, 0.10, 1.10, 0.5, 1.45, 0.6),
    "capsule": (170.0, 0.05, 1.40, 1.0, 1.70, 0.9),
    "peripheral_zone": (560.0, 0.08, 0.65, 1.0, 1.60, 0.8),
    "central_zone": (260.0, 0.06, 0.55, 0.9, 1.61, 0.8),
    "transition_zone": (330.0, 0.15, 0.50, 0.5, 1.61, 0.8),
    "nodule_glandular": (480.0, 0.10, 0.80, 0.7, 1.60, 0.8),
    "nodule_stromal": (220.0, 0.10, 0.45, 0.9, 1.63, 0.9),
    "fibromuscular_stroma": (150.0, 0.05, 0.50, 1.0, 1.64, 1.0),
    "lesion": (230.0, 0.06, 0.35, 0.9, 1.62, 0.9),
    "urethra": (420.0, 0.08, 0.30, 0.6, 1.56, 0.6),
    "calcification": (40.0, 0.05, 3.00, 1.0, 5.00, 40.0),
}

#: Tissue label values (0 is unused: every voxel of the anatomy grid is some tissue).
TISSUES: dict[str, int] = {name: i + 1 for i, name in enumerate(_TISSUE_TABLE)}

#: Tissues that make up the prostate gland mask.
GLAND_TISSUES = (
    "capsule",
    "peripheral_zone",
    "central_zone",
    "transition_zone",
    "nodule_glandular",
    "nodule_stromal",
    "fibromuscular_stroma",
    "lesion",
    "urethra",
    "calcification",
)
_INTERIOR = tuple(TISSUES[t] for t in GLAND_TISSUES if t not in ("capsule", "calcification"))
_NODULES = (TISSUES["nodule_glandular"], TISSUES["nodule_stromal"])


def _table(column: int) -> np.ndarray:
    """Per-label lookup array (index = label value) of one property column of ``_TISSUE_TABLE``."""
    values = np.full(len(TISSUES) + 1, _TISSUE_TABLE["fat"][column], dtype=np.float32)  # label 0 unused
    for name, row in _TISSUE_TABLE.items():
        values[TISSUES[name]] = row[column]
    return values


def _lut(labels) -> np.ndarray:
    """Boolean lookup array that is True at the given label values."""
    lut = np.zeros(len(TISSUES) + 1, dtype=bool)
    lut[list(labels)] = True
    return lut


_GLAND_LUT = _lut(TISSUES[t] for t in GLAND_TISSUES)


@dataclass
class PhantomCase:
    """One synthetic pair. ``gt`` maps MR LPS points to TRUS LPS points (4x4); landmarks are
    ``(name, mr_xyz, trus_xyz)`` in LPS mm; ``params`` is JSON-serialisable and includes the seed.
    ``mr_labels`` / ``trus_labels`` are the tissue label maps (values of :data:`TISSUES`) on each grid."""

    mr: sitk.Image
    trus: sitk.Image
    mr_mask: sitk.Image
    trus_mask: sitk.Image
    gt: np.ndarray
    landmarks: list[tuple[str, np.ndarray, np.ndarray]]
    params: dict
    mr_labels: sitk.Image | None = None
    trus_labels: sitk.Image | None = None


# --- implicit shapes -----------------------------------------------------------------------------------

_N_BASIS = 10


def _basis(u0, u1, u2) -> tuple:
    """Low-order polynomials of a unit direction (each bounded by 1 in magnitude on the sphere)."""
    return (
        u0,
        u1,
        u2,
        u0 * u1,
        u0 * u2,
        u1 * u2,
        u0 * u0 - u1 * u1,
        1.5 * u2 * u2 - 0.5,
        u2 * u2 * u2,
        u1 * u1 * u1,
    )


def _sphere(n: int = 2000) -> np.ndarray:
    """(3, n) nearly uniform unit directions (Fibonacci sphere)."""
    z = 1 - (2 * np.arange(n) + 1) / n
    phi = np.pi * (3 - np.sqrt(5)) * np.arange(n)
    s = np.sqrt(1 - z * z)
    return np.stack([s * np.cos(phi), s * np.sin(phi), z])


_SPHERE_BASIS = np.stack(_basis(*_sphere()))  # (n_basis, n_directions)


@dataclass(frozen=True)
class _Blob:
    """Perturbed ellipsoid: ``rho(p) = |q| (1 + sum c_k b_k(q/|q|))`` with ``q = R^T (p - center) / radii``.

    ``rho < 1`` is inside; along any ray from the centre ``rho`` is linear in ``|q|``, so the surface point in a
    direction is analytic. ``rotation`` columns are the local axes in world (MR LPS) coordinates; mm.
    """

    center: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray
    coeffs: np.ndarray

    def world_to_local(self) -> np.ndarray:
        """4x4 affine from world mm to normalised local coordinates ``q``."""
        m = np.diag(1.0 / self.radii) @ self.rotation.T
        return geometry.homogeneous(m, -m @ self.center)

    def rho_local(self, q0, q1, q2):
        n = np.sqrt(q0 * q0 + q1 * q1 + q2 * q2) + np.float32(1e-9)
        u = (q0 / n, q1 / n, q2 / n)
        f = 1.0
        for c, b in zip(self.coeffs, _basis(*u), strict=True):
            if c:
                f = f + float(c) * b
        return n * f

    def reach(self) -> float:
        """Largest ``|q|`` on the surface ``rho == 1`` (over a dense set of directions, plus 3 %)."""
        return 1.03 / (1.0 + float(np.min(self.coeffs @ _SPHERE_BASIS)))

    def surface(self, direction) -> np.ndarray:
        """World point of the surface along a local (normalised-space) direction."""
        u = np.asarray(direction, dtype=float)
        u = u / np.linalg.norm(u)
        q = u / (1.0 + float(np.dot(self.coeffs, _basis(*u))))
        return self.local_point(q)

    def local_point(self, q) -> np.ndarray:
        """World point of normalised local coordinates ``q``."""
        return self.center + self.rotation @ (self.radii * np.asarray(q, dtype=float))

    def world_bounds(self, rho_max: float, cut: tuple[int, float] | None = None) -> np.ndarray:
        """(8, 3) world corners of a box containing ``rho < rho_max`` (and ``q[axis] >= value`` for a cut)."""
        s = self.reach() * rho_max
        ranges = [[-s, s] for _ in range(3)]
        if cut is not None:
            ranges[cut[0]][0] = max(-s, cut[1])
        corners = np.array([[a, b, c] for a in ranges[0] for b in ranges[1] for c in ranges[2]])
        return self.center + (corners * self.radii) @ self.rotation.T


@dataclass(frozen=True)
class _Paint:
    """Assign ``label`` where ``lo <= rho < hi`` for each layer, only over ``allowed`` current labels (None: all)
    and only where local ``q[axis] >= value`` for a ``cut``."""

    blob: _Blob
    layers: tuple[tuple[float, float, int], ...]
    allowed: tuple[int, ...] | None = None
    cut: tuple[int, float] | None = None


_COARSE_RADIUS_VOXELS = 20.0  # blobs at least this many voxels in radius are evaluated on a 2x coarser grid


def _local_coords(m: np.ndarray, lo: np.ndarray, counts, stride: int) -> list[np.ndarray]:
    """Local coordinates (one (z, y, x) array per row of the affine ``m``: index -> q) at the grid indices
    ``lo + stride * (0..count-1)``."""
    i, j, k = (lo[a] + stride * np.arange(counts[a], dtype=np.float32) for a in range(3))
    q = [
        (m[c, 0] * i)[None, None, :] + (m[c, 1] * j)[None, :, None] + (m[c, 2] * k + m[c, 3])[:, None, None]
        for c in range(len(m))
    ]
    return [np.broadcast_to(a, (counts[2], counts[1], counts[0])) for a in q]


def _upsample2(a: np.ndarray, axis: int, n: int) -> np.ndarray:
    """Linear interpolation of samples at even indices to ``n`` samples along ``axis``."""
    a = np.moveaxis(a, axis, 0)
    out = np.empty((n, *a.shape[1:]), dtype=a.dtype)
    out[0::2] = a[: (n + 1) // 2]
    out[1::2] = 0.5 * (a[: n // 2] + a[1 : n // 2 + 1])
    return np.moveaxis(out, 0, axis)


def _paint(labels: np.ndarray, index_to_world: np.ndarray, paint: _Paint) -> None:
    """Rasterise one shape into ``labels`` (z, y, x) in place, evaluating it only inside its bounding box.

    Large smooth blobs are evaluated every second voxel and linearly interpolated: the error in ``rho`` is
    about ``(2 voxels / radius)^2``, well under a voxel on the surface, at an eighth of the cost.
    """
    rho_max = max(hi for _, hi, _ in paint.layers)
    corners = geometry.apply(np.linalg.inv(index_to_world), paint.blob.world_bounds(rho_max, paint.cut))
    size = np.array(labels.shape[::-1])
    lo = np.clip(np.floor(corners.min(axis=0)).astype(int), 0, size)
    hi = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 1, 0, size)
    if np.any(hi <= lo):
        return
    m = (paint.blob.world_to_local() @ index_to_world)[:3].astype(np.float32)  # index (i, j, k) -> local q
    n = hi - lo
    voxel = float(np.linalg.norm(index_to_world[:3, :3], axis=0).max())
    if paint.blob.radii.min() >= _COARSE_RADIUS_VOXELS * voxel and n.min() >= 8:
        rho = paint.blob.rho_local(*_local_coords(m, lo, n // 2 + 1, 2))
        for axis, count in zip((2, 1, 0), n, strict=True):
            rho = _upsample2(rho, axis, count)
    else:
        rho = paint.blob.rho_local(*_local_coords(m, lo, n, 1))
    sub = labels[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
    ok = np.ones(sub.shape, dtype=bool) if paint.allowed is None else _lut(paint.allowed)[sub]
    if paint.cut is not None:
        axis, value = paint.cut
        ok &= _local_coords(m[axis : axis + 1], lo, n, 1)[0] >= value
    for layer_lo, layer_hi, label in paint.layers:
        sub[ok & (rho >= layer_lo) & (rho < layer_hi)] = label


# --- anatomy -------------------------------------------------------------------------------------------


@dataclass
class _Anatomy:
    """Shapes in painting order, landmarks (MR mm), the gland and probe frame, and their parameters."""

    paints: list[_Paint]
    landmarks: list[tuple[str, np.ndarray]]
    gland: _Blob
    probe: np.ndarray  # 4x4 probe coordinates -> MR world
    params: dict


def _coeffs(rng: np.random.Generator, scale: float, mean=None) -> np.ndarray:
    c = rng.normal(0.0, scale, _N_BASIS) + (0.0 if mean is None else np.asarray(mean))
    return np.clip(c, -0.12, 0.12) if mean is None else c


def _blob(center, radii, rotation=None, coeffs=None) -> _Blob:
    """A blob; perturbations are scaled down if they would shrink the radius below half in some direction."""
    c = np.zeros(_N_BASIS) if coeffs is None else np.asarray(coeffs, dtype=float)
    low = float(np.min(c @ _SPHERE_BASIS))
    if low < -0.5:
        c = c * (0.5 / -low)
    return _Blob(
        np.asarray(center, dtype=float),
        np.asarray(radii, dtype=float),
        np.eye(3) if rotation is None else np.asarray(rotation, dtype=float),
        c,
    )


def _solid(blob: _Blob, label: str, allowed=None, cut=None) -> _Paint:
    return _Paint(blob, ((0.0, 1.0, TISSUES[label]),), allowed, cut)


def _walled(blob: _Blob, wall: str, inside: str, thickness_mm: float) -> _Paint:
    """A shape with a wall of about ``thickness_mm`` (relative to its mean radius) around an inner tissue."""
    inner = 1.0 - thickness_mm / float(np.mean(blob.radii))
    return _Paint(blob, ((0.0, 1.0, TISSUES[wall]), (0.0, inner, TISSUES[inside])))


def _pelvis(rng: np.random.Generator, c: np.ndarray, gland_r: np.ndarray) -> list[_Paint]:
    """Muscles and bones around the gland: gluteus, obturator internus, ischium and pubic bones."""
    paints = []
    for side in (-1.0, 1.0):
        gluteus = _blob(
            c + [side * rng.uniform(30, 45), rng.uniform(65, 80), 0], [30, 25, 60], None, _coeffs(rng, 0.04)
        )
        obturator_x = rng.uniform(45, 55)
        obturator_r = np.array([rng.uniform(7, 11), rng.uniform(25, 35), rng.uniform(30, 40)])
        rot = geometry.rotation_matrix([0, 0, side * rng.uniform(0, 10)])
        obturator = _blob(
            c + [side * obturator_x, rng.uniform(-5, 10), rng.uniform(0, 10)],
            obturator_r,
            rot,
            _coeffs(rng, 0.04),
        )
        ischium = _blob(
            c + [side * (obturator_x + obturator_r[0] + 6), 5, 0],
            [rng.uniform(5, 8), 30, 45],
            rot,
            _coeffs(rng, 0.03),
        )
        pubis_rot = geometry.rotation_matrix([rng.uniform(-20, 0), 0, side * rng.uniform(20, 35)])
        pubis = _blob(
            c + [side * rng.uniform(11, 15), -(gland_r[1] + rng.uniform(18, 28)), rng.uniform(0, 15)],
            [rng.uniform(7, 10), rng.uniform(9, 13), rng.uniform(25, 35)],
            pubis_rot,
            _coeffs(rng, 0.03),
        )
        paints.append(_solid(gluteus, "muscle"))
        paints.append(_solid(obturator, "muscle"))
        for bone in (ischium, pubis):
            paints.append(_walled(bone, "cortex", "bone", rng.uniform(1.5, 2.5)))
    return paints


def _build_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Draw one anatomy in MR world coordinates (LPS mm), with the probe placed in its rectum."""
    c = rng.uniform(-30, 30, 3)  # gland centre in scanner coordinates
    volume_ml = float(np.exp(rng.uniform(np.log(20), np.log(80))))
    dims = np.array([45.0, 30.0, 35.0]) * rng.uniform(0.9, 1.1, 3)  # W x AP x L, mm
    dims *= (volume_ml * 1000 / (np.pi / 6 * dims.prod())) ** (1 / 3)
    gr = dims / 2
    size_frac = float(np.clip((volume_ml - 20) / 60, 0, 1))
    rot_g = geometry.rotation_matrix([rng.uniform(-15, 5), rng.uniform(-6, 6), rng.uniform(-6, 6)])
    gland = _blob(c, gr, rot_g, _coeffs(rng, 0.025, [0, 0.06, -0.08, 0, 0, 0, 0, 0, 0, 0.05]))

    def at(v) -> np.ndarray:  # gland-local mm -> world
        return c + rot_g @ np.asarray(v, dtype=float)

    paints = _pelvis(rng, c, gr)

    # rectum behind the gland (its lumen holds the probe in TRUS), levator ani slung around both
    post = float(gland.surface([0, 1, 0])[1] - c[1])  # posterior extent of the gland along world y
    gap, wall = rng.uniform(1.5, 5), rng.uniform(2.5, 4.5)
    r0 = rng.uniform(9, 11)  # probe radius
    lumen = np.array([rng.uniform(14, 20), r0 + rng.uniform(0.5, 3)])
    rect_rot = geometry.rotation_matrix([rng.uniform(-15, 5), rng.uniform(-4, 4), 0])
    rect_c = c + np.array([rng.uniform(-3, 3), post + gap + wall + lumen[1], rng.uniform(-5, 5)])
    rectum = _blob(rect_c, [lumen[0] + wall, lumen[1] + wall, 70], rect_rot, _coeffs(rng, 0.02))
    # levator: posterior-lateral part only (local y >= -0.3)
    lev_r = np.array([max(gr[0], lumen[0] + wall) + rng.uniform(2, 5), 0, rng.uniform(30, 40)])
    lev_r[1] = (rect_c[1] + lumen[1] + wall - (c[1] - gr[1])) / 2 + rng.uniform(1, 3)
    levator = _blob(
        [c[0], (rect_c[1] + lumen[1] + wall + c[1] - gr[1]) / 2, c[2] - 8],
        lev_r,
        rect_rot,
        _coeffs(rng, 0.03),
    )
    lev_t = rng.uniform(3, 6) / lev_r[0]
    paints.append(_Paint(levator, ((1.0, 1.0 + lev_t, TISSUES["muscle"]),), None, (1, -0.3)))
    paints.append(_walled(rectum, "rectal_wall", "rectal_lumen", wall))

    bladder_r = np.array([rng.uniform(28, 45), rng.uniform(22, 35), rng.uniform(18, 35)])
    base_z = float(gland.surface([0, 0, 1])[2] - c[2])
    bladder = _blob(
        c + [0, -0.3 * gr[1] - rng.uniform(0, 8), base_z + bladder_r[2] * rng.uniform(0.7, 0.9)],
        bladder_r,
        None,
        _coeffs(rng, 0.04, [0, 0, 0.05, 0, 0, 0, 0, 0, 0, 0]),
    )
    paints.append(_walled(bladder, "bladder_wall", "urine", rng.uniform(2.5, 4)))

    landmarks: list[tuple[str, np.ndarray]] = []
    for side, name in ((1.0, "left"), (-1.0, "right")):
        a = rng.uniform(12, 17)
        sv_rot = rot_g @ geometry.rotation_matrix(
            [0, -side * rng.uniform(15, 35), -side * rng.uniform(10, 25)]
        )
        sv = _blob(
            at([side * (0.45 * gr[0] + 0.6 * a), 0.55 * gr[1] + 3, gr[2] + rng.uniform(4, 8)]),
            [a, rng.uniform(5, 8), rng.uniform(3.5, 5)],
            sv_rot,
            _coeffs(rng, 0.08),
        )
        paints.append(_solid(sv, "seminal_vesicle"))
        landmarks.append((f"sv_tip_{name}", sv.surface([side, 0, 0])))
        nvb = _blob(at([side * 0.75 * gr[0], 0.75 * gr[1], 0]), [2.5, 2.5, 1.1 * gr[2]], rot_g)
        paints.append(_solid(nvb, "neurovascular_bundle", allowed=(TISSUES["fat"],)))

    capsule = rng.uniform(1.0, 1.5) / float(np.mean(gr))
    paints.append(
        _Paint(gland, ((0.0, 1.0, TISSUES["capsule"]), (0.0, 1.0 - capsule, TISSUES["peripheral_zone"])))
    )
    gland_paints, gland_landmarks, zones = _gland_interior(rng, gland, size_frac)
    paints += gland_paints
    landmarks = [("apex", gland.surface([0, 0, -1])), ("base", gland.surface([0, 0, 1])), *landmarks]
    landmarks += gland_landmarks

    probe = _probe_frame(rng, rectum, lumen[1], r0, c)
    params = {
        "gland_center_mm": c,
        "gland_volume_ml": volume_ml,
        "gland_dims_mm": dims,
        "gland_angles_deg": geometry.euler_angles(rot_g),
        "capsule_mm": capsule * float(np.mean(gr)),
        "rectum": {"center_mm": rect_c, "lumen_radii_mm": lumen, "wall_mm": wall, "gap_mm": gap},
        "bladder": {"center_mm": bladder.center, "radii_mm": bladder_r},
        "probe_radius_mm": r0,
        **zones,
    }
    return _Anatomy(paints, landmarks, gland, probe, params)


def _gland_interior(rng: np.random.Generator, gland: _Blob, size_frac: float):
    """Zones, BPH nodules, lesions, urethra and calcifications inside the gland; their landmarks and parameters."""
    gr = gland.radii

    def sub(center_frac, radii_frac, coeffs) -> _Blob:
        return _blob(gland.local_point(center_frac), gr * np.asarray(radii_frac), gland.rotation, coeffs)

    pz = (TISSUES["peripheral_zone"],)
    cz = sub([0, 0.3, 0.55], [0.45, 0.35, 0.4], _coeffs(rng, 0.04))
    tz_scale = float(np.clip(0.55 + 0.3 * size_frac + rng.normal(0, 0.04), 0.45, 0.9))
    tz = sub([0, -0.15, 0.1], np.array([0.72, 0.62, 0.7]) * tz_scale, _coeffs(rng, 0.05))
    afs = sub([0, -0.92, 0.05], [0.6, 0.3, 0.85], _coeffs(rng, 0.04))
    paints = [
        _solid(cz, "central_zone", allowed=pz),
        _solid(tz, "transition_zone", allowed=pz + (TISSUES["central_zone"],)),
    ]
    n_nodules = int(rng.integers(0, 2 + round(5 * size_frac) + 1))
    for _ in range(n_nodules):
        center = tz.local_point(_in_ball(rng, 0.65))
        radii = rng.uniform(2.5, 4 + 6 * size_frac) * rng.uniform(0.8, 1.2, 3)
        kind = "nodule_glandular" if rng.random() < 0.5 else "nodule_stromal"
        paints.append(
            _solid(
                _blob(center, radii, gland.rotation, _coeffs(rng, 0.05)),
                kind,
                allowed=(TISSUES["transition_zone"],),
            )
        )
    paints.append(
        _solid(
            afs,
            "fibromuscular_stroma",
            allowed=pz + (TISSUES["transition_zone"], TISSUES["central_zone"]) + _NODULES,
        )
    )

    landmarks: list[tuple[str, np.ndarray]] = []
    lesions = []
    for n in range(int(rng.choice(4, p=[0.25, 0.4, 0.25, 0.1]))):
        if rng.random() < 0.7:  # peripheral zone: posterior-lateral, near the capsule
            u = rng.normal(0, 1, 3) * [1, 0.6, 0.8] + [0, 0.9, 0]
            center = gland.center + rng.uniform(0.7, 0.82) * (gland.surface(u) - gland.center)
            zone = "peripheral_zone"
        else:
            center, zone = tz.local_point(_in_ball(rng, 0.5)), "transition_zone"
        radii = rng.uniform(3, 8) * rng.uniform(0.8, 1.2, 3)
        paints.append(
            _solid(_blob(center, radii, gland.rotation, _coeffs(rng, 0.08)), "lesion", allowed=_INTERIOR)
        )
        landmarks.append((f"lesion_{n + 1}", center))
        lesions.append({"center_mm": center, "radii_mm": radii, "zone": zone})

    # urethra: proximal segment from the bladder neck to the verumontanum, angled ~35 deg anteriorly, then distal
    veru = gland.local_point([0, rng.uniform(0, 0.1), rng.uniform(-0.15, 0.05)])
    angle = np.deg2rad(rng.uniform(25, 45))
    up = gland.rotation @ [0, -np.sin(angle), np.cos(angle)]
    down = gland.rotation @ (np.array([0, rng.uniform(0, 0.15), -1.0]) / np.hypot(1, 0.1))
    r_u = rng.uniform(2.0, 3.5)
    length_up, length_down = 1.3 * gr[2], 1.2 * gr[2]
    for direction, length in ((up, length_up), (down, length_down)):
        frame = _frame_with_z(direction)
        seg = _blob(veru + direction * length / 2, [r_u, r_u, length / 2 + r_u], frame)
        paints.append(_solid(seg, "urethra", allowed=_INTERIOR + _NODULES + (TISSUES["capsule"],)))
    landmarks += [
        ("urethra_base", veru + up * 0.8 * gr[2]),
        ("verumontanum", veru + gland.rotation @ [0, r_u, 0]),
        ("urethra_apex", veru + down * 0.75 * gr[2]),
    ]

    calcs = []
    for n in range(int(rng.integers(0, 5))):
        if rng.random() < 0.6:  # along the surgical capsule (TZ/PZ border)
            center = tz.surface(rng.normal(0, 1, 3))
        else:  # periurethral
            center = (
                veru
                + down * rng.uniform(-0.4, 0.5) * gr[2]
                + gland.rotation @ (rng.normal(0, 1, 3) * [3, 3, 1])
            )
        radius = rng.uniform(0.8, 2.5)
        paints.append(_solid(_blob(center, [radius] * 3), "calcification", allowed=_INTERIOR + _NODULES))
        landmarks.append((f"calcification_{n + 1}", center))
        calcs.append({"center_mm": center, "radius_mm": radius})

    zones = {
        "transition_zone_scale": tz_scale,
        "nodules": n_nodules,
        "lesions": lesions,
        "calcifications": calcs,
        "urethra_radius_mm": r_u,
    }
    return paints, landmarks, zones


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _in_ball(rng: np.random.Generator, radius: float) -> np.ndarray:
    return _unit(rng.normal(0, 1, 3)) * radius * rng.random() ** (1 / 3)


def _frame_with_z(z_axis) -> np.ndarray:
    """A rotation whose third column is ``z_axis`` (unit)."""
    z = _unit(z_axis)
    helper = np.array([1.0, 0, 0]) if abs(z[0]) < 0.9 else np.array([0, 1.0, 0])
    x = _unit(np.cross(helper, z))
    return np.column_stack([x, np.cross(z, x), z])


def _probe_frame(rng, rectum: _Blob, lumen_ap: float, r0: float, gland_center: np.ndarray) -> np.ndarray:
    """Probe frame -> MR world: axis along the rectum, touching its anterior wall, depth axis towards the gland.

    Axes: x lateral, y depth (the central ray, anterior), z along the probe axis (superior); the origin is the
    point of the probe axis level with the gland centre.
    """
    tilt = geometry.rotation_matrix(rng.uniform(-4, 4, 3) * [1, 1, 0])
    axis = _unit(rectum.rotation @ tilt @ [0, 0, 1])
    point = rectum.center + rectum.rotation @ [0, -(lumen_ap - r0), 0]
    depth = -rectum.rotation[:, 1]
    depth = _unit(depth - axis * np.dot(depth, axis))
    roll = np.deg2rad(rng.uniform(-10, 10))
    depth = np.cos(roll) * depth + np.sin(roll) * np.cross(axis, depth)
    origin = point + axis * np.dot(gland_center - point, axis)
    return geometry.homogeneous(np.column_stack([np.cross(depth, axis), depth, axis]), origin)


# --- image grids ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MRGeometry:
    """Axial MR grid: ``index_to_world`` maps (i, j, k) voxel indices to LPS mm; ``subslices`` per slice."""

    index_to_world: np.ndarray
    size: tuple[int, int, int]  # (nx, ny, nz)
    subslices: int


@dataclass(frozen=True)
class _TRUSGeometry:
    """Cartesian TRUS grid in probe coordinates (voxel (i, j, k) at ``origin + spacing * (i, j, k)``) and its fan.

    The fan: rays from the probe axis at angles within ``half_angle`` of the depth axis, from the probe surface
    ``r0`` to ``r_max`` (mm); every slice along the probe axis has the same fan (a swept transverse array).
    """

    origin: np.ndarray
    spacing: float
    size: tuple[int, int, int]  # (nx lateral, ny depth, nz along the probe)
    r0: float
    r_max: float
    half_angle: float  # radians

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Probe coordinates (mm) of the voxel centres along x, y and z."""
        return tuple(self.origin[a] + self.spacing * np.arange(self.size[a]) for a in range(3))

    def index_to_probe(self) -> np.ndarray:
        return geometry.homogeneous(np.eye(3) * self.spacing, self.origin)


def _mr_geometry(rng: np.random.Generator, gland_center: np.ndarray) -> _MRGeometry:
    s_xy, s_z = rng.uniform(0.6, 0.8), rng.uniform(3.0, 3.6)
    n = int(np.clip(round(rng.uniform(110, 130) / s_xy), 128, 192))
    nz = int(rng.integers(20, 27))
    direction = geometry.rotation_matrix(rng.uniform(-3, 3, 3))
    spacing = np.array([s_xy, s_xy, s_z])
    center_index = (np.array([n, n, nz]) - 1) / 2 + rng.uniform(-8, 8, 3) / [s_xy, s_xy, 2 * s_z]
    origin = gland_center - direction @ (spacing * center_index)
    return _MRGeometry(
        geometry.homogeneous(direction @ np.diag(spacing), origin), (n, n, nz), max(1, round(s_z / s_xy))
    )


def _trus_geometry(rng: np.random.Generator, anatomy: _Anatomy) -> _TRUSGeometry:
    spacing = rng.uniform(0.75, 0.85)
    half_width, y0, r_max = rng.uniform(40, 50), rng.uniform(2, 6), rng.uniform(65, 80)
    gland_z = geometry.apply(geometry.invert(anatomy.probe), anatomy.gland.center)[2]
    length = max(70.0, 2 * anatomy.gland.radii[2] + 30)
    origin = np.array([-half_width, y0, gland_z - length / 2 + rng.uniform(-5, 5)])
    size = (
        round(2 * half_width / spacing) + 1,
        round((r_max - y0) / spacing) + 1,
        round(length / spacing) + 1,
    )
    r0 = anatomy.params["probe_radius_mm"]
    return _TRUSGeometry(origin, spacing, size, r0, r_max, np.deg2rad(rng.uniform(60, 72)))


def _anatomy_grid(mr: _MRGeometry, trus: _TRUSGeometry, probe: np.ndarray, margin_mm: float):
    """Label grid: the MR grid with slices split into sub-slices, padded to cover the TRUS volume.

    Returns ``(index_to_world, shape_zyx, offset)`` where ``offset`` (i, j, k) is the anatomy index of the first
    sub-slice sample of MR voxel (0, 0, 0).
    """
    n = mr.subslices
    nx, ny, nz = mr.size
    # anatomy index (i, j, K) -> MR continuous index (i, j, (K + 0.5) / n - 0.5): sub-slice centres
    to_mr = geometry.homogeneous(np.diag([1.0, 1.0, 1.0 / n]), [0, 0, 0.5 / n - 0.5])
    box = np.array([[a, b, c] for a in (0, trus.size[0] - 1) for b in (0, trus.size[1] - 1) for c in (0, 1)])
    box[:, 2] *= trus.size[2] - 1
    corners = geometry.apply(probe @ trus.index_to_probe(), box)
    corners = np.concatenate([corners + d for d in margin_mm * np.vstack([np.eye(3), -np.eye(3)])])
    index = geometry.apply(np.linalg.inv(mr.index_to_world @ to_mr), corners)
    shape = np.array([nx, ny, nz * n])
    low = np.clip(np.ceil(-index.min(axis=0)), 0, 300).astype(int)
    high = np.clip(np.ceil(index.max(axis=0) - (shape - 1)), 0, 300).astype(int)
    shift = geometry.homogeneous(np.eye(3), -low)
    return mr.index_to_world @ to_mr @ shift, tuple((shape + low + high)[::-1]), low


def _rasterize(
    paints: list[_Paint], shape_zyx: tuple[int, int, int], index_to_world: np.ndarray
) -> np.ndarray:
    """Tissue labels (z, y, x) uint8: fat everywhere, then each shape painted in order."""
    labels = np.full(shape_zyx, TISSUES["fat"], dtype=np.uint8)
    for paint in paints:
        _paint(labels, index_to_world, paint)
    return labels


def _sample_labels(labels: np.ndarray, world_to_index: np.ndarray, world: np.ndarray) -> np.ndarray:
    """Nearest-neighbour labels at world points ``(3, ...)`` (mm); points outside take the nearest edge label."""
    flat = np.zeros(world.shape[1:], dtype=np.intp)
    for axis, size in zip((2, 1, 0), labels.shape, strict=True):  # z, y, x
        m = world_to_index[axis]
        index = m[0] * world[0] + m[1] * world[1] + m[2] * world[2] + np.float32(m[3])
        flat = flat * size + np.clip(np.rint(index), 0, size - 1).astype(np.intp)
    return labels.ravel()[flat]


def _probe_to_world(probe: np.ndarray, x, y, z) -> np.ndarray:
    """World points ``(3, ...)`` float32 of probe coordinates given as broadcastable arrays."""
    shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
    out = np.empty((3, *shape), dtype=np.float32)
    for c in range(3):
        out[c] = probe[c, 0] * x + probe[c, 1] * y + (probe[c, 2] * z + probe[c, 3])
    return out


# --- probe pressure ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Push:
    """Probe pressure as a backward map in MR space: TRUS-side point ``a`` shows the anatomy at
    ``a - amplitude * exp(-|a - contact|^2 / (2 sigma^2)) * direction`` (tissue pushed along ``direction``,
    away from the probe, by up to ``amplitude`` mm). Its Lipschitz constant is below 0.3, so it is invertible."""

    contact: np.ndarray
    direction: np.ndarray
    amplitude: float
    sigma: float

    def _weight(self, points: np.ndarray) -> np.ndarray:
        d2 = sum((points[c] - np.float32(self.contact[c])) ** 2 for c in range(3))
        return np.float32(self.amplitude) * np.exp(d2 * np.float32(-0.5 / self.sigma**2))

    def backward(self, points: np.ndarray) -> np.ndarray:
        """Anatomy points of TRUS-side points, both ``(3, ...)`` in MR mm."""
        w = self._weight(points)
        return np.stack([points[c] - w * np.float32(self.direction[c]) for c in range(3)])

    def forward(self, point: np.ndarray) -> np.ndarray:
        """TRUS-side position (MR mm) of one anatomy point: the inverse of :meth:`backward` by fixed point."""
        a = np.asarray(point, dtype=float)
        for _ in range(60):
            a = point + self._weight(a.reshape(3, 1).astype(np.float64))[0] * self.direction
        return a


def _draw_push(rng: np.random.Generator, anatomy: _Anatomy) -> _Push:
    contact = anatomy.gland.surface([0, 1, 0])
    return _Push(contact, anatomy.probe[:3, 1].copy(), rng.uniform(1.5, 5.0), rng.uniform(12, 20))


# --- MR ------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation (float32)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def _draw_mr_look(rng: np.random.Generator) -> dict:
    """Per-case T2 intensities: every tissue jittered, zonal contrast varied more."""
    t2 = _table(0) * rng.uniform(0.9, 1.1, len(TISSUES) + 1).astype(np.float32)
    t2[TISSUES["peripheral_zone"]] *= rng.uniform(0.8, 1.15)
    t2[TISSUES["transition_zone"]] *= rng.uniform(0.85, 1.2)
    return {
        "t2": t2,
        "gain": rng.uniform(0.7, 1.4),
        "bias_coeffs": rng.normal(0, 0.12, 9) + [0, 0.15, 0, 0, 0, 0, 0, 0, 0],
        "noise": rng.uniform(0.015, 0.04),
    }


def _synthesize_mr(rng: np.random.Generator, labels: np.ndarray, n_sub: int, look: dict):
    """T2 image (z, y, x) float32, gland mask and centre-sub-slice labels from sub-sliced labels (z*n_sub, y, x)."""
    nz = labels.shape[0] // n_sub
    blocks = labels.reshape(nz, n_sub, *labels.shape[1:])  # (slice, sub-slice, y, x)
    t2 = look["t2"][blocks].mean(axis=1)
    texture = _table(1)[blocks].mean(axis=1)
    mask = _GLAND_LUT[blocks].mean(axis=1) >= 0.5
    shape = t2.shape
    field = (_smooth_noise(rng, shape, (0.4, 1.2, 1.2)) + _smooth_noise(rng, shape, (0.7, 4, 4))) / np.sqrt(2)
    image = ndimage.gaussian_filter(t2 * (1 + texture * field), (0, 0.5, 0.5))
    z, y, x = np.meshgrid(
        *(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij", sparse=True
    )
    terms = (x, y, z, x * x, y * y, z * z, x * y, y * z, x * z)
    log_bias = sum(float(c) * t for c, t in zip(look["bias_coeffs"], terms, strict=True))
    image = image * np.exp(log_bias) * np.float32(look["gain"])
    sigma = np.float32(look["noise"] * look["t2"][TISSUES["fat"]] * look["gain"])
    noisy = np.hypot(
        image + sigma * rng.standard_normal(shape, dtype=np.float32),
        sigma * rng.standard_normal(shape, dtype=np.float32),
    )
    return noisy, mask, blocks[:, n_sub // 2]


# --- TRUS ----------------------------------------------------------------------------------------------


def _draw_acoustics(rng: np.random.Generator) -> dict:
    """Per-case transducer and tissue echo parameters (lengths in mm)."""
    return {
        "echo": _table(2) * rng.uniform(0.85, 1.15, len(TISSUES) + 1).astype(np.float32),
        "frequency_mhz": rng.uniform(6.0, 9.0),
        "tgc_db_cm_mhz": rng.uniform(0.68, 0.8),
        "dynamic_range_db": rng.uniform(45, 60),
        "gain_db": rng.uniform(-3, 3),
        "psf_sigma_mm": [
            rng.uniform(0.4, 0.55),
            rng.uniform(0.8, 1.2),
            rng.uniform(0.9, 1.5),
        ],  # ax, lat, elev
        "specular_gain": rng.uniform(15, 25),
    }


_DR_MM = 0.5  # radial sample step of the ray simulation
_N_THETA = 128  # rays per slice


def _polar_axes(trus: _TRUSGeometry) -> tuple[np.ndarray, np.ndarray]:
    r = trus.r0 + _DR_MM * np.arange(int(np.floor((trus.r_max - trus.r0) / _DR_MM)) + 1)
    return r, np.linspace(-trus.half_angle, trus.half_angle, _N_THETA)


def _simulate_rays(
    rng: np.random.Generator, labels: np.ndarray, trus: _TRUSGeometry, acoustics: dict
) -> np.ndarray:
    """Log-compressed echo image along the rays: labels (z, r, theta) -> float32 in [1, 255]."""
    r, theta = _polar_axes(trus)
    dtheta = theta[1] - theta[0]
    ax, lat, elev = acoustics["psf_sigma_mm"]
    mid = 0.5 * (trus.r0 + trus.r_max)
    sigma = (elev / trus.spacing, ax / _DR_MM, lat / (mid * dtheta))  # PSF in samples (z, r, theta)

    # speckle: complex Gaussian scatterers (sparse where density < 1) convolved with the PSF
    density = _table(3)[labels]
    amplitude = acoustics["echo"][labels] * (rng.random(labels.shape, dtype=np.float32) < density)
    amplitude /= np.sqrt(density)
    norm = np.float32(np.sqrt((2 * np.sqrt(np.pi)) ** 3 * np.prod(sigma)))
    re = (
        ndimage.gaussian_filter(amplitude * rng.standard_normal(labels.shape, dtype=np.float32), sigma) * norm
    )
    im = (
        ndimage.gaussian_filter(amplitude * rng.standard_normal(labels.shape, dtype=np.float32), sigma) * norm
    )

    # specular echoes: radial change of log impedance, strongest where the interface faces the probe
    log_z = ndimage.gaussian_filter(np.log(_table(4))[labels], (0.7, 1.0, 1.0))
    g_z, g_r, g_t = np.gradient(log_z, trus.spacing, _DR_MM, dtheta)
    g_t /= r[None, :, None].astype(np.float32)
    facing = g_r * g_r / (g_r * g_r + g_t * g_t + g_z * g_z + np.float32(1e-8))
    specular = np.float32(acoustics["specular_gain"]) * np.abs(g_r) * facing * facing
    envelope = np.hypot(re + specular, im)

    # two-way attenuation and reflection losses along each ray (exclusive cumulative sums), TGC
    step_db = 2 * acoustics["frequency_mhz"] * _table(5)[labels] * np.float32(_DR_MM / 10)
    loss_db = np.cumsum(step_db, axis=1) - step_db
    reflect = np.diff(log_z, axis=1, prepend=log_z[:, :1]) ** 2 / 4
    loss_db -= np.float32(20 / np.log(10)) * (np.cumsum(np.log1p(-np.minimum(reflect, 0.9)), axis=1))
    tgc_db = 2 * acoustics["frequency_mhz"] * acoustics["tgc_db_cm_mhz"] * (r - trus.r0) / 10
    edge = 1 - 0.3 * (theta / trus.half_angle) ** 4
    ring = 1 + 1.5 * np.exp(-(r - trus.r0) / 1.0)
    gain = (10 ** (tgc_db / 20) * ring)[None, :, None] * edge[None, None, :]
    envelope *= (10 ** (-loss_db / 20)) * gain.astype(np.float32)

    reference = 8 * np.median(envelope[::2, ::2, ::2]) * 10 ** (acoustics["gain_db"] / 20)
    dr = acoustics["dynamic_range_db"]
    floor = np.float32(reference * 10 ** ((6 - dr) / 20))  # electronic noise, just above black
    envelope += floor * rng.rayleigh(1.0, labels.shape).astype(np.float32)
    db = 20 * np.log10(envelope / np.float32(reference) + np.float32(1e-6))
    return 1 + 254 * np.clip((db + np.float32(dr)) / np.float32(dr), 0, 1)


def _fan_coordinates(trus: _TRUSGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Radius and angle (mm, rad) of the Cartesian TRUS voxels in one slice, shape (ny, nx)."""
    x, y, _ = trus.axes()
    return np.hypot(x[None, :], y[:, None]), np.arctan2(x[None, :], y[:, None])


def _fan_mask(trus: _TRUSGeometry) -> np.ndarray:
    """Boolean (ny, nx) mask of the fan in one TRUS slice."""
    radius, angle = _fan_coordinates(trus)
    r, _ = _polar_axes(trus)
    return (radius >= trus.r0) & (radius <= r[-1]) & (np.abs(angle) <= trus.half_angle)


def _scan_convert(polar: np.ndarray, trus: _TRUSGeometry) -> np.ndarray:
    """Bilinear scan conversion of (z, r, theta) rays onto the Cartesian grid (z, y, x) uint8, zero outside the fan."""
    r, theta = _polar_axes(trus)
    radius, angle = _fan_coordinates(trus)
    inside = _fan_mask(trus)
    fr = (radius[inside] - r[0]) / _DR_MM
    ft = (angle[inside] - theta[0]) / (theta[1] - theta[0])
    r0 = np.clip(np.floor(fr).astype(int), 0, len(r) - 2)
    t0 = np.clip(np.floor(ft).astype(int), 0, len(theta) - 2)
    wr, wt = (fr - r0).astype(np.float32), (ft - t0).astype(np.float32)
    flat = polar.reshape(polar.shape[0], -1)
    base = r0 * len(theta) + t0
    values = (1 - wr) * ((1 - wt) * flat[:, base] + wt * flat[:, base + 1]) + wr * (
        (1 - wt) * flat[:, base + len(theta)] + wt * flat[:, base + len(theta) + 1]
    )
    out = np.zeros((polar.shape[0], *inside.shape), dtype=np.uint8)
    out.reshape(polar.shape[0], -1)[:, inside.ravel()] = np.rint(values)
    return out


def _simulate_trus(rng, labels, world_to_index, probe, push: _Push | None, trus: _TRUSGeometry, acoustics):
    """TRUS image (z, y, x) uint8 and tissue labels on the Cartesian TRUS grid."""
    r, theta = _polar_axes(trus)
    _, _, z = trus.axes()
    x_polar = (r[:, None] * np.sin(theta)[None, :])[None]
    y_polar = (r[:, None] * np.cos(theta)[None, :])[None]
    world = _probe_to_world(probe, x_polar, y_polar, z[:, None, None])
    polar_labels = _sample_labels(labels, world_to_index, world if push is None else push.backward(world))
    image = _scan_convert(_simulate_rays(rng, polar_labels, trus, acoustics), trus)
    x, y, z = trus.axes()
    world = _probe_to_world(probe, x[None, None, :], y[None, :, None], z[:, None, None])
    cart_labels = _sample_labels(labels, world_to_index, world if push is None else push.backward(world))
    return image, cart_labels


# --- cases ---------------------------------------------------------------------------------------------


def _image(array: np.ndarray, index_to_world: np.ndarray) -> sitk.Image:
    """SimpleITK image of a (z, y, x) array whose voxel (i, j, k) sits at ``index_to_world @ (i, j, k, 1)``."""
    image = sitk.GetImageFromArray(array)
    linear = index_to_world[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((linear / spacing).ravel().tolist())
    image.SetOrigin(index_to_world[:3, 3].tolist())
    return image


def _jsonable(value):
    """Nested dicts/lists with numpy values -> plain Python (floats rounded to 6 decimals)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return round(float(value), 6)
    return value


def _seed_sequence(seed: int | np.random.SeedSequence) -> np.random.SeedSequence:
    return seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))


def generate_case(seed: int | np.random.SeedSequence, deform: bool = False) -> PhantomCase:
    """Draw one anatomy and simulate its MR and TRUS; deterministic for a seed.

    ``params["seed"]`` holds ``entropy`` and ``spawn_key``: ``np.random.SeedSequence(entropy,
    spawn_key=spawn_key)`` regenerates the case. ``deform`` adds probe pressure on the TRUS side; every random
    draw is the same with or without it, so the MR and ``gt`` of a seed do not depend on ``deform``.
    """
    ss = _seed_sequence(seed)
    rng = np.random.default_rng(ss)
    anatomy = _build_anatomy(rng)
    mr = _mr_geometry(rng, anatomy.gland.center)
    trus = _trus_geometry(rng, anatomy)
    gt_rigid = geometry.RigidTransform(
        rng.uniform(-1, 1, 3) * [10, 10, 30], rng.uniform(-10, 10, 3), anatomy.gland.center
    )
    gt = gt_rigid.matrix
    push = _draw_push(rng, anatomy)
    look, acoustics = _draw_mr_look(rng), _draw_acoustics(rng)

    anat_to_world, shape, offset = _anatomy_grid(mr, trus, anatomy.probe, margin_mm=push.amplitude + 3)
    labels = _rasterize(anatomy.paints, shape, anat_to_world)
    nx, ny, nz = mr.size
    mr_sub = labels[
        offset[2] : offset[2] + nz * mr.subslices, offset[1] : offset[1] + ny, offset[0] : offset[0] + nx
    ]
    mr_image, mr_mask, mr_labels = _synthesize_mr(rng, mr_sub, mr.subslices, look)
    trus_image, trus_labels = _simulate_trus(
        rng, labels, np.linalg.inv(anat_to_world), anatomy.probe, push if deform else None, trus, acoustics
    )

    trus_to_world = gt @ anatomy.probe @ trus.index_to_probe()
    landmarks = []
    for name, point in anatomy.landmarks:
        moved = push.forward(point) if deform else point
        landmarks.append((name, np.asarray(point, dtype=float), geometry.apply(gt, moved)))
    params = {
        "seed": {"entropy": ss.entropy, "spawn_key": list(ss.spawn_key)},
        "deform": deform,
        "anatomy": anatomy.params,
        "mr": {
            "size": mr.size,
            "subslices": mr.subslices,
            "index_to_world": mr.index_to_world,
            "t2_by_tissue": {t: look["t2"][v] for t, v in TISSUES.items()},
            "noise": look["noise"],
        },
        "trus": {
            "size": trus.size,
            "spacing_mm": trus.spacing,
            "origin_in_probe_mm": trus.origin,
            "probe_radius_mm": trus.r0,
            "max_depth_mm": _polar_axes(trus)[0][-1],
            "half_angle_deg": np.rad2deg(trus.half_angle),
            "probe_to_mr": anatomy.probe,
            **{k: v for k, v in acoustics.items() if k != "echo"},
        },
        "gt": {
            "angles_deg": gt_rigid.angles_deg,
            "translation_mm": gt_rigid.translation_mm,
            "center_mm": gt_rigid.center_mm,
        },
        "probe_push": {
            "contact_mm": push.contact,
            "direction": push.direction,
            "amplitude_mm": push.amplitude,
            "sigma_mm": push.sigma,
        },
    }
    return PhantomCase(
        mr=_image(np.clip(np.rint(mr_image), 0, 32767).astype(np.int16), mr.index_to_world),
        trus=_image(trus_image, trus_to_world),
        mr_mask=_image(mr_mask.astype(np.uint8), mr.index_to_world),
        trus_mask=_image(_GLAND_LUT[trus_labels].astype(np.uint8), trus_to_world),
        gt=gt,
        landmarks=landmarks,
        params=_jsonable(params),
        mr_labels=_image(mr_labels, mr.index_to_world),
        trus_labels=_image(trus_labels, trus_to_world),
    )


LANDMARK_HEADER = "name,mr_x,mr_y,mr_z,trus_x,trus_y,trus_z"


def _write_image(image: sitk.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


def write_case(case: PhantomCase, folder: Path) -> Path:
    """Write a case folder (images, masks, ``gt.tfm``, ``landmarks.csv``, then ``case.json``), each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in (
        ("mr", case.mr),
        ("trus", case.trus),
        ("mr_prostate", case.mr_mask),
        ("trus_prostate", case.trus_mask),
    ):
        _write_image(image, folder / f"{name}.nii.gz")
    geometry.write_transform(folder / "gt.tfm", case.gt)
    rows = [LANDMARK_HEADER]
    rows += [",".join([name, *(f"{v:.6f}" for v in (*m, *t))]) for name, m, t in case.landmarks]
    write_text(folder / "landmarks.csv", "\n".join(rows) + "\n")
    write_text(folder / "case.json", json.dumps(case.params, indent=1, allow_nan=False) + "\n")
    return folder


#: Phantom families: ``classic`` (this module), ``synth`` (:mod:`airreg.phantom_synth`, label-driven) and
#: ``mixture`` (even cases classic, odd cases synth).
FAMILIES = ("classic", "synth", "mixture")


def case_generator(family: str, index: int = 0):
    """The ``generate_case(seed, deform)`` function that makes case ``index`` of a family."""
    if family not in FAMILIES:
        raise InputError(f"unknown phantom family {family!r}; choose one of {', '.join(FAMILIES)}")
    if family == "synth" or (family == "mixture" and index % 2 == 1):
        from .phantom_synth import generate_case as synth_case

        return synth_case
    return generate_case


def generate_dataset(
    out: Path, cases: int, seed: int, deform: bool = False, progress: bool = True, family: str = "classic"
) -> list[Path]:
    """Write ``cases`` case folders ``out/case0000`` ... of a family (:data:`FAMILIES`); case ``i`` uses
    ``SeedSequence(seed, spawn_key=(i,))``."""
    from tqdm import tqdm

    out = Path(out)
    generators = [case_generator(family, i) for i in range(cases)]
    folders = []
    for i in tqdm(range(cases), desc=f"{family} phantom cases", unit="case", disable=not progress):
        case = generators[i](np.random.SeedSequence(seed, spawn_key=(i,)), deform=deform)
        folders.append(write_case(case, out / f"case{i:04d}"))
    return folders


def _trus_slice_at(trus: sitk.Image, gt: np.ndarray, mr_point) -> int:
    """Index of the TRUS slice (along the probe) nearest an MR point."""
    k = trus.TransformPhysicalPointToContinuousIndex(geometry.apply(gt, np.asarray(mr_point)).tolist())[2]
    return int(np.clip(round(k), 0, trus.GetSize()[2] - 1))


def write_preview(case_folder: Path, png: Path) -> Path:
    """PNG of three axial MR slices through the gland: MR, TRUS resampled with ``gt`` (SimpleITK), their overlay
    (TRUS in 'hot', transparent outside the fan; gland outline in green) and the native TRUS fan slice nearest
    the same anatomy (probe at the bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(case_folder)
    mr = sitk.ReadImage(str(folder / "mr.nii.gz"), sitk.sitkFloat32)
    trus = sitk.ReadImage(str(folder / "trus.nii.gz"), sitk.sitkFloat32)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "mr_prostate.nii.gz")))
    gt = geometry.read_transform(folder / "gt.tfm")
    aligned = sitk.GetArrayFromImage(sitk.Resample(trus, mr, geometry.to_sitk(gt), sitk.sitkLinear, 0.0))
    mr_arr, trus_arr = sitk.GetArrayFromImage(mr), sitk.GetArrayFromImage(trus)
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    if len(slices) == 0:
        slices = np.array([len(mask) // 2])
    slices = slices[np.linspace(0, len(slices) - 1, 5).round().astype(int)[1:4]]
    vmax = float(np.percentile(mr_arr, 99.5))

    fig, axes = plt.subplots(3, 4, figsize=(13, 10))
    for row, k in enumerate(slices):
        rows, cols = np.nonzero(mask[k]) if mask[k].any() else np.indices(mask[k].shape).reshape(2, -1)
        centre = mr.TransformContinuousIndexToPhysicalPoint(
            [float(cols.mean()), float(rows.mean()), float(k)]
        )
        trus_k = _trus_slice_at(trus, gt, centre)
        panels = axes[row]
        panels[0].imshow(mr_arr[k], cmap="gray", vmin=0, vmax=vmax)
        panels[1].imshow(aligned[k], cmap="gray", vmin=0, vmax=255)
        panels[2].imshow(mr_arr[k], cmap="gray", vmin=0, vmax=vmax)
        panels[2].imshow(np.ma.masked_equal(aligned[k], 0), cmap="hot", alpha=0.5, vmin=0, vmax=255)
        panels[2].contour(mask[k], levels=[0.5], colors="lime", linewidths=0.8)
        panels[3].imshow(trus_arr[trus_k], cmap="gray", vmin=0, vmax=255, origin="lower")
        titles = (f"MR slice {k}", "TRUS resampled with gt", "overlay, gland outline", f"TRUS slice {trus_k}")
        for ax, title in zip(panels, titles, strict=True):
            ax.set_axis_off()
            ax.text(0.02, 0.98, title, color="yellow", fontsize=9, va="top", transform=ax.transAxes)
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=0.995, wspace=0.02, hspace=0.02)
    png = Path(png)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return png


def _gallery_caption(params: dict, mr: sitk.Image) -> str:
    """Two lines of a case's drawn values for a gallery panel (either family)."""
    s = mr.GetSpacing()
    trus = params.get("trus", {})
    return (
        f"{params.get('family', 'classic')}: MR {s[0]:.2f}x{s[1]:.2f}x{s[2]:.1f} mm\n"
        f"fan {2 * trus.get('half_angle_deg', 0):.0f} deg, {trus.get('frequency_mhz', 0):.1f} MHz"
    )


def write_gallery(case_folders: list[Path], png: Path) -> Path:
    """PNG with one column per case: the MR slice through the gland's centre (outline in green) above the native
    TRUS slice nearest the same point, each case's spacing and fan in the caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(case_folders), figsize=(2.6 * len(case_folders), 5.4), squeeze=False)
    for column, folder in zip(axes.T, case_folders, strict=True):
        folder = Path(folder)
        mr = sitk.ReadImage(str(folder / "mr.nii.gz"), sitk.sitkFloat32)
        trus = sitk.ReadImage(str(folder / "trus.nii.gz"))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "mr_prostate.nii.gz")))
        k, rows, cols = (int(round(v.mean())) for v in np.nonzero(mask))
        centre = mr.TransformContinuousIndexToPhysicalPoint([float(cols), float(rows), float(k)])
        mr_arr = sitk.GetArrayFromImage(mr)[k]
        column[0].imshow(mr_arr, cmap="gray", vmin=0, vmax=float(np.percentile(mr_arr, 99.5)))
        column[0].contour(mask[k], levels=[0.5], colors="lime", linewidths=0.6)
        trus_k = _trus_slice_at(trus, geometry.read_transform(folder / "gt.tfm"), centre)
        column[1].imshow(sitk.GetArrayFromImage(trus)[trus_k], cmap="gray", vmin=0, vmax=255, origin="lower")
        params = json.loads((folder / "case.json").read_text())
        column[0].set_title(_gallery_caption(params, mr), fontsize=8)
        for ax in column:
            ax.set_axis_off()
    fig.tight_layout()
    png = Path(png)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return png
