"""The readers' bad-input suite: hostile images, transform files, model files and landmarks through ``airreg``.

Each row is one bad input file given to the real command line (``register``, ``score`` or ``evaluate``), run in
its own child process: a zygote process imports ``airreg`` (and torch) once, then forks one child per row that
runs ``airreg.cli.main`` exactly as the console script does (an uncaught exception prints a traceback and exits
1). A native crash therefore fails its own row, not the test run. For each row: exit status 2, stderr is exactly
one line, ``airreg <command>: error: <file>: ...``, naming the bad file and what was wrong; no traceback; the
SHA-256 of every input unchanged; no file in the row's output folder. The last test fuzzes the three text and
model readers in a child process (``fuzz_readers.py``).

Run it alone with ``pytest -m badinput Testing/test_bad_inputs_readers.py``.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from airreg import checkpoint
from conftest import make_case, write_synthetic_case
from test_checkpoint import minimal_state
from test_transform_files import BAD_TEXT, EMPTY_PARAMETERS, _tfm

pytestmark = pytest.mark.badinput

HERE = Path(__file__).resolve().parent
ROW_TIMEOUT_S = 120
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: A tqdm progress bar ("reading cases: 0%| | 0/1 [00:00<?, ?it/s]"); its line ending is the CLI suite's concern.
PROGRESS = re.compile(r"\d+%\|.*\|")


@dataclass(frozen=True)
class Row:
    """One bad input: ``argv`` tokens ``@name`` are paths in the workspace (``@out`` is the row's output folder);
    ``bad`` is the bad input's path token, whose file name the error must contain with ``expect``."""

    id: str
    argv: tuple[str, ...]
    bad: str
    expect: str


def register_mr(bad: str) -> tuple[str, ...]:
    return ("register", "--mr", bad, "--trus", "@trus", "--out-transform", "@out/t.tfm", "--device", "cpu")


def register_trus(bad: str) -> tuple[str, ...]:
    return ("register", "--mr", "@mr", "--trus", bad, "--out-transform", "@out/t.tfm", "--device", "cpu")


def register_init(bad: str) -> tuple[str, ...]:
    return (*register_mr("@mr"), "--init", bad)


def score_transform(bad: str) -> tuple[str, ...]:
    return ("score", "--mr", "@mr", "--trus", "@trus", "--transform", bad, "--device", "cpu")


def score_model(bad: str) -> tuple[str, ...]:
    return (*score_transform("@gt"), "--model", bad)


def evaluate_data(bad: str) -> tuple[str, ...]:
    return ("evaluate", "--data", bad, "--out", "@out/eval", "--device", "cpu", "--overlays", "0")


# --- bad images ---------------------------------------------------------------------------------------------


def _image(array: np.ndarray, vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(array, isVector=vector)
    if image.GetDimension() == 3:
        image.SetSpacing((1.0, 1.0, 3.0))
    return image


def _volume(dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(3).uniform(10, 100, (12, 32, 32)).astype(dtype)


def _with(array: np.ndarray, index, value) -> np.ndarray:
    array = array.copy()
    array[index] = value
    return array


def _nifti(array: np.ndarray, **fields) -> bytes:
    """An uncompressed NIfTI-1 file of ``array`` with header fields patched: name -> (offset, dtype, values)."""
    sitk.WriteImage(_image(array), "/dev/shm/airreg-nifti.nii" if Path("/dev/shm").is_dir() else "nifti.nii")
    raw = bytearray(Path("/dev/shm/airreg-nifti.nii").read_bytes())
    for offset, dtype, values in fields.values():
        patch = np.asarray(values, dtype=dtype).tobytes()
        raw[offset : offset + len(patch)] = patch
    return bytes(raw)


NRRD = "NRRD0004\ntype: float\ndimension: 3\nsizes: 32 32 12\nencoding: raw\nendian: little\n"
MHA = "ObjectType = Image\nNDims = 3\nDimSize = 32 32 12\nElementType = MET_FLOAT\nElementSpacing = 1 1 3\n"
IMAGES: dict[str, Callable[[], bytes | sitk.Image]] = {
    "nan-f32.nii": lambda: _image(_with(_volume(), (3, 4, 5), np.nan)),
    "nan-f32.nii.gz": lambda: _image(_with(_volume(), (0, 0, 0), np.nan)),
    "inf-f32.nii.gz": lambda: _image(_with(_volume(), (-1, -1, -1), np.inf)),
    "ninf-f64.nii": lambda: _image(_with(_volume(np.float64), (5, 5, 5), -np.inf)),
    "nan-f64.nii.gz": lambda: _image(_with(_volume(np.float64), (6, 6, 6), np.nan)),
    "nan.nrrd": lambda: _image(_with(_volume(), (1, 2, 3), np.nan)),
    "inf.mha": lambda: _image(_with(_volume(), (1, 2, 3), np.inf)),
    "all-nan.nii.gz": lambda: _image(np.full((12, 32, 32), np.nan, np.float32)),
    "huge-header.nrrd": lambda: (
        NRRD.replace("32 32 12", "1500 1500 1500").encode() + b"\n" + bytes(1_700_000)
    ),
    "huge-header.mha": lambda: (
        (MHA.replace("32 32 12", "2000 2000 2000") + "ElementDataFile = LOCAL\n").encode() + bytes(4096)
    ),
    "huge-header.nii": lambda: _nifti(_volume(np.int16), dim=(40, "<i2", [3, 30000, 30000, 30000])),
    "huge-4d-header.nii": lambda: _nifti(_volume(np.int16), dim=(40, "<i2", [4, 2000, 2000, 2000, 2000])),
    "truncated.nii": lambda: _nifti(_volume())[:2000],
    "truncated.nii.gz": lambda: gzip.compress(_nifti(_volume()))[:3000],
    "truncated-int16.nii": lambda: _nifti(_volume(np.int16))[:2000],
    "truncated.nrrd": lambda: NRRD.encode() + b"\n" + bytes(100),
    "empty.nii.gz": lambda: b"",
    "empty.nrrd": lambda: b"",
    "random.nii": lambda: np.random.default_rng(0).bytes(5000),
    "random.nii.gz": lambda: gzip.compress(np.random.default_rng(1).bytes(5000)),
    "text.nii.gz": lambda: b"this is not an image\n",
    "html.nrrd": lambda: b"<html><body>404</body></html>\n",
    "2d.nii.gz": lambda: _image(_volume()[0]),
    "4d.nii.gz": lambda: sitk.JoinSeries([_image(_volume()), _image(_volume())]),
    "vector.nii.gz": lambda: _image(np.stack([_volume()] * 3, axis=-1), vector=True),
    "slab.nii.gz": lambda: _image(_volume()[:1]),
    "constant.nii.gz": lambda: _image(np.full((12, 32, 32), 7.0, np.float32)),
    "float-extremes.nii.gz": lambda: _image(
        _with(np.full((12, 32, 32), FLOAT32_MAX, np.float32), slice(0, 6), -FLOAT32_MAX)
    ),
    "f64-1e300.nii": lambda: _image(_with(np.full((12, 32, 32), 1e300), slice(0, 6), -1e300)),
    "dim0-zero.nii": lambda: _nifti(_volume(), dim=(40, "<i2", [0])),
    "dim0-eight.nii": lambda: _nifti(_volume(), dim=(40, "<i2", [8])),
    "negative-dim.nii": lambda: _nifti(_volume(), dim=(40, "<i2", [3, -32, 32, 12])),
    "zero-dim.nii": lambda: _nifti(_volume(), dim=(40, "<i2", [3, 0, 32, 12])),
    "bad-datatype.nii": lambda: _nifti(_volume(), datatype=(70, "<i2", [9999])),
    "far-vox-offset.nii": lambda: _nifti(_volume(), vox_offset=(108, "<f4", [1e9])),
    "nan-spacing.nii": lambda: _nifti(_volume(), pixdim=(80, "<f4", [np.nan, 1.0, 3.0])),
    "zero-spacing.nii": lambda: _nifti(_volume(), pixdim=(80, "<f4", [0.0, 0.0, 0.0])),
    "nan-sform.nii": lambda: _nifti(_volume(), codes=(252, "<i2", [0, 1]), srow=(280, "<f4", [np.nan] * 12)),
    "singular-sform.nii": lambda: _nifti(
        _volume(), codes=(252, "<i2", [0, 1]), srow=(280, "<f4", [0.0] * 12)
    ),
    "bad-type.nrrd": lambda: NRRD.replace("float", "quaternion").encode() + b"\n" + _volume().tobytes(),
    "sizes-short.nrrd": lambda: NRRD.replace("32 32 12", "32 32").encode() + b"\n" + _volume().tobytes(),
    "missing-data.nhdr": lambda: (NRRD + "data file: nowhere.raw\n").encode(),
    "missing-data.mhd": lambda: (MHA + "ElementDataFile = nowhere.raw\n").encode(),
    "zero-spacing.mha": lambda: (
        (MHA.replace("1 1 3", "0 0 0") + "ElementDataFile = LOCAL\n").encode() + _volume().tobytes()
    ),
    "singular-direction.mha": lambda: (
        (MHA + "TransformMatrix = 0 0 0 0 0 0 0 0 0\nElementDataFile = LOCAL\n").encode()
        + _volume().tobytes()
    ),
}
#: What the error must say, by the start of the file name (the rest: an unreadable file).
IMAGE_EXPECT = {
    ("nan", "inf", "ninf", "all-nan"): "NaN or Inf",
    ("huge",): "declares .* voxels",
    ("truncated",): "truncated",
    ("2d", "slab"): "is 2D",
    ("4d",): "is 4D",
    ("vector",): "components per voxel",
    ("constant",): "constant",
    ("float-extremes", "f64-1e300"): "float32",
    ("nan-sform", "singular", "zero-spacing.mha"): "invalid (origin|direction|voxel spacing)|not a readable",
    ("far-vox-offset",): "truncated",
    ("nan-spacing", "zero-spacing.nii"): "pixdim",
}
IMAGE_AS_TRUS = ("nan-f32.nii.gz", "huge-header.nrrd", "truncated.nii", "4d.nii.gz", "float-extremes.nii.gz")


def _image_rows() -> list[Row]:
    rows = []
    for name in IMAGES:
        starts = [(len(p), e) for prefixes, e in IMAGE_EXPECT.items() for p in prefixes if name.startswith(p)]
        expect = max(starts)[1] if starts else "not a readable image file"
        rows.append(Row(f"mr-{name}", register_mr(f"@img/{name}"), f"@img/{name}", expect))
        if name in IMAGE_AS_TRUS:
            rows.append(Row(f"trus-{name}", register_trus(f"@img/{name}"), f"@img/{name}", expect))
    rows.append(Row("mr-missing", register_mr("@img/missing.nii.gz"), "@img/missing.nii.gz", "not found"))
    rows.append(Row("mr-empty-folder", register_mr("@img/empty-folder"), "@img/empty-folder", "no DICOM"))
    rows.append(Row("mr-junk-dicom-folder", register_mr("@img/junk-dicom"), "@img/junk-dicom", "DICOM"))
    return rows


def build_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name, make in IMAGES.items():
        content = make()
        if isinstance(content, sitk.Image):
            sitk.WriteImage(content, str(folder / name))
        else:
            (folder / name).write_bytes(content)
    (folder / "empty-folder").mkdir()
    (folder / "junk-dicom").mkdir()
    for i in range(3):
        (folder / "junk-dicom" / f"IM{i}.dcm").write_bytes(
            b"\0" * 128 + b"DICM" + np.random.default_rng(i).bytes(500)
        )


# --- bad transform files -----------------------------------------------------------------------------------


def _mat(name: bytes, parameters: list[float], fixed: list[float]) -> bytes:
    def matrix(label: bytes, values: list[float]) -> bytes:
        header = np.array([0, len(values), 1, 0, len(label) + 1], "<i4").tobytes()
        return header + label + b"\0" + np.asarray(values, "<f8").tobytes()

    return matrix(name, parameters) + matrix(b"fixed", fixed)


EULER_MAT = _mat(b"Euler3DTransform_double_3_3", [0.1, 0.2, 0.3, 1, 2, 3], [0, 0, 0, 0])
TRANSFORMS: dict[str, tuple[bytes, str]] = {
    **{f"{case}.tfm": (text.encode(), re.escape(message)) for case, (text, message) in BAD_TEXT.items()},
    **{f"empty-{t}.tfm": (_tfm(f"{t}_double_3_3", "").encode(), "takes") for t in EMPTY_PARAMETERS},
    "empty-params.txt": (_tfm("Euler3DTransform_double_3_3", "").encode(), "takes 6 parameters"),
    "short-euler.txt": (_tfm("Euler3DTransform_double_3_3", "0 0 1").encode(), "takes 6 parameters"),
    "empty.tfm": (b"", "first line"),
    "nul.tfm": (b"#Insight Transform File V1.0\n\0\0\0", "binary data"),
    "latin1.tfm": ("#Insight Transform File V1.0\nTransform: \xe9\n".encode("latin-1"), "not UTF-8"),
    "huge.tfm": (b"#Insight Transform File V1.0\n" + b"#" * 2_000_000, "too large"),
    "matrix-3x3.txt": (b"1 0 0\n0 1 0\n0 0 1\n", "4x4"),
    "matrix-nan.txt": (b"1 0 0 nan\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", "NaN"),
    "matrix-scaled.txt": (b"2 0 0 0\n0 2 0 0\n0 0 2 0\n0 0 0 1\n", "not rigid"),
    "matrix-binary.txt": (
        np.random.default_rng(5).bytes(300).replace(b"\0", b"\1"),
        "not UTF-8|not a number|4x4",
    ),
    "empty.mat": (b"", "not an ITK .mat"),
    "short.mat": (EULER_MAT[:40], "damaged"),
    "short-params.mat": (
        _mat(b"Euler3DTransform_double_3_3", [0.1, 0.2, 0.3], [0, 0, 0, 0]),
        "takes 6 parameters",
    ),
    "empty-params.mat": (_mat(b"Euler3DTransform_double_3_3", [], [0, 0, 0, 0]), "takes 6 parameters"),
    "nan.mat": (_mat(b"Euler3DTransform_double_3_3", [np.nan, 0, 0, 1, 2, 3], [0, 0, 0, 0]), "NaN"),
    "bspline.mat": (_mat(b"BSplineTransform_double_3_3", [0.0] * 8, [0.0] * 4), "deformable"),
    "no-fixed.mat": (EULER_MAT[: EULER_MAT.index(b"fixed") - 20], "expected the parameters, then 'fixed'"),
    "random.mat": (np.random.default_rng(6).bytes(200), "not an ITK .mat"),
    "huge-rows.mat": (np.array([0, 2**30, 1, 0, 5], "<i4").tobytes() + b"abcd\0", "damaged"),
    "grid.xfm": (
        b"MNI Transform File\nTransform_Type = Grid_Transform;\nDisplacement_Volume = g.mnc;\n",
        "linear",
    ),
    "short.xfm": (
        b"MNI Transform File\nTransform_Type = Linear;\nLinear_Transform = 1 0 0 0 0 1 0 0 0 0 1;\n",
        "12",
    ),
    "not-mni.xfm": (b"hello\n", "MNI"),
    "junk.h5": (b"\x89HDF\r\n\x1a\n" + bytes(300), "HDF5"),
    "text.h5": (b"#Insight Transform File V1.0\n", "HDF5"),
    "transform.json": (b"{}", "unknown transform file type"),
}
TRANSFORM_VIA_SCORE = (
    "empty-Euler3DTransform.tfm",
    "short-euler.tfm",
    "bspline.tfm",
    "short-params.mat",
    "junk.h5",
)


def _transform_rows() -> list[Row]:
    rows = [Row(f"init-{n}", register_init(f"@tfm/{n}"), f"@tfm/{n}", m) for n, (_, m) in TRANSFORMS.items()]
    rows += [
        Row(f"score-{n}", score_transform(f"@tfm/{n}"), f"@tfm/{n}", TRANSFORMS[n][1])
        for n in TRANSFORM_VIA_SCORE
    ]
    rows.append(Row("init-missing", register_init("@tfm/missing.tfm"), "@tfm/missing.tfm", "not found"))
    return rows


def build_transforms(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name, (content, _) in TRANSFORMS.items():
        (folder / name).write_bytes(content)


# --- bad model files ---------------------------------------------------------------------------------------


class _Payload:
    """Pickled as a call to ``os.system``: what a malicious model file holds."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/airreg-readers-pwned",))


def _state_with(entry: str, value) -> dict:
    state = copy.deepcopy(minimal_state())
    keys = entry.split(".")
    if keys[0] in ("generator", "discriminator") and len(keys) > 1:
        keys = [keys[0], ".".join(keys[1:])]
    node = state
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return state


MODELS: dict[str, tuple[Callable[[], dict | bytes], str]] = {
    "format-version-text.pt": (lambda: _state_with("format_version", "1"), "format_version"),
    "generator-tensor.pt": (lambda: _state_with("generator", torch.zeros(3)), "generator must be a dict"),
    "patient-check-text.pt": (lambda: _state_with("patient_check", "yes"), "patient_check must be a dict"),
    "hidden-negative.pt": (lambda: _state_with("model_config.hidden", -1), "model_config.hidden"),
    "width-huge.pt": (lambda: _state_with("model_config.width", 10**7), "model_config.width"),
    "grid-5tb.pt": (
        lambda: _state_with("model_config.grid.size", (4, 100000, 100000)),
        "model_config.grid.size",
    ),
    "grid-spacing-nan.pt": (
        lambda: _state_with("model_config.grid.spacing", (math.nan, 1.0, 1.0)),
        "spacing",
    ),
    "dof-four.pt": (lambda: _state_with("model_config.dof", 4), "dof"),
    "config-missing.pt": (
        lambda: {k: v for k, v in minimal_state().items() if k != "model_config"},
        "lacks model_config",
    ),
    "critic-abcd.pt": (lambda: _state_with("calibration.statistic", "abcd"), "calibration.statistic"),
    "calibration-nan.pt": (lambda: _state_with("calibration.critic", [math.nan] * 4), "finite numbers only"),
    "calibration-all-nan.pt": (
        lambda: _state_with("calibration", {"critic": [math.nan] * 8, "tre_mm": [math.nan] * 8}),
        "finite numbers only",
    ),
    "calibration-short.pt": (lambda: _state_with("calibration.tre_mm", [1.0, 2.0]), "calibration.tre_mm"),
    "calibration-huge.pt": (lambda: _state_with("calibration.critic", [1e300, -1e300, 0.0, 1.0]), "within"),
    "calibration-text.pt": (lambda: _state_with("calibration", "good"), "calibration must be a dict"),
    "weights-nan.pt": (lambda: _state_with("generator.head.bias", torch.full((3,), math.nan)), "NaN or Inf"),
    "weights-shape.pt": (
        lambda: _state_with("discriminator.head.bias", torch.zeros(5)),
        "model_config implies",
    ),
    "weights-int.pt": (
        lambda: _state_with("generator.head.bias", torch.zeros(3, dtype=torch.int32)),
        "floating",
    ),
    "normalization-text.pt": (
        lambda: _state_with("preprocessing.normalization", "robust"),
        "normalization dict",
    ),
    "epoch-negative.pt": (lambda: _state_with("epoch", -5), "epoch"),
    "train-config-list.pt": (lambda: _state_with("train_config", [1, 2]), "train_config"),
    "code.pt": (lambda: {"format": checkpoint.FORMAT, "x": _Payload()}, "execute code"),
    "not-a-dict.pt": (lambda: [1, 2, 3], "not an AIRRegistration checkpoint"),
    "other-format.pt": (lambda: {"format": "something-else"}, "not an AIRRegistration checkpoint"),
    "newer-format.pt": (lambda: {"format": checkpoint.FORMAT, "format_version": 99}, "newer"),
    "empty.pt": (lambda: b"", "corrupt or not a model file"),
    "text.pt": (lambda: b"hello, I am a model\n", "corrupt or not a model file"),
    "random.pt": (lambda: np.random.default_rng(7).bytes(4000), "corrupt or not a model file"),
    "zip-not-torch.pt": (lambda: _zip_bytes(), "corrupt or not a model file"),
    "pickle-protocol-113.pt": (lambda: _odd_protocol(), "invalid model file|corrupt"),
    "pickle-protocol-0.pt": (
        lambda: pickle.dumps({"format": checkpoint.FORMAT}, protocol=0),
        "corrupt|not an AIR",
    ),
}


def _odd_protocol() -> bytes:
    """A legacy-format checkpoint whose pickle claims protocol 113 (torch.load warns, then reads on)."""
    buffer = io.BytesIO()
    torch.save({"format": checkpoint.FORMAT, **minimal_state()}, buffer, _use_new_zipfile_serialization=False)
    raw = bytearray(buffer.getvalue())
    raw[1] = 113
    return bytes(raw)


def _zip_bytes() -> bytes:
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(".")
    with zipfile.ZipFile(folder / "airreg-zip.zip", "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
    return (folder / "airreg-zip.zip").read_bytes()


def _model_rows() -> list[Row]:
    rows = [Row(f"model-{n}", score_model(f"@model/{n}"), f"@model/{n}", m) for n, (_, m) in MODELS.items()]
    rows.append(
        Row("model-truncated.pt", score_model("@model/truncated.pt"), "@model/truncated.pt", "corrupt")
    )
    rows.append(
        Row("model-sparse-20gb.pt", score_model("@model/sparse-20gb.pt"), "@model/sparse-20gb.pt", "larger")
    )
    rows.append(Row("model-missing.pt", score_model("@model/missing.pt"), "@model/missing.pt", "not found"))
    return rows


def build_models(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name, (make, _) in MODELS.items():
        content = make()
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        elif isinstance(content, dict) and "model_config" in content or name.startswith("config-"):
            checkpoint.save(folder / name, content)
        else:
            torch.save(content, folder / name)
    good = checkpoint.save(folder / "good.pt", minimal_state()).read_bytes()
    (folder / "truncated.pt").write_bytes(good[: len(good) // 2])
    with (folder / "sparse-20gb.pt").open("wb") as f:
        f.truncate(20 * 2**30)


# --- bad landmarks -----------------------------------------------------------------------------------------

LM_HEADER = "name,mr_x,mr_y,mr_z,trus_x,trus_y,trus_z\n"
LANDMARKS: dict[str, tuple[bytes, str]] = {
    "latin1": ((LM_HEADER + "pr\xe9,1,2,3,4,5,6\n").encode("latin-1"), "not UTF-8"),
    "binary": (np.random.default_rng(8).bytes(400), "not UTF-8|not valid CSV|missing column"),
    "utf16": ((LM_HEADER + "apex,1,2,3,4,5,6\n").encode("utf-16"), "not UTF-8|missing column"),
    "long-field": ((LM_HEADER + "a" * 131073 + ",1,2,3,4,5,6\n").encode(), "field larger than field limit"),
    "unterminated-quote": ((LM_HEADER + '"apex,1,2,3,4,5,6\n').encode(), "not valid CSV"),
    "nul": ((LM_HEADER + "apex,1,2,3,4,5,6\0\n").encode(), "non-numeric"),
    "nan": ((LM_HEADER + "apex,nan,2,3,4,5,6\n").encode(), "NaN or Inf"),
    "missing-column": (b"name,mr_x,mr_y\napex,1,2\n", "missing column"),
    "header-only": (LM_HEADER.encode(), "no landmarks"),
    "short-row": ((LM_HEADER + "apex,1,2,3\n").encode(), "does not pair up"),
    "duplicate": ((LM_HEADER + "a,1,2,3,4,5,6\na,1,2,3,4,5,6\n").encode(), "duplicate"),
    "empty": (b"", "missing column"),
}


def _landmark_rows() -> list[Row]:
    return [
        Row(f"landmarks-{n}", evaluate_data(f"@lm/{n}"), f"@lm/{n}/case0/landmarks.csv", m)
        for n, (_, m) in LANDMARKS.items()
    ]


def build_landmarks(folder: Path, case: Path) -> None:
    for name, (content, _) in LANDMARKS.items():
        target = folder / name / "case0"
        shutil.copytree(case, target)
        (target / "landmarks.csv").write_bytes(content)


ROWS = _image_rows() + _transform_rows() + _model_rows() + _landmark_rows()


# --- the workspace and the runner --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-readers")
    case = write_synthetic_case(root / "pair", make_case(7))
    build_images(root / "img")
    build_transforms(root / "tfm")
    build_models(root / "model")
    build_landmarks(root / "lm", case)
    (root / "out").mkdir()
    return root


def resolve(token: str, root: Path, out: Path) -> str:
    if not token.startswith("@"):
        return token
    head, _, rest = token[1:].partition("/")
    named = {"mr": "pair/mr.nii.gz", "trus": "pair/trus.nii.gz", "gt": "pair/gt.tfm"}
    base = out if head == "out" else root / named.get(head, head)
    return str(base / rest) if rest else str(base)


def digests(paths: list[Path]) -> dict[str, str]:
    """SHA-256 of the files among ``paths`` (and of the files under those that are folders)."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else [])]
    out = {}
    for f in files:
        if f.is_file() and f.stat().st_size < 2**30:  # the sparse 20 GB file is checked by size below
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
        elif f.is_file():
            out[str(f)] = str(f.stat().st_size)
    return out


#: The forking server shared with test_bad_inputs.py (one import of torch, one child process per row).
ZYGOTE_SCRIPT = Path(__file__).with_name("cli_zygote.py")


class Zygote:
    """A child that imported ``airreg`` (and torch) once and forks one grandchild per command line."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(ZYGOTE_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def run(self, argv: list[str], cwd: Path, stdout: Path, stderr: Path) -> int:
        """The exit status of ``airreg argv``; minus the signal number if it was killed by one."""
        request = {"argv": argv, "cwd": str(cwd), "stdout": str(stdout), "stderr": str(stderr)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        assert "timeout" not in answer, f"airreg {' '.join(argv)} timed out"
        return -answer["signal"] if "signal" in answer else answer["status"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def test_the_suite_holds_over_a_hundred_bad_inputs():
    assert len(ROWS) >= 100 and len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_a_bad_input_file_is_one_clear_error(row: Row, workspace: Path, zygote: Zygote, tmp_path: Path):
    out = workspace / "out" / row.id
    out.mkdir()
    argv = [resolve(token, workspace, out) for token in row.argv]
    inputs = [Path(a) for a in argv if a.startswith(str(workspace)) and not a.startswith(str(out))]
    before = digests(inputs)
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    status = zygote.run(argv, out, stdout, stderr)
    err = stderr.read_text(errors="replace")
    assert status == 2, f"exit status {status} (negative: killed by that signal)\n{err}"
    head = f"airreg {row.argv[0]}: error: "
    split = re.split(
        r"[\r\n]", err.replace(head, "\n" + head)
    )  # a bar's missing newline: the CLI suite's concern
    lines = [line for line in split if line.strip() and not PROGRESS.search(line)]
    assert "Traceback" not in err and len(lines) == 1, err
    bad = Path(resolve(row.bad, workspace, out))
    assert lines[0].startswith(head), lines[0]
    assert bad.name in lines[0] or bad.parent.name in lines[0], lines[0]
    assert re.search(row.expect, lines[0]), lines[0]
    assert digests(inputs) == before, "an input file changed"
    assert [p for p in out.rglob("*") if p.is_file()] == [], "files left in the output folder"
    assert not Path("/tmp/airreg-readers-pwned").exists()


@pytest.mark.parametrize("reader", ["transform", "landmarks", "model"])
def test_fuzzed_reader_inputs_are_refused_or_read_in_a_child_process(reader):
    """A short fuzz (a longer run's figures are in BENCHMARKS.md); a native crash shows as a negative status."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(HERE / "fuzz_readers.py"), "--reader", reader, "--examples", "60"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.match(rf"{reader}: 60 examples, \d+ accepted, \d+ refused", done.stdout), done.stdout
