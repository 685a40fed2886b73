"""Image files are checked before ITK reads their voxels (airreg.image_files, through data.read_image)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from airreg import data, image_files, intensity
from airreg.errors import InputError


def _volume(dtype=np.float32, shape=(6, 7, 8)) -> np.ndarray:
    return np.random.default_rng(0).uniform(1, 100, shape).astype(dtype)


def _write(path, array: np.ndarray) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_voxels_are_refused_in_every_format(tmp_path, suffix, dtype, bad):
    array = _volume(dtype)
    array[2, 3, 4] = bad
    path = tmp_path / f"mr{suffix}"
    _write(path, array)
    with pytest.raises(InputError, match=rf"mr{suffix.replace('.', '[.]')}: MR image contains NaN or Inf"):
        data.read_image(path, "MR image")


def test_itk_alone_hides_nifti_nan_which_is_why_the_raw_check_exists(tmp_path):
    array = _volume()
    array[0, 0, 0] = np.nan
    _write(tmp_path / "a.nii.gz", array)
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a.nii.gz")))).all()
    assert image_files.nifti_problem(tmp_path / "a.nii.gz") == "contains NaN or Inf voxels"


def test_clean_and_integer_nifti_pass(tmp_path):
    for name, array in {"f.nii.gz": _volume(), "i.nii": _volume(np.int16)}.items():
        _write(tmp_path / name, array)
        assert image_files.nifti_problem(tmp_path / name) is None
        np.testing.assert_allclose(sitk.GetArrayFromImage(data.read_image(tmp_path / name)), array)


def _nifti2(values: np.ndarray) -> bytes:
    """A minimal little-endian single-file NIfTI-2 image of float32 values (header, 4-byte extension, data)."""
    header = bytearray(540)
    header[0:4] = np.int32(540).tobytes()
    header[4:12] = b"n+2\0\r\n\x1a\n"
    header[12:14] = np.int16(16).tobytes()
    header[14:16] = np.int16(32).tobytes()
    header[16:80] = np.array([3, *values.shape[::-1], 1, 1, 1, 1], "<i8").tobytes()
    header[104:168] = np.ones(8, "<f8").tobytes()  # pixdim
    header[168:176] = np.int64(544).tobytes()
    return bytes(header) + b"\0" * 4 + values.astype("<f4").tobytes()


def test_nifti2_data_blocks_are_checked(tmp_path):
    values = _volume()
    (tmp_path / "ok.nii").write_bytes(_nifti2(values))
    assert image_files.nifti_problem(tmp_path / "ok.nii") is None
    values[-1, -1, -1] = np.nan
    (tmp_path / "bad.nii.gz").write_bytes(gzip.compress(_nifti2(values)))
    assert image_files.nifti_problem(tmp_path / "bad.nii.gz") == "contains NaN or Inf voxels"


def test_truncated_and_damaged_nifti_are_refused(tmp_path):
    _write(tmp_path / "t.nii", _volume())
    raw = (tmp_path / "t.nii").read_bytes()
    (tmp_path / "short.nii").write_bytes(raw[:400])
    with pytest.raises(
        InputError, match=r"short\.nii: MR image is truncated \(its data block holds 12 of the 336"
    ):
        data.read_image(tmp_path / "short.nii", "MR image")
    (tmp_path / "junk.nii.gz").write_bytes(b"\x1f\x8b" + raw[:300])
    with pytest.raises(InputError, match=r"junk\.nii\.gz: MR image is not a readable image file"):
        data.read_image(tmp_path / "junk.nii.gz", "MR image")


def test_a_header_declaring_too_many_voxels_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.nrrd"
    header = b"NRRD0004\ntype: float\ndimension: 3\nsizes: 1500 1500 1500\nencoding: raw\nendian: little\n\n"
    path.write_bytes(header + np.zeros(1000, np.float32).tobytes())
    with pytest.raises(InputError, match=r"huge\.nrrd: TRUS image declares 1500x1500x1500 voxels"):
        data.read_image(path, "TRUS image")


def test_the_voxel_limit_is_overridable(tmp_path, monkeypatch):
    _write(tmp_path / "mr.nii.gz", _volume())
    monkeypatch.setenv(image_files.MAX_VOXELS_ENV, "300")
    with pytest.raises(InputError, match="more than the limit of 300"):
        data.read_image(tmp_path / "mr.nii.gz")
    monkeypatch.setenv(image_files.MAX_VOXELS_ENV, str(6 * 7 * 8))
    assert data.read_image(tmp_path / "mr.nii.gz").GetSize() == (8, 7, 6)
    monkeypatch.setenv(image_files.MAX_VOXELS_ENV, "lots")
    with pytest.raises(InputError, match="AIRREG_MAX_VOXELS"):
        data.read_image(tmp_path / "mr.nii.gz")
    monkeypatch.delenv(image_files.MAX_VOXELS_ENV)
    assert image_files.max_voxels() == image_files.DEFAULT_MAX_VOXELS


def test_an_mr_of_only_float32_extremes_is_refused_naming_the_file(tmp_path):
    top = np.finfo(np.float32).max
    array = np.full((6, 7, 8), top, np.float32)
    array[::2] = -top
    _write(tmp_path / "mr.nii.gz", array)
    with pytest.raises(InputError, match=r"mr\.nii\.gz: MR image has intensities from -3.4e\+38 to 3.4e\+38"):
        data.read_image(tmp_path / "mr.nii.gz", "MR image")
    with pytest.raises(InputError, match="MR image: intensities span"):
        intensity.normalize(array, mask=np.ones(array.shape, bool), what="MR image")


def test_extreme_voxels_outside_the_sample_clip_without_overflow_warnings():
    top = np.finfo(np.float32).max
    array = np.linspace(1.0, 2.0, 100, dtype=np.float32)
    array[0] = -top
    with np.errstate(all="raise"):
        out = intensity.normalize(array, mask=array > 0)
    assert out[0] == 0.0 and out[-1] == 1.0


def test_truncated_gzip_and_integer_nifti_are_refused_although_itk_reads_them_as_zeros(tmp_path):
    _write(tmp_path / "t.nii", _volume())
    packed = gzip.compress((tmp_path / "t.nii").read_bytes())
    (tmp_path / "cut.nii.gz").write_bytes(packed[: len(packed) // 2])
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cut.nii.gz"))) == 0).any()  # ITK: no error
    with pytest.raises(InputError, match=r"cut\.nii\.gz: MR image is truncated \(its gzip data ends early\)"):
        data.read_image(tmp_path / "cut.nii.gz", "MR image")
    _write(tmp_path / "i.nii", _volume(np.int16))
    (tmp_path / "short-int.nii").write_bytes((tmp_path / "i.nii").read_bytes()[:1000])
    with pytest.raises(
        InputError, match=r"short-int\.nii: MR image is truncated \(its data block holds 648 of"
    ):
        data.read_image(tmp_path / "short-int.nii", "MR image")


def test_a_nifti_header_with_a_voxel_size_that_is_not_positive_is_refused(tmp_path):
    """ITK would take 1 mm (with a warning nobody sees) or the sform's scales instead."""
    _write(tmp_path / "t.nii", _volume())
    raw = bytearray((tmp_path / "t.nii").read_bytes())
    for name, values in {
        "zero.nii": [0.0, 0.0, 0.0],
        "nan.nii": [np.nan, 1.0, 1.0],
        "neg.nii": [1, -1, 1],
    }.items():
        raw[80:92] = np.asarray(values, "<f4").tobytes()  # pixdim[1:4]
        (tmp_path / name).write_bytes(bytes(raw))
        with pytest.raises(InputError, match=rf"{name}: MR image has an invalid voxel (size|spacing)"):
            data.read_image(tmp_path / name, "MR image")


def test_itk_output_while_reading_becomes_part_of_the_one_line_error(tmp_path, capfd):
    _write(tmp_path / "t.nii", _volume())
    raw = bytearray((tmp_path / "t.nii").read_bytes())
    raw[40:42] = np.int16(8).tobytes()  # dim[0] = 8: niftilib prints "** ERROR: ... bad dim[0]"
    (tmp_path / "dim.nii").write_bytes(bytes(raw))
    with pytest.raises(
        InputError, match=r"dim\.nii: MR image is not a readable image file \(.*bad dim\[0\]\)"
    ):
        data.read_image(tmp_path / "dim.nii", "MR image")
    assert capfd.readouterr().err == ""


def test_a_header_with_a_singular_direction_is_refused(tmp_path):
    header = (
        "ObjectType = Image\nNDims = 3\nDimSize = 8 7 6\nElementType = MET_FLOAT\nElementSpacing = 1 1 3\n"
    )
    path = tmp_path / "flat.mha"
    path.write_bytes(
        (header + "TransformMatrix = 1 0 0 1 0 0 0 0 1\nElementDataFile = LOCAL\n").encode()
        + _volume().tobytes()
    )
    with pytest.raises(InputError, match=r"flat\.mha: MR image has an invalid direction matrix"):
        data.read_image(path, "MR image")
