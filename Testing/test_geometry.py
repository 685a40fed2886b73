"""Property tests of airreg.geometry: parameterisations, composition, conventions, SimpleITK and file round trips."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from airreg import geometry
from airreg.errors import InputError
from airreg.geometry import RigidTransform

#: Property tests: enough examples to hit awkward angles, no per-example deadline (the machine is slow).
PROPERTY = settings(max_examples=60, deadline=None)
FILES = settings(max_examples=15, deadline=None)

coord = st.floats(-200.0, 200.0, allow_nan=False)
vec3 = st.tuples(coord, coord, coord)
angle = st.floats(-179.0, 179.0)
# β away from ±90° so that the Euler parameters are unique
angles = st.tuples(angle, st.floats(-89.0, 89.0), angle)
any_angles = st.tuples(st.floats(-360.0, 360.0), st.floats(-360.0, 360.0), st.floats(-360.0, 360.0))
rigid = st.builds(RigidTransform, any_angles, vec3, vec3)
points = st.lists(vec3, min_size=1, max_size=5).map(np.array)


def assert_same(a, b, atol: float = 1e-7) -> None:
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), atol=atol, rtol=0)


@PROPERTY
@given(rigid, vec3)
def test_matrix_round_trip(t: RigidTransform, center) -> None:
    assert_same(RigidTransform.from_matrix(t.matrix, center).matrix, t.matrix)


@PROPERTY
@given(angles, vec3)
def test_parameters_round_trip_6dof(a, translation) -> None:
    t = RigidTransform.from_matrix(RigidTransform(a, translation).matrix)
    assert_same(t.angles_deg, a, atol=1e-6)
    assert_same(t.translation_mm, translation, atol=1e-6)


@PROPERTY
@given(angles, vec3)
def test_vector_round_trip_6dof(a, translation) -> None:
    v = np.array(a + translation)
    assert_same(RigidTransform.from_vector(v, 6).vector(6), v)


@PROPERTY
@given(angle, coord, coord, vec3)
def test_vector_round_trip_3dof(rz, tx, ty, center) -> None:
    t = RigidTransform.from_vector([rz, tx, ty], 3, center)
    assert_same(t.vector(3), [rz, tx, ty])
    assert t.angles_deg[:2] == (0.0, 0.0) and t.translation_mm[2] == 0.0
    # stays a 3-DOF transform through a matrix round trip about the same centre
    assert_same(RigidTransform.from_matrix(t.matrix, center).vector(3), [rz, tx, ty], atol=1e-6)


@PROPERTY
@given(rigid, points)
def test_inverse_is_identity(t: RigidTransform, p) -> None:
    assert_same(t.compose(t.inverse()).matrix, np.eye(4), atol=1e-7)
    assert_same(t.inverse().apply(t.apply(p)), p, atol=1e-7)
    assert_same(geometry.invert(t.matrix) @ t.matrix, np.eye(4), atol=1e-9)


@PROPERTY
@given(rigid, rigid)
def test_inverse_of_composition(a: RigidTransform, b: RigidTransform) -> None:
    assert_same(a.compose(b).inverse().matrix, b.inverse().compose(a.inverse()).matrix, atol=1e-7)


@PROPERTY
@given(rigid, rigid, rigid, points)
def test_composition_is_associative_and_applies_right_first(a, b, c, p) -> None:
    assert_same(a.compose(b).compose(c).matrix, a.compose(b.compose(c)).matrix, atol=1e-7)
    assert_same(a.compose(b).apply(p), a.apply(b.apply(p)), atol=1e-7)


@PROPERTY
@given(rigid)
def test_lps_resampling_ras_modeling_round_trips(t: RigidTransform) -> None:
    m = t.matrix
    assert_same(geometry.ras_modeling_to_lps_resampling(geometry.lps_resampling_to_ras_modeling(m)), m)
    assert_same(geometry.lps_resampling_to_ras_modeling(geometry.ras_modeling_to_lps_resampling(m)), m)


@PROPERTY
@given(rigid, points)
def test_ras_modeling_moves_trus_points_onto_mr(t: RigidTransform, mr_lps) -> None:
    """to_parent (RAS) maps a TRUS point to its MR point: the inverse of the LPS resampling in RAS coordinates."""
    trus_lps = t.apply(mr_lps)
    to_parent = geometry.lps_resampling_to_ras_modeling(t.matrix)
    flip = geometry.RAS_TO_LPS
    assert_same(geometry.apply(flip, geometry.apply(to_parent, geometry.apply(flip, trus_lps))), mr_lps, 1e-7)


def test_slicer_known_value() -> None:
    """Slicer "to parent" RAS translation (10, 20, 30) == LPS resampling translation (10, 20, -30)."""
    to_parent = geometry.homogeneous(np.eye(3), [10.0, 20.0, 30.0])
    expected = geometry.homogeneous(np.eye(3), [10.0, 20.0, -30.0])
    assert_same(geometry.ras_modeling_to_lps_resampling(to_parent), expected)
    assert_same(geometry.lps_resampling_to_ras_modeling(expected), to_parent)


@PROPERTY
@given(angles, vec3, vec3, points)
def test_agrees_with_sitk_euler_zyx(a, translation, center, p) -> None:
    euler = sitk.Euler3DTransform(center, *np.deg2rad(a), translation)
    euler.SetComputeZYX(True)
    t = RigidTransform(a, translation, center)
    expected = np.array([euler.TransformPoint(tuple(map(float, q))) for q in p])
    assert_same(t.apply(p), expected, atol=1e-7)
    assert_same(geometry.from_sitk(euler), t.matrix, atol=1e-9)


@PROPERTY
@given(rigid, points)
def test_to_sitk_from_sitk_round_trip(t: RigidTransform, p) -> None:
    tx = geometry.to_sitk(t.matrix)
    assert_same(geometry.from_sitk(tx), t.matrix, atol=1e-12)
    assert_same([tx.TransformPoint(tuple(map(float, q))) for q in p], t.apply(p), atol=1e-7)


@PROPERTY
@given(rigid, rigid, points)
def test_from_sitk_composite_matches_itk_order(a: RigidTransform, b: RigidTransform, p) -> None:
    composite = sitk.CompositeTransform([geometry.to_sitk(a.matrix), geometry.to_sitk(b.matrix)])
    expected = [composite.TransformPoint(tuple(map(float, q))) for q in p]
    assert_same(geometry.apply(geometry.from_sitk(composite), p), expected, atol=1e-6)


@FILES
@given(rigid, st.sampled_from([".tfm", ".txt", ".h5", ".mat"]))
def test_transform_file_round_trip(t: RigidTransform, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = geometry.write_transform(Path(d) / f"gt{suffix}", t.matrix)
        assert_same(geometry.read_transform(path), t.matrix, atol=1e-9)


@FILES
@given(rigid, st.booleans())
def test_matrix_text_round_trip(t: RigidTransform, ras: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = geometry.write_matrix_text(Path(d) / "m.txt", t.matrix, ras_modeling=ras)
        header = path.read_text().splitlines()[0]
        assert ("frame=RAS" in header) == ras
        assert_same(geometry.read_transform(path), t.matrix, atol=1e-7)


def test_plain_matrix_without_header_is_lps_resampling(tmp_path: Path) -> None:
    m = RigidTransform((5, -3, 20), (1, 2, 3)).matrix
    np.savetxt(tmp_path / "m.txt", m)
    assert_same(geometry.read_transform(tmp_path / "m.txt"), m, atol=1e-9)


def oblique_frame(a, origin) -> np.ndarray:
    return geometry.frame(geometry.rotation_matrix(a), origin)


@PROPERTY
@given(angles, vec3, angle, coord, coord, st.lists(st.floats(-100, 100), min_size=1, max_size=5))
def test_axial_3dof_in_oblique_frame_moves_in_plane(a, origin, rz, tx, ty, offsets) -> None:
    f = oblique_frame(a, origin)
    world = geometry.to_world(RigidTransform.from_vector([rz, tx, ty], 3).matrix, f)
    normal, o = f[:3, 2], f[:3, 3]
    on_line = o + np.outer(offsets, normal)
    moved = geometry.apply(world, on_line)
    in_plane_shift = f[:3, :3] @ np.array([tx, ty, 0.0])
    assert_same(moved - on_line, np.broadcast_to(in_plane_shift, on_line.shape), atol=1e-7)
    assert_same((moved - on_line) @ normal, np.zeros(len(offsets)), atol=1e-7)
    assert_same(geometry.to_frame(world, f), RigidTransform.from_vector([rz, tx, ty], 3).matrix, atol=1e-9)


@pytest.mark.parametrize(
    "matrix",
    [
        np.diag([2.0, 1.0, 1.0, 1.0]),  # scaling
        np.diag([-1.0, 1.0, 1.0, 1.0]),  # reflection
        geometry.homogeneous(np.eye(3), [np.nan, 0, 0]),
        np.eye(3),
    ],
    ids=["scale", "reflection", "nan", "shape"],
)
def test_non_rigid_matrices_are_rejected(matrix: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(InputError):
        geometry.check_rigid(matrix)
    with pytest.raises(InputError, match="t.tfm"):
        geometry.write_transform(tmp_path / "t.tfm", matrix)
    assert not (tmp_path / "t.tfm").exists()


def test_rigid_transform_rejects_nan() -> None:
    with pytest.raises(InputError):
        RigidTransform((0, np.nan, 0))


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing.tfm"):
        geometry.read_transform(tmp_path / "missing.tfm")
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(InputError, match="t.json"):
        geometry.read_transform(tmp_path / "t.json")
    with pytest.raises(InputError, match="t.json"):
        geometry.write_transform(tmp_path / "t.json", np.eye(4))
    (tmp_path / "bad.tfm").write_text("not a transform\n")
    with pytest.raises(InputError, match="bad.tfm"):
        geometry.read_transform(tmp_path / "bad.tfm")
    (tmp_path / "bad.txt").write_text("1 2 x\n")
    with pytest.raises(InputError, match="bad.txt"):
        geometry.read_transform(tmp_path / "bad.txt")


def test_scaled_itk_file_is_rejected(tmp_path: Path) -> None:
    affine = sitk.AffineTransform(3)
    affine.SetMatrix([1.5, 0, 0, 0, 1, 0, 0, 0, 1])
    sitk.WriteTransform(affine, str(tmp_path / "scaled.tfm"))
    with pytest.raises(InputError, match="scaled.tfm"):
        geometry.read_transform(tmp_path / "scaled.tfm")


def test_nonlinear_itk_file_is_rejected(tmp_path: Path) -> None:
    field = sitk.Image([4, 4, 4], sitk.sitkVectorFloat64, 3)
    sitk.WriteTransform(sitk.DisplacementFieldTransform(field), str(tmp_path / "field.h5"))
    with pytest.raises(InputError, match="field.h5"):
        geometry.read_transform(tmp_path / "field.h5")


def test_orthonormalized_makes_a_float32_rotation_exactly_rigid():
    from airreg.geometry import orthonormalized

    m = geometry.RigidTransform((3.0, -7.0, 40.0), (1.0, 2.0, 3.0)).matrix.astype(np.float32).astype(float)
    fixed = orthonormalized(m)
    assert np.abs(fixed[:3, :3].T @ fixed[:3, :3] - np.eye(3)).max() < 1e-14
    assert np.abs(fixed - m).max() < 1e-6
    np.testing.assert_array_equal(fixed[:3, 3], m[:3, 3])
