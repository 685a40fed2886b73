"""Tests of airreg.data: case folders, image validation, landmarks, splits, rigid fit and the µRegPro reader."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from airreg import data, geometry
from airreg.errors import InputError
from airreg.geometry import RigidTransform

GT = RigidTransform((4.0, -3.0, 10.0), (2.0, -5.0, 1.5), (0.0, 0.0, 0.0)).matrix


def make_image(size=(12, 11, 10), spacing=(0.8, 0.9, 1.5), origin=(-5.0, 3.0, 7.0), seed=0) -> sitk.Image:
    """A small float32 volume with an oblique direction and non-trivial content."""
    array = np.random.default_rng(seed).random(size[::-1]).astype(np.float32) * 100
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(geometry.rotation_matrix((10.0, -5.0, 20.0)).ravel().tolist())
    return image


def make_mask(like: sitk.Image, value: int = 1) -> sitk.Image:
    array = np.zeros(sitk.GetArrayViewFromImage(like).shape, np.uint8)
    array[3:7, 3:8, 2:9] = value
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(like)
    return mask


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def raises_naming(path: Path | str, match: str = ""):
    """pytest.raises(InputError) whose one-line message names ``path`` (and contains ``match``)."""
    return pytest.raises(InputError, match=re.escape(str(path)) + ".*" + match)


def assert_same_image(a: sitk.Image, b: sitk.Image, atol: float = 1e-5) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b), atol=atol)


# --- images -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"])
def test_read_image_formats(tmp_path: Path, suffix: str) -> None:
    image = make_image()
    path = write(sitk.Cast(image, sitk.sitkInt16), tmp_path / f"mr{suffix}")
    out = data.read_image(path)
    assert out.GetPixelID() == sitk.sitkFloat32
    assert_same_image(out, sitk.Cast(sitk.Cast(image, sitk.sitkInt16), sitk.sitkFloat32))
    assert data.find_image(tmp_path, "mr") == path


def write_dicom_series(image: sitk.Image, folder: Path, patient: str = "") -> None:
    """One DICOM file per slice with the geometry tags a series reader needs (and a PatientID if given)."""
    folder.mkdir()
    image = sitk.Cast(image, sitk.sitkInt16)
    d = image.GetDirection()
    common = {
        "0008|0060": "MR",
        "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
        "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
        "0020|000e": "1.2.826.0.1.3680043.2.1125.1.2",
        "0020|0037": "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0018|0050": f"{image.GetSpacing()[2]:.6f}",
        **({data.PATIENT_ID_KEY: patient} if patient else {}),
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        for tag, value in common.items():
            slice_.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        slice_.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))
        slice_.SetMetaData("0020|0013", str(k + 1))
        slice_.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.2.{k + 1}")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)


def test_read_dicom_series_folder(tmp_path: Path) -> None:
    image = make_image()
    write_dicom_series(image, tmp_path / "mr")
    assert data.find_image(tmp_path, "mr") == tmp_path / "mr"
    out = data.read_image(tmp_path / "mr")
    assert_same_image(out, sitk.Cast(sitk.Cast(image, sitk.sitkInt16), sitk.sitkFloat32))


def test_patient_id_is_kept_from_dicom_and_compared(tmp_path: Path) -> None:
    image = make_image()
    write_dicom_series(image, tmp_path / "mr", patient="PAT-001")
    write_dicom_series(image, tmp_path / "trus", patient="PAT-002")
    write_dicom_series(image, tmp_path / "same", patient="PAT-001")
    mr, trus, same = (data.read_image(tmp_path / name) for name in ("mr", "trus", "same"))
    assert data.patient_id(mr) == "PAT-001" and data.patient_id(trus) == "PAT-002"
    assert "PAT-001" in data.patient_mismatch(mr, trus) and "PAT-002" in data.patient_mismatch(mr, trus)
    assert data.patient_mismatch(mr, same) is None
    nifti = data.read_image(write(image, tmp_path / "trus.nii.gz"))
    assert data.patient_id(nifti) is None
    assert data.patient_mismatch(mr, nifti) is None  # unknown identity: nothing to compare


def test_empty_folder_is_not_a_dicom_series(tmp_path: Path) -> None:
    (tmp_path / "trus").mkdir()
    with raises_naming(tmp_path / "trus", "no DICOM"):
        data.read_image(tmp_path / "trus", "TRUS image")


def _bad_image(kind: str, path: Path) -> None:
    if kind == "unreadable":
        path.write_bytes(b"this is not an image")
        return
    arrays = {
        "2D": np.random.default_rng(0).random((8, 9)),
        "one slice": np.random.default_rng(0).random((1, 8, 9)),
        "constant": np.full((4, 5, 6), 3.0),
        "empty": np.zeros((4, 5, 6)),
        "NaN": np.where(np.eye(6, dtype=bool)[:4, :5, None], np.nan, 1.0) * np.arange(6),
        "4D": np.random.default_rng(0).random((2, 4, 5, 6)),
    }
    if kind == "vector":
        sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((4, 5, 6, 3))), str(path))
        return
    sitk.WriteImage(sitk.GetImageFromArray(arrays[kind].astype(np.float32), isVector=False), str(path))


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("unreadable", "not a readable"),
        ("2D", "is 2D"),
        ("one slice", "is 2D"),
        ("constant", "constant"),
        ("empty", "constant"),
        ("NaN", "NaN"),
        ("4D", "4D"),
        ("vector", "components"),
    ],
)
def test_bad_images_raise_naming_the_file(tmp_path: Path, kind: str, message: str) -> None:
    path = tmp_path / "mr.mha"  # ITK's NIfTI reader turns NaN into 0, MetaImage keeps it
    _bad_image(kind, path)
    before = path.read_bytes()
    with raises_naming(path, message) as info:
        data.read_image(path, "MR image")
    assert "\n" not in str(info.value)
    assert path.read_bytes() == before


def test_missing_image(tmp_path: Path) -> None:
    with raises_naming(tmp_path / "nope.nrrd", "not found"):
        data.read_image(tmp_path / "nope.nrrd")


def test_read_mask(tmp_path: Path) -> None:
    image = make_image()
    path = write(make_mask(image, 255), tmp_path / "mr_prostate.nrrd")
    mask = data.read_mask(path)
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(mask))) == {0, 1}
    write(sitk.Cast(make_mask(image, 0), sitk.sitkFloat32), tmp_path / "empty.nrrd")
    with raises_naming(tmp_path / "empty.nrrd", "empty"):
        data.read_mask(tmp_path / "empty.nrrd")
    write(image, tmp_path / "grey.nrrd")
    with raises_naming(tmp_path / "grey.nrrd", "not a mask"):
        data.read_mask(tmp_path / "grey.nrrd")


def test_find_image(tmp_path: Path) -> None:
    assert data.find_image(tmp_path, "mr") is None
    write(make_image(), tmp_path / "mr_prostate.nii.gz")
    assert data.find_image(tmp_path, "mr") is None
    write(make_image(), tmp_path / "mr.nii.gz")
    write(make_image(), tmp_path / "mr.mha")
    with raises_naming(tmp_path, "several"):
        data.find_image(tmp_path, "mr")


# --- landmarks ----------------------------------------------------------------------------------------

HEADER = "name,mr_x,mr_y,mr_z,trus_x,trus_y,trus_z\n"


def test_landmarks_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    mr, trus = rng.normal(size=(4, 3)) * 30, rng.normal(size=(4, 3)) * 30
    path = data.write_landmarks(tmp_path / "landmarks.csv", ["apex", "base", "a b", "d"], mr, trus)
    names, mr_out, trus_out = data.read_landmarks(path)
    assert names == ("apex", "base", "a b", "d")
    np.testing.assert_allclose(mr_out, mr, rtol=1e-9)
    np.testing.assert_allclose(trus_out, trus, rtol=1e-9)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,mr_x,mr_y,mr_z,trus_x,trus_y\napex,1,2,3,4,5\n", "missing column"),
        (HEADER + "apex,1,2,3,4,5,x\n", "non-numeric"),
        (HEADER + "apex,1,2,3,4,5,6\nbase,1,2,3\n", "line 3 does not pair up"),
        (HEADER + "apex,1,2,3,,5,6\n", "does not pair up"),
        (HEADER + "apex,1,2,3,4,5,6\napex,1,2,3,4,5,6\n", "duplicate"),
        (HEADER + "apex,1,2,nan,4,5,6\n", "NaN"),
        (HEADER, "no landmarks"),
        ("", "missing column"),
    ],
)
def test_bad_landmarks(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "landmarks.csv"
    path.write_text(text)
    with raises_naming(path, message):
        data.read_landmarks(path)


# --- case folders -------------------------------------------------------------------------------------


def full_case(folder: Path) -> dict:
    mr, trus = make_image(seed=1), make_image(size=(10, 12, 9), origin=(1.0, 2.0, 3.0), seed=2)
    rng = np.random.default_rng(3)
    landmarks = (["a", "b", "c"], rng.normal(size=(3, 3)), rng.normal(size=(3, 3)))
    parts = dict(
        mr=mr, trus=trus, gt=GT, landmarks=landmarks, mr_mask=make_mask(mr), trus_mask=make_mask(trus)
    )
    data.write_case(folder, **parts)
    return parts


def test_write_read_case_round_trip(tmp_path: Path) -> None:
    parts = full_case(tmp_path / "case01")
    case = data.read_case(tmp_path / "case01", require_gt=True)
    assert case.case_id == "case01" and case.folder == tmp_path / "case01"
    assert_same_image(case.mr, parts["mr"])
    assert_same_image(case.trus, parts["trus"])
    assert_same_image(case.mr_mask, parts["mr_mask"])
    assert_same_image(case.trus_mask, parts["trus_mask"])
    assert case.mr.GetPixelID() == sitk.sitkFloat32 and case.mr_mask.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(case.gt, GT, atol=1e-9)
    assert case.landmark_names == ("a", "b", "c")
    np.testing.assert_allclose(case.landmarks_mr, parts["landmarks"][1], rtol=1e-9)
    np.testing.assert_allclose(case.landmarks_trus, parts["landmarks"][2], rtol=1e-9)
    assert not list((tmp_path / "case01").glob(".*")), "no temporary files left behind"


def test_minimal_case_and_missing_parts(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    data.write_case(folder, make_image(seed=1), make_image(seed=2))
    case = data.read_case(folder)
    assert (
        case.gt is None and case.landmarks_mr is None and case.mr_mask is None and case.landmark_names == ()
    )
    with raises_naming(folder, "gt.tfm"):
        data.read_case(folder, require_gt=True)
    (folder / "trus.nii.gz").unlink()
    with raises_naming(folder, "no trus image"):
        data.read_case(folder)
    with raises_naming(tmp_path / "absent", "not found"):
        data.read_case(tmp_path / "absent")


def test_write_case_checks_gt_before_writing(tmp_path: Path) -> None:
    with raises_naming(tmp_path / "c" / "gt.tfm", "not rigid"):
        data.write_case(tmp_path / "c", make_image(seed=1), make_image(seed=2), gt=np.diag([2.0, 1, 1, 1]))
    assert not (tmp_path / "c").exists()


def test_write_case_refuses_to_make_a_case_ambiguous(tmp_path: Path) -> None:
    existing = write(make_image(), tmp_path / "c" / "mr.nrrd")
    before = existing.read_bytes()
    with raises_naming(existing, "ambiguous"):
        data.write_case(tmp_path / "c", make_image(seed=1), make_image(seed=2))
    assert existing.read_bytes() == before
    assert not (tmp_path / "c" / "trus.nii.gz").exists()


def test_list_and_load_dataset(tmp_path: Path) -> None:
    for name in ("b", "a"):
        data.write_case(tmp_path / name, make_image(seed=1), make_image(seed=2), gt=GT)
    write(make_image(), tmp_path / "not_a_case" / "mr.nii.gz")
    (tmp_path / "readme.txt").write_text("x")
    assert data.list_cases(tmp_path) == [tmp_path / "a", tmp_path / "b"]
    cases = data.load_dataset(tmp_path, progress=False)
    assert [c.case_id for c in cases] == ["a", "b"]
    with raises_naming(tmp_path / "not_a_case", "no cases"):
        data.load_dataset(tmp_path / "not_a_case", progress=False)
    with raises_naming(tmp_path / "missing", "not found"):
        data.list_cases(tmp_path / "missing")


# --- splits -------------------------------------------------------------------------------------------

ids_strategy = st.lists(st.text("abc0123", min_size=1, max_size=6), min_size=0, max_size=40, unique=True)


@settings(max_examples=80, deadline=None)
@given(ids_strategy, st.integers(0, 10**6), st.sampled_from([0.0, 0.1, 1 / 6, 0.5, 0.9]))
def test_split_properties(ids: list[str], seed: int, fraction: float) -> None:
    train, val = data.split_cases(ids, fraction, seed)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(ids)
    assert (train, val) == data.split_cases(list(reversed(ids)), fraction, seed)
    assert train == sorted(train) and val == sorted(val)
    if len(ids) >= 2:
        assert train and val


def test_split_default_is_five_to_one_and_seeded() -> None:
    ids = [f"case{i:03d}" for i in range(60)]
    train, val = data.split_cases(ids)
    assert (len(train), len(val)) == (50, 10)
    assert len({tuple(data.split_cases(ids, seed=s)[1]) for s in range(5)}) > 1
    assert data.split_cases(["only"]) == (["only"], [])
    with pytest.raises(InputError):
        data.split_cases(["a", "a"])
    with pytest.raises(InputError):
        data.split_cases(["a", "b"], val_fraction=1.0)


# --- rigid fit and mask sampling ----------------------------------------------------------------------

coord = st.floats(-100.0, 100.0)


@settings(max_examples=60, deadline=None)
@given(
    st.tuples(st.floats(-180, 180), st.floats(-180, 180), st.floats(-180, 180)),
    st.tuples(coord, coord, coord),
    st.integers(3, 12),
    st.integers(0, 1000),
)
def test_fit_rigid_recovers_a_known_transform(angles, translation, n, seed) -> None:
    truth = RigidTransform(angles, translation).matrix
    src = np.random.default_rng(seed).uniform(-40, 40, size=(n, 3))
    np.testing.assert_allclose(data.fit_rigid(src, geometry.apply(truth, src)), truth, atol=1e-6)


def test_fit_rigid_is_least_squares_with_noise() -> None:
    rng = np.random.default_rng(0)
    src = rng.uniform(-40, 40, size=(200, 3))
    dst = geometry.apply(GT, src) + rng.normal(scale=0.5, size=src.shape)
    fit = data.fit_rigid(src, dst)
    assert np.abs(fit - GT).max() < 0.2
    geometry.check_rigid(fit)


@pytest.mark.parametrize(
    "src",
    [np.zeros((0, 3)), np.eye(3)[:2], np.outer(np.arange(5.0), [1.0, 2.0, 3.0]), np.full((4, 3), 7.0)],
    ids=["none", "two", "collinear", "coincident"],
)
def test_fit_rigid_needs_three_non_collinear_points(src: np.ndarray) -> None:
    with pytest.raises(InputError, match="non-collinear"):
        data.fit_rigid(src, src)


def test_points_in_mask(tmp_path: Path) -> None:
    mask = make_mask(make_image())
    pts = data.points_in_mask(mask, 20, seed=4)
    assert pts.shape == (20, 3)
    np.testing.assert_array_equal(pts, data.points_in_mask(mask, 20, seed=4))
    for p in pts:
        index = mask.TransformPhysicalPointToIndex(tuple(p))
        assert mask[index] == 1
    assert len(np.unique(np.round(pts, 6), axis=0)) == 20
    # farthest-point sampling reaches the mask's extent
    every_voxel = data.points_in_mask(mask, int(np.sum(sitk.GetArrayViewFromImage(mask))), seed=0)
    assert np.ptp(pts, axis=0).max() > 0.9 * np.ptp(every_voxel, axis=0).max()
    with pytest.raises(InputError, match="only"):
        data.points_in_mask(mask, 10**6, seed=0)


# --- µRegPro ------------------------------------------------------------------------------------------

CENTRES = [(5, 5, 4), (2, 2, 2), (9, 3, 6), (4, 9, 2), (8, 8, 7)]  # voxel (x, y, z) of label channels 0..4


def label_array(size=(12, 11, 10), empty=()) -> np.ndarray:
    """(channel, z, y, x) uint8 labels: channel 0 a gland box, further channels small blobs."""
    labels = np.zeros((len(CENTRES), *size[::-1]), np.uint8)
    for k, (x, y, z) in enumerate(CENTRES):
        if k not in empty:
            r = 3 if k == 0 else 1
            labels[k, max(z - r, 0) : z + r, max(y - r, 0) : y + r + 1, max(x - r, 0) : x + r + 1] = 1
    return labels


def as_4d(labels: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(labels, isVector=False)
    direction = np.eye(4)
    direction[:3, :3] = np.reshape(like.GetDirection(), (3, 3))
    image.SetOrigin((*like.GetOrigin(), 0.0))
    image.SetSpacing((*like.GetSpacing(), 1.0))
    image.SetDirection(direction.ravel().tolist())
    return image


def as_vector(labels: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.moveaxis(labels, 0, -1), isVector=True)
    image.CopyInformation(like)
    return image


def moved_grid(image: sitk.Image, matrix: np.ndarray) -> sitk.Image:
    """The same voxels on a grid moved by ``matrix`` (so physical points map exactly by ``matrix``)."""
    out = sitk.Image(image)
    out.SetOrigin(geometry.apply(matrix, np.array(image.GetOrigin())).tolist())
    out.SetDirection((matrix[:3, :3] @ np.reshape(image.GetDirection(), (3, 3))).ravel().tolist())
    return out


def write_muregpro_case(split: Path, name: str, gt=GT, us_channels=None, empty=()) -> None:
    mr = make_image(seed=5)
    us = moved_grid(make_image(seed=6), gt)
    labels = label_array(empty=empty)
    write(mr, split / "mr_images" / f"{name}.nii.gz")
    write(us, split / "us_images" / f"{name}.nii.gz")
    write(as_4d(labels, mr), split / "mr_labels" / f"{name}.nii.gz")
    write(as_vector(labels[:us_channels], us), split / "us_labels" / f"{name}.nii.gz")


def test_muregpro_tree_reads_with_recovered_gt(tmp_path: Path) -> None:
    root = tmp_path / "muregpro"
    write_muregpro_case(root / "nifti_data" / "train", "case000001")
    write_muregpro_case(root / "nifti_data" / "train", "case000000", empty=(3,))
    write_muregpro_case(root / "nifti_data" / "val", "case000065")
    for folder in (root, root / "nifti_data"):
        assert data.is_muregpro(folder)
        assert [name for _, name in data.list_muregpro_cases(folder)] == [
            "case000000",
            "case000001",
            "case000065",
        ]
    assert data.list_muregpro_cases(root / "nifti_data" / "val") == [
        (root / "nifti_data" / "val", "case000065")
    ]
    assert not data.is_muregpro(tmp_path)

    cases = data.load_dataset(root, progress=False)
    assert [c.case_id for c in cases] == ["case000000", "case000001", "case000065"]
    for case in cases:
        np.testing.assert_allclose(case.gt, GT, atol=1e-6)
        np.testing.assert_allclose(geometry.apply(case.gt, case.landmarks_mr), case.landmarks_trus, atol=1e-6)
        assert case.mr_mask.GetPixelID() == sitk.sitkUInt8 and case.trus_mask.GetDimension() == 3
    assert cases[0].landmark_names == ("label00", "label01", "label02", "label04")
    assert cases[1].landmark_names == ("label00", "label01", "label02", "label03", "label04")
    # the gland centroid is label00, in LPS mm
    mr = cases[1].mr
    np.testing.assert_allclose(
        cases[1].landmarks_mr[0], mr.TransformContinuousIndexToPhysicalPoint((5, 5, 3.5))
    )
    assert data.read_case(data.list_cases(root)[1]).case_id == "case000001"


def test_muregpro_missing_channels(tmp_path: Path) -> None:
    split = tmp_path / "train"
    write_muregpro_case(split, "case000003", us_channels=3)
    with raises_naming(split / "us_labels" / "case000003.nii.gz", "missing channels"):
        data.read_muregpro_case(split, "case000003")
    (split / "us_labels" / "case000003.nii.gz").unlink()
    with raises_naming(split / "us_labels" / "case000003.nii.gz", "missing"):
        data.load_dataset(tmp_path, progress=False)


def test_muregpro_missing_image_and_too_few_landmarks(tmp_path: Path) -> None:
    split = tmp_path / "val"
    write_muregpro_case(split, "case000070", empty=(2, 3, 4))
    with raises_naming(split / "mr_labels" / "case000070.nii.gz", "non-collinear"):
        data.read_muregpro_case(split, "case000070.nii.gz")
    (split / "us_images" / "case000070.nii.gz").unlink()
    with raises_naming(split / "us_images" / "case000070.nii.gz", "missing"):
        data.read_muregpro_case(split, "case000070")


def test_muregpro_without_labels_has_no_gt(tmp_path: Path) -> None:
    split = tmp_path / "val"
    write_muregpro_case(split, "case000080")
    for sub in ("mr_labels", "us_labels"):
        (split / sub / "case000080.nii.gz").unlink()
        (split / sub).rmdir()
    assert data.read_muregpro_case(split, "case000080").gt is None
    with raises_naming(split / "mr_labels", "no ground truth"):
        data.load_dataset(split, progress=False)


# --- masks against their image, float64 range, truncated NIfTI (issue 14) ------------------------------------


def _box_image(size=(20, 20, 10), spacing=(1.0, 1.0, 2.0), origin=(5.0, -3.0, 7.0)) -> sitk.Image:
    image = sitk.Image(size, sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


@pytest.mark.parametrize(("shift_mm", "accepted"), [(0.0, True), (4.0, True), (15.0, False), (500.0, False)])
def test_a_mask_must_lie_mostly_inside_its_image(shift_mm, accepted):
    image = _box_image()
    mask = _box_image()
    mask[:, :, :] = (
        1  # the mask fills the image's grid: shifted by x mm along x, (20 - x) / 20 of it stays inside
    )
    mask.SetOrigin((5.0 + shift_mm, -3.0, 7.0))
    if accepted:
        data.check_mask_inside(mask, image, Path("mr_prostate.nii.gz"), "MR image")
    else:
        with pytest.raises(InputError, match=r"mr_prostate\.nii\.gz: mask does not overlap the MR image"):
            data.check_mask_inside(mask, image, Path("mr_prostate.nii.gz"), "MR image")


def test_float64_values_beyond_float32_are_named_not_called_nan(tmp_path):
    array = np.linspace(-1e300, 1e300, 8 * 8 * 8).reshape(8, 8, 8)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "huge.nrrd"))
    with pytest.raises(
        InputError,
        match=r"huge\.nrrd: MR image has intensities from -1e\+300 to 1e\+300, beyond what float32 can hold",
    ):
        data.read_image(tmp_path / "huge.nrrd", "MR image")
    sitk.WriteImage(sitk.GetImageFromArray(array * 1e-290), str(tmp_path / "fine.nrrd"))
    assert data.read_image(tmp_path / "fine.nrrd").GetPixelID() == sitk.sitkFloat32


@pytest.mark.parametrize("name", ["t.nii", "t.nii.gz"])
def test_a_truncated_nifti_is_refused_not_filled_with_zeros(tmp_path, name):
    array = np.arange(16 * 16 * 16, dtype=np.float32).reshape(16, 16, 16)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / name))
    assert data.read_image(tmp_path / name).GetSize() == (16, 16, 16)
    raw = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(raw[: len(raw) * 3 // 4])
    with pytest.raises(InputError, match="is truncated"):
        data.read_image(tmp_path / name)


def test_landmarks_not_utf8_or_not_csv_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "landmarks.csv"
    header = "name,mr_x,mr_y,mr_z,trus_x,trus_y,trus_z\n"
    cases = {
        (header + "pr\xe9, 1,2,3,4,5,6\n").encode("latin-1"): "not UTF-8 text",
        bytes(range(256)) * 4: "not UTF-8 text",
        (header + "apex,1,2,3,4,5,6\0\n").encode(): "line 2 has a non-numeric coordinate",
        (
            header + "a" * 131073 + ",1,2,3,4,5,6\n"
        ).encode(): "line 2: not valid CSV (field larger than field limit",
        b"\xef\xbb\xbf" + (header + '"unterminated,1,2,3,4,5,6\n').encode(): "not valid CSV",
    }
    for raw, message in cases.items():
        path.write_bytes(raw)
        with pytest.raises(InputError, match="landmarks.csv: ") as caught:
            data.read_landmarks(path)
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_an_oversized_landmarks_file_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_LANDMARKS_FILE_BYTES", 100)
    path = tmp_path / "landmarks.csv"
    path.write_text("name,mr_x,mr_y,mr_z,trus_x,trus_y,trus_z\n" + "apex,1,2,3,4,5,6\n" * 10)
    with pytest.raises(InputError, match="too large for a landmarks file"):
        data.read_landmarks(path)
