"""Transform files are parsed and checked before SimpleITK builds anything (airreg.transform_files)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from airreg import geometry, transform_files
from airreg.errors import InputError

HEADER = "#Insight Transform File V1.0\n"


def _euler(zyx: bool = False) -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform((4.0, -5.0, 6.0), 0.1, -0.2, 0.3, (1.0, 2.0, -3.0))
    t.SetComputeZYX(zyx)
    return t


def _rigid_affine() -> sitk.AffineTransform:
    t = sitk.AffineTransform(3)
    t.SetMatrix(geometry.rotation_matrix((10.0, -20.0, 30.0)).ravel().tolist())
    t.SetTranslation((1.0, 2.0, 3.0))
    t.SetCenter((-4.0, 5.0, 6.0))
    return t


RIGID = {
    "identity": lambda: sitk.Transform(3, sitk.sitkIdentity),
    "translation": lambda: sitk.TranslationTransform(3, (1.0, -2.0, 3.5)),
    "euler": _euler,
    "euler-zyx": lambda: _euler(True),
    "versor": lambda: sitk.VersorTransform((0.0, 0.0, 1.0), 0.4),
    "versor-rigid": lambda: sitk.VersorRigid3DTransform((0.0, 1.0, 0.0), 0.3, (1.0, 2.0, 3.0), (4, 5, 6)),
    "similarity-unit-scale": lambda: sitk.Similarity3DTransform(1.0, (1, 0, 0), 0.2, (1, 2, 3), (4, 5, 6)),
    "scale-versor-unit": lambda: sitk.ScaleVersor3DTransform((1.0, 1.0, 1.0), (0, 0, 1), 0.2, (1, 2, 3)),
    "scale-unit": lambda: sitk.ScaleTransform(3, (1.0, 1.0, 1.0)),
    "affine-rigid": _rigid_affine,
    "composite": lambda: sitk.CompositeTransform(
        [sitk.TranslationTransform(3, (1.0, 2.0, 3.0)), _euler(), sitk.Transform(3, sitk.sitkIdentity)]
    ),
}


@pytest.mark.parametrize("suffix", [".tfm", ".txt", ".mat", ".h5"])
@pytest.mark.parametrize("name", sorted(RIGID))
def test_every_rigid_type_reads_as_itk_maps_points(tmp_path, name, suffix):
    transform = RIGID[name]()
    if suffix == ".mat" and name == "composite":
        pytest.skip("ITK's .mat format holds one transform")
    path = tmp_path / f"t{suffix}"
    sitk.WriteTransform(transform, str(path))
    matrix = geometry.read_transform(path)
    points = np.array([[0.0, 0.0, 0.0], [10.0, -20.0, 30.0], [-7.0, 3.0, 12.0]])
    expected = np.array([transform.TransformPoint(p.tolist()) for p in points])
    np.testing.assert_allclose(geometry.apply(matrix, points), expected, atol=1e-9)


def test_translation_and_identity_convert_from_sitk():
    np.testing.assert_array_equal(geometry.from_sitk(sitk.Transform(3, sitk.sitkIdentity)), np.eye(4))
    m = geometry.from_sitk(sitk.TranslationTransform(3, (1.0, 2.0, 3.0)))
    np.testing.assert_array_equal(m[:3, 3], [1.0, 2.0, 3.0])


def test_matrix_offset_base_and_old_euler_files_read(tmp_path):
    rotation = geometry.rotation_matrix((0.0, 0.0, 30.0))
    values = " ".join(f"{v:.17g}" for v in [*rotation.ravel(), 1, 2, 3])
    path = tmp_path / "m.tfm"
    path.write_text(
        f"{HEADER}Transform: MatrixOffsetTransformBase_double_3_3\nParameters: {values}\nFixedParameters: 0 0 0\n"
    )
    np.testing.assert_allclose(
        geometry.read_transform(path), geometry.homogeneous(rotation, [1, 2, 3]), atol=1e-12
    )
    path.write_text(
        f"{HEADER}Transform: Euler3DTransform_float_3_3\nParameters: 0 0 0 1 2 3\nFixedParameters: 4 5 6\n"
    )
    np.testing.assert_allclose(geometry.read_transform(path), geometry.homogeneous(np.eye(3), [1, 2, 3]))


def _tfm(type_name: str, parameters: str, fixed: str = "0 0 0") -> str:
    return (
        f"{HEADER}#Transform 0\nTransform: {type_name}\nParameters: {parameters}\nFixedParameters: {fixed}\n"
    )


EMPTY_PARAMETERS = ["Euler3DTransform", "VersorRigid3DTransform", "Similarity3DTransform",
                    "ScaleTransform", "ScaleSkewVersor3DTransform", "AffineTransform"]  # fmt: skip


@pytest.mark.parametrize("type_name", EMPTY_PARAMETERS)
def test_an_empty_parameters_line_is_refused_not_a_crash(tmp_path, type_name):
    path = tmp_path / "t.tfm"
    path.write_text(_tfm(f"{type_name}_double_3_3", ""))
    with pytest.raises(InputError, match=rf"t\.tfm: {type_name} takes \d+ parameters, the file has 0"):
        geometry.read_transform(path)


BAD_TEXT = {
    "short-euler": (_tfm("Euler3DTransform_double_3_3", "0.1 0.2 0.3"), "takes 6 parameters, the file has 3"),
    "long-euler": (_tfm("Euler3DTransform_double_3_3", "0 0 0 0 0 0 0"), "takes 6 parameters"),
    "fixed-count": (_tfm("AffineTransform_double_3_3", "1 0 0 0 1 0 0 0 1 0 0 0", "0 0"), "takes 3 fixed"),
    "nan": (_tfm("TranslationTransform_double_3_3", "nan 0 0", ""), "NaN or Inf"),
    "inf": (_tfm("TranslationTransform_double_3_3", "0 -inf 0", ""), "NaN or Inf"),
    "overflow": (_tfm("TranslationTransform_double_3_3", "1e999 0 0", ""), "overflows"),
    "underscore": (_tfm("TranslationTransform_double_3_3", "1_0 0 0", ""), "'1_0' is not a number"),
    "word": (_tfm("TranslationTransform_double_3_3", "one two three", ""), "is not a number"),
    "scaled": (_tfm("Similarity3DTransform_double_3_3", "0 0 0 0 0 0 1.2"), "not rigid"),
    "mirror": (_tfm("AffineTransform_double_3_3", "-1 0 0 0 1 0 0 0 1 0 0 0"), "not rigid"),
    "shear": (_tfm("AffineTransform_double_3_3", "1 0.3 0 0 1 0 0 0 1 0 0 0"), "not rigid"),
    "scale": (_tfm("ScaleTransform_double_3_3", "2 2 2"), "not rigid"),
    "bspline": (_tfm("BSplineTransform_double_3_3", "0 0 0"), "deformable"),
    "field": (_tfm("DisplacementFieldTransform_double_3_3", "", ""), "deformable"),
    "unknown": (_tfm("QuaternionRigidTransform_double_3_3", "0 0 0 1 0 0 0"), "unsupported transform type"),
    "garbage-type": (_tfm("Euler3D Transform", "0 0 0 0 0 0"), "not an ITK transform type"),
    "2d": (_tfm("Euler2DTransform_double_2_2", "0 0 0", "0 0"), "expected a 3D transform"),
    "versor-norm": (_tfm("VersorRigid3DTransform_double_3_3", "1 1 0 0 0 0"), "norm above 1"),
    "zyx-flag": (_tfm("Euler3DTransform_double_3_3", "0 0 0 0 0 0", "0 0 0 7"), "ComputeZYX"),
    "no-fixed": (
        f"{HEADER}Transform: TranslationTransform_double_3_3\nParameters: 1 2 3\n",
        "no FixedParameters",
    ),
    "no-header": (
        "Transform: TranslationTransform_double_3_3\nParameters: 1 2 3\nFixedParameters:\n",
        "first line",
    ),
    "no-transform": (HEADER, "holds no transform"),
    "values-first": (f"{HEADER}Parameters: 1 2 3\n", "before any 'Transform:'"),
    "two-parameters": (
        _tfm("TranslationTransform_double_3_3", "1 2 3", "") + "Parameters: 1 2 3\n",
        "a second",
    ),
    "stray-line": (
        _tfm("TranslationTransform_double_3_3", "1 2 3", "") + "Offset: 1\n",
        "expected 'Transform:'",
    ),
    "two-transforms": (_tfm("TranslationTransform_double_3_3", "1 2 3", "") * 2, "holds 2 transforms"),
    "empty-composite": (f"{HEADER}Transform: CompositeTransform_double_3_3\n", "holds no transforms"),
    "composite-values": (
        f"{HEADER}Transform: CompositeTransform_double_3_3\nParameters: 1\n"
        + _tfm("TranslationTransform_double_3_3", "1 2 3", "").replace(HEADER, ""),
        "a composite transform has no values",
    ),
    "nested-composite": (
        f"{HEADER}Transform: CompositeTransform_double_3_3\nTransform: CompositeTransform_double_3_3\n",
        "composite inside a composite",
    ),
    "composite-with-bspline": (
        f"{HEADER}Transform: CompositeTransform_double_3_3\n"
        + _tfm("BSplineTransform_double_3_3", "0", "0").replace(HEADER, ""),
        "transform 1: BSplineTransform is a deformable",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TEXT))
def test_malformed_text_transforms_are_refused_naming_the_file(tmp_path, case):
    text, message = BAD_TEXT[case]
    path = tmp_path / "bad.tfm"
    path.write_text(text)
    with pytest.raises(InputError, match="bad.tfm") as caught:
        geometry.read_transform(path)
    assert message in str(caught.value)


def test_binary_oversized_and_non_utf8_files_are_refused(tmp_path):
    cases = {
        "nul.tfm": HEADER.encode() + b"\0\0\0",
        "latin1.tfm": HEADER.encode() + "Transform: Eul\xe9r".encode("latin-1"),
        "big.tfm": HEADER.encode() + b"#" * (transform_files.MAX_TRANSFORM_FILE_BYTES + 1),
        "big.txt": b"1 0 0 0\n" * (transform_files.MAX_TRANSFORM_FILE_BYTES // 4),
    }
    messages = {
        "nul.tfm": "binary data",
        "latin1.tfm": "not UTF-8",
        "big.tfm": "too large",
        "big.txt": "too large",
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(InputError, match=messages[name]):
            geometry.read_transform(tmp_path / name)


def test_plain_matrix_text_is_parsed_strictly(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("# a comment\n1 0 0 5\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    np.testing.assert_array_equal(geometry.read_transform(path)[:3, 3], [5, 0, 0])
    for text, message in [
        ("1 0 0\n0 1 0\n0 0 1\n", "4x4"),
        ("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n0 0 0 1\n", "4x4"),
        ("1 0 0 nan\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", "NaN"),
        ("1 0 0 x\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", "not a number"),
    ]:
        path.write_text(text)
        with pytest.raises(InputError, match=message):
            geometry.read_transform(path)


def test_damaged_mat_files_are_refused(tmp_path):
    good = tmp_path / "good.mat"
    sitk.WriteTransform(_euler(), str(good))
    raw = good.read_bytes()
    damaged = {
        "empty": b"",
        "truncated-header": raw[:10],
        "truncated-data": raw[:60],
        "no-fixed": raw[: len(raw) // 2 + 8],
        "huge-rows": raw[:4] + (10**6).to_bytes(4, "little") + raw[8:],
        "bad-kind": (9999).to_bytes(4, "little") + raw[4:],
        "nan": raw.replace(np.float64(0.1).tobytes(), np.float64(np.nan).tobytes()),
        "trailing-matrix": raw + raw,
    }
    for name, data in damaged.items():
        path = tmp_path / f"{name}.mat"
        path.write_bytes(data)
        with pytest.raises(InputError, match=f"{name}.mat"):
            geometry.read_transform(path)


def test_mat_short_parameters_are_refused(tmp_path):
    """An Euler .mat whose parameter matrix holds 3 values instead of 6 (the .mat twin of the short line)."""
    name = b"Euler3DTransform_double_3_3\0"
    header = np.array([0, 3, 1, 0, len(name)], "<i4").tobytes()
    fixed = np.array([0, 4, 1, 0, 6], "<i4").tobytes() + b"fixed\0" + np.zeros(4).tobytes()
    path = tmp_path / "short.mat"
    path.write_bytes(header + name + np.array([0.1, 0.2, 0.3]).tobytes() + fixed)
    with pytest.raises(InputError, match="takes 6 parameters, the file has 3"):
        geometry.read_transform(path)


def test_xfm_linear_reads_and_other_forms_are_refused(tmp_path):
    path = tmp_path / "t.xfm"
    sitk.WriteTransform(_euler(), str(path))
    np.testing.assert_allclose(geometry.read_transform(path), geometry.from_sitk(_euler()), atol=1e-12)
    for text in [
        "MNI Transform File\nTransform_Type = Grid_Transform;\nDisplacement_Volume = f.mnc;\n",
        "MNI Transform File\nTransform_Type = Linear;\nLinear_Transform = 1 0 0 0 0 1 0 0 0 0 1;\n",
        "not MNI\n",
    ]:
        path.write_text(text)
        with pytest.raises(InputError, match="t.xfm"):
            geometry.read_transform(path)


def test_an_hdf5_transform_that_is_not_one_is_refused(tmp_path):
    path = tmp_path / "t.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 200)
    with pytest.raises(InputError, match=r"t\.h5: not a readable ITK HDF5 transform file"):
        geometry.read_transform(path)


def test_parse_numbers_accepts_itk_output_and_nothing_else():
    assert transform_files.parse_numbers("1 -2.5 .5 3e-7 +4E+2", "x") == (1.0, -2.5, 0.5, 3e-7, 400.0)
    for token in ("0x10", "1_0", "1,0", "--1", "e5", "infinity", "NaN"):
        with pytest.raises(InputError):
            transform_files.parse_numbers(token, "x")
