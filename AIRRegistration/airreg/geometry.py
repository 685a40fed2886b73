"""Rigid transforms, frames and coordinate conventions: the single place where LPS/RAS and
resampling/modeling conventions are converted.

Conventions
-----------
* Points are in LPS millimetres (ITK, SimpleITK). Angles are degrees.
* A ``RigidTransform`` maps ``p -> R (p - c) + c + t`` with ``R = Rz(γ) · Ry(β) · Rx(α)``: the rotation about
  x is applied first, then y, then z (fixed axes). This is ITK's ``Euler3DTransform`` with ``ComputeZYX`` on.
* A registration transform maps an MR point to the same anatomical point in TRUS space (the *resampling*
  transform that ITK transform files store, fixed = MR, moving = TRUS).
* Slicer works in RAS and shows the *modeling* transform of the TRUS volume ("transform to parent"), which
  moves TRUS onto MR: ``to_parent_RAS = inv(RAS_TO_LPS @ mr_to_trus_LPS @ RAS_TO_LPS)``.
* A *frame* is a 4x4 matrix ``frame_to_world`` whose columns are orthonormal axes plus an origin; the networks
  estimate parameters in the frame of their grid (axes of the MR volume, origin at the grid centre), so that the
  paper's 3-DOF "axial" subset is a rotation about the MR slice normal plus an in-plane translation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import transform_files
from .errors import InputError
from .fileio import atomic_path, write_text

#: Flips the first two axes; converts points and matrices between RAS and LPS (it is its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Degrees of freedom of the two transform models and the parameter order of their vectors.
PARAMETER_NAMES = {
    3: ("rz_deg", "tx_mm", "ty_mm"),
    6: ("rx_deg", "ry_deg", "rz_deg", "tx_mm", "ty_mm", "tz_mm"),
}

_RIGID_TOL = 1e-3


def rotation_matrix(angles_deg) -> np.ndarray:
    """3x3 rotation ``Rz(γ) Ry(β) Rx(α)`` for angles ``(α, β, γ)`` in degrees about the x, y, z axes."""
    a, b, g = np.deg2rad(np.asarray(angles_deg, dtype=float))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cg, -sg, 0], [sg, cg, 0], [0, 0, 1]])
    return rz @ ry @ rx


def euler_angles(rotation: np.ndarray) -> np.ndarray:
    """Angles ``(α, β, γ)`` in degrees with ``rotation_matrix(angles) == rotation`` (β in [-90°, 90°])."""
    r = np.asarray(rotation, dtype=float)
    beta = np.arcsin(np.clip(-r[2, 0], -1.0, 1.0))
    if abs(np.cos(beta)) > 1e-8:
        alpha = np.arctan2(r[2, 1], r[2, 2])
        gamma = np.arctan2(r[1, 0], r[0, 0])
    else:  # gimbal lock: only α - γ (or α + γ) is defined; put it all in α
        gamma = 0.0
        alpha = np.arctan2(-r[1, 2], r[1, 1])
    return np.rad2deg([alpha, beta, gamma])


def homogeneous(rotation: np.ndarray, translation) -> np.ndarray:
    """4x4 matrix from a 3x3 linear part and a translation."""
    m = np.eye(4)
    m[:3, :3] = rotation
    m[:3, 3] = translation
    return m


def check_rigid(matrix: np.ndarray, where: str = "transform") -> np.ndarray:
    """Return ``matrix`` as a float 4x4 array if it is a finite proper rigid transform, else raise InputError."""
    m = np.asarray(matrix, dtype=float)
    if m.shape != (4, 4):
        raise InputError(f"{where}: expected a 4x4 matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise InputError(f"{where}: the transform contains NaN or Inf")
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise InputError(f"{where}: the last row of the matrix must be 0 0 0 1")
    r = m[:3, :3]
    if not np.allclose(r.T @ r, np.eye(3), atol=_RIGID_TOL) or np.linalg.det(r) <= 0:
        raise InputError(
            f"{where}: the transform is not rigid (rotation part is not orthonormal with det +1)"
        )
    return m


@dataclass(frozen=True)
class RigidTransform:
    """Six rigid parameters about an explicit centre: ``p -> R(angles) (p - center) + center + translation``.

    ``angles_deg`` are (α, β, γ) about x, y, z in degrees, ``translation_mm`` and ``center_mm`` in mm, all in
    the coordinate system the transform is expressed in (LPS world unless stated otherwise).
    """

    angles_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    center_mm: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0))

    def __post_init__(self) -> None:
        for name in ("angles_deg", "translation_mm", "center_mm"):
            value = tuple(float(v) for v in np.asarray(getattr(self, name), dtype=float).reshape(3))
            if not all(np.isfinite(value)):
                raise InputError(f"RigidTransform: {name} contains NaN or Inf")
            object.__setattr__(self, name, value)

    @property
    def rotation(self) -> np.ndarray:
        return rotation_matrix(self.angles_deg)

    @property
    def matrix(self) -> np.ndarray:
        """The 4x4 homogeneous matrix of the mapping."""
        r = self.rotation
        c = np.asarray(self.center_mm)
        return homogeneous(r, c - r @ c + np.asarray(self.translation_mm))

    @classmethod
    def from_matrix(
        cls, matrix: np.ndarray, center_mm=(0.0, 0.0, 0.0), where: str = "matrix"
    ) -> RigidTransform:
        """Parameters of a rigid 4x4 matrix about ``center_mm``."""
        m = check_rigid(matrix, where)
        c = np.asarray(center_mm, dtype=float)
        r = m[:3, :3]
        return cls(tuple(euler_angles(r)), tuple(m[:3, 3] - c + r @ c), tuple(c))

    @classmethod
    def from_vector(cls, vector, dof: int, center_mm=(0.0, 0.0, 0.0)) -> RigidTransform:
        """From a parameter vector ordered as ``PARAMETER_NAMES[dof]``; 3-DOF is (γ, tx, ty) about z."""
        v = np.asarray(vector, dtype=float).reshape(-1)
        if dof not in PARAMETER_NAMES or v.size != dof:
            raise InputError(f"parameter vector: expected {dof} values for {dof}-DOF, got {v.size}")
        if dof == 3:
            return cls((0.0, 0.0, v[0]), (v[1], v[2], 0.0), center_mm)
        return cls(v[:3], v[3:], center_mm)

    def vector(self, dof: int) -> np.ndarray:
        """Parameter vector ordered as ``PARAMETER_NAMES[dof]`` (3-DOF drops α, β and tz)."""
        if dof == 3:
            return np.array([self.angles_deg[2], self.translation_mm[0], self.translation_mm[1]])
        if dof == 6:
            return np.array(self.angles_deg + self.translation_mm)
        raise InputError(f"dof must be 3 or 6, got {dof}")

    def compose(self, other: RigidTransform) -> RigidTransform:
        """``self ∘ other``: apply ``other`` first, then ``self``; keeps this transform's centre."""
        return RigidTransform.from_matrix(self.matrix @ other.matrix, self.center_mm)

    def inverse(self) -> RigidTransform:
        """The inverse mapping, about the same centre."""
        return RigidTransform.from_matrix(invert(self.matrix), self.center_mm)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Map points of shape (N, 3) (or (3,))."""
        return apply(self.matrix, points)


def orthonormalized(matrix: np.ndarray) -> np.ndarray:
    """The nearest proper rigid matrix (rotation projected onto SO(3) by SVD), e.g. after float32 arithmetic,
    so that its transpose is its inverse to float64 precision."""
    m = np.array(matrix, dtype=float)
    u, _, vt = np.linalg.svd(m[:3, :3])
    if np.linalg.det(u @ vt) < 0:
        u[:, -1] *= -1
    m[:3, :3] = u @ vt
    return m


def invert(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 matrix, exact (transpose) rather than numerical."""
    m = np.asarray(matrix, dtype=float)
    r = m[:3, :3].T
    return homogeneous(r, -r @ m[:3, 3])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 matrix to points of shape (N, 3) or (3,)."""
    p = np.asarray(points, dtype=float)
    out = p.reshape(-1, 3) @ np.asarray(matrix)[:3, :3].T + np.asarray(matrix)[:3, 3]
    return out.reshape(p.shape)


def frame(axes: np.ndarray, origin) -> np.ndarray:
    """``frame_to_world`` 4x4 from orthonormal axes (columns) and an origin, both in world coordinates."""
    return homogeneous(np.asarray(axes, dtype=float), np.asarray(origin, dtype=float))


def to_world(matrix_in_frame: np.ndarray, frame_to_world: np.ndarray) -> np.ndarray:
    """Express a transform given in a frame's coordinates in world coordinates (conjugation)."""
    return frame_to_world @ matrix_in_frame @ invert(frame_to_world)


def to_frame(matrix_in_world: np.ndarray, frame_to_world: np.ndarray) -> np.ndarray:
    """Express a world transform in a frame's coordinates; inverse of :func:`to_world`."""
    return invert(frame_to_world) @ matrix_in_world @ frame_to_world


# --- LPS resampling  <->  RAS modeling (Slicer) ------------------------------------------------------


def lps_resampling_to_ras_modeling(mr_to_trus_lps: np.ndarray) -> np.ndarray:
    """Slicer's "transform to parent" (RAS) for the TRUS volume, from the MR->TRUS LPS resampling matrix."""
    return invert(RAS_TO_LPS @ np.asarray(mr_to_trus_lps, dtype=float) @ RAS_TO_LPS)


def ras_modeling_to_lps_resampling(to_parent_ras: np.ndarray) -> np.ndarray:
    """MR->TRUS LPS resampling matrix from Slicer's "transform to parent" (RAS) of the TRUS volume."""
    return RAS_TO_LPS @ invert(np.asarray(to_parent_ras, dtype=float)) @ RAS_TO_LPS


# --- SimpleITK transforms and files ------------------------------------------------------------------


def to_sitk(matrix: np.ndarray) -> sitk.AffineTransform:
    """A SimpleITK AffineTransform (centre 0) with the same mapping as a 4x4 matrix."""
    m = np.asarray(matrix, dtype=float)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(m[:3, :3].ravel().tolist())
    tx.SetTranslation(m[:3, 3].tolist())
    return tx


def from_sitk(transform: sitk.Transform, where: str = "transform") -> np.ndarray:
    """4x4 matrix of a linear SimpleITK transform (composites of linear transforms are flattened)."""
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        m = np.eye(4)
        # ITK applies the last-added transform first: T(p) = T0(T1(...Tn(p)))
        for i in range(composite.GetNumberOfTransforms()):
            m = m @ from_sitk(composite.GetNthTransform(i), where)
        return m
    if transform.GetTransformEnum() == sitk.sitkIdentity:
        return np.eye(4)
    if transform.GetTransformEnum() == sitk.sitkTranslation:
        return homogeneous(np.eye(3), transform.GetParameters())
    if transform.GetTransformEnum() == sitk.sitkScale:  # p -> S (p - c) + c
        scale, center = np.diag(transform.GetParameters()), np.asarray(transform.GetFixedParameters())
        return homogeneous(scale, center - scale @ center)
    try:
        linear = sitk.AffineTransform(3)
        linear.SetMatrix(transform.GetMatrix())
        linear.SetTranslation(getattr(transform, "GetTranslation", lambda: (0.0, 0.0, 0.0))())  # Versor: none
        linear.SetCenter(transform.GetCenter())
    except (AttributeError, RuntimeError) as exc:
        raise InputError(f"{where}: {transform.GetName()} is not a linear transform") from exc
    a = np.asarray(linear.GetMatrix(), dtype=float).reshape(3, 3)
    c = np.asarray(linear.GetCenter(), dtype=float)
    t = np.asarray(linear.GetTranslation(), dtype=float)
    return homogeneous(a, t + c - a @ c)


_ITK_SUFFIXES = (".tfm", ".txt", ".h5", ".hdf5", ".mat", ".xfm")
_MATRIX_HEADER = "# AIRRegistration 4x4 matrix"


def read_transform(path: str | os.PathLike) -> np.ndarray:
    """Read a rigid MR->TRUS LPS resampling matrix from an ITK transform file or a plain 4x4 text matrix.

    A plain matrix file written by :func:`write_matrix_text` says in its header whether it holds the LPS
    resampling matrix or Slicer's RAS modeling matrix; a plain matrix without that header is read as LPS
    resampling (the ITK convention).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: transform file not found")
    if path.suffix.lower() not in _ITK_SUFFIXES:
        raise InputError(f"{path}: unknown transform file type (use .tfm, .txt, .h5 or .mat)")
    if path.suffix.lower() == ".txt":
        text = transform_files.read_text(path)
        if not text.lstrip().startswith("#Insight"):
            return _parse_matrix_text(text, path)
    return check_rigid(from_sitk(transform_files.read(path), str(path)), str(path))


def check_transform_suffix(path: str | os.PathLike) -> Path:
    """Refuse an output transform name whose suffix is not an ITK transform file type."""
    path = Path(path)
    if path.suffix.lower() not in _ITK_SUFFIXES:
        raise InputError(f"{path}: unknown transform file type (use .tfm, .txt, .h5 or .mat)")
    return path


def write_transform(path: str | os.PathLike, mr_to_trus_lps: np.ndarray) -> Path:
    """Write the MR->TRUS LPS resampling matrix as an ITK transform file (.tfm, .txt, .h5, .mat), atomically."""
    path = check_transform_suffix(path)
    m = check_rigid(mr_to_trus_lps, str(path))
    with atomic_path(path) as tmp:
        sitk.WriteTransform(to_sitk(m), str(tmp))
    return path


def write_matrix_text(path: str | os.PathLike, mr_to_trus_lps: np.ndarray, ras_modeling: bool = True) -> Path:
    """Write a plain 4x4 text matrix, by default Slicer's RAS modeling matrix (TRUS -> MR, "to parent")."""
    m = check_rigid(mr_to_trus_lps, str(path))
    if ras_modeling:
        values, convention = (
            lps_resampling_to_ras_modeling(m),
            "frame=RAS convention=modeling (TRUS->MR, to parent)",
        )
    else:
        values, convention = m, "frame=LPS convention=resampling (MR->TRUS, ITK)"
    rows = "\n".join(" ".join(f"{v:.10g}" for v in row) for row in values)
    return write_text(path, f"{_MATRIX_HEADER} {convention}\n{rows}\n")


def _parse_matrix_text(text: str, path: Path) -> np.ndarray:
    """A plain 4x4 matrix: four lines of four numbers; lines starting with ``#`` are comments."""
    header = text.lstrip().splitlines()[0] if text.strip() else ""
    rows = [
        transform_files.parse_numbers(line, f"{path}: line {number}")
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if len(rows) != 4 or any(len(row) != 4 for row in rows):
        raise InputError(f"{path}: not a 4x4 matrix of numbers (expected 4 lines of 4 numbers)")
    values = check_rigid(np.array(rows), str(path))
    if "frame=RAS" in header:
        return ras_modeling_to_lps_resampling(values)
    return values
