"""The bad-input suite: every bad or hostile input to the real ``airreg`` command is one clear error.

Each row of the tables below is one command line run in its own child process (forked from
``cli_zygote.py``, which imported torch once; a few rows that need a fresh interpreter, such as a C locale,
run the ``airreg`` console script itself). For each row: exit status 2 (a native crash or a traceback fails the
row), stderr ends with one line ``airreg <command>: error: ...`` that contains the expected words (the file's name
or what was wrong), no traceback, every input file's SHA-256 unchanged, and nothing written: the row's output
folder holds no file (no output, no stray temporary file) afterwards.

Run it alone with ``pytest -m badinput``. The readers' own cases (transform text, model schema, NIfTI NaN,
landmark encodings) are in their own suite.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from airreg import checkpoint
from conftest import make_case, write_synthetic_case

pytestmark = pytest.mark.badinput

HERE = Path(__file__).resolve().parent
BAD_BYTE = "\udcff"  # how Python hands over the byte 0xFF of a file name that is not UTF-8
CASE_TIMEOUT_S = 300


# --- the rows -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One bad command line. ``argv`` tokens starting with ``@`` are paths: ``@out/…`` in the row's output
    folder, ``@in/…`` in the shared inputs, ``@<name>`` a named input (see ``NAMED``)."""

    id: str
    argv: tuple[str, ...]
    expect: str  # words the error line must contain
    env: dict = field(default_factory=dict)
    fresh: bool = False  # run the console script in a new interpreter (locale settings)
    needs_non_root: bool = False  # permissions do not stop root


NAMED = {
    "mr": "in/pair/mr.nii.gz",
    "trus": "in/pair/trus.nii.gz",
    "gt": "in/pair/gt.tfm",
    "model": "in/model.pt",
    "data": "in/datasets/good",
}
DEVICE = ("--device", "cpu")


def register(*extra: str, out: str = "@out/t.tfm") -> tuple[str, ...]:
    return (
        "register",
        "--mr",
        "@mr",
        "--trus",
        "@trus",
        "--model",
        "@model",
        *DEVICE,
        "--out-transform",
        out,
        *extra,
    )


def score(*extra: str) -> tuple[str, ...]:
    return (
        "score",
        "--mr",
        "@mr",
        "--trus",
        "@trus",
        "--model",
        "@model",
        *DEVICE,
        "--transform",
        "@gt",
        *extra,
    )


def replace_arg(argv: tuple[str, ...], option: str, value: str) -> tuple[str, ...]:
    """``argv`` with the value of ``option`` replaced (appended if absent)."""
    items = list(argv)
    if option in items:
        items[items.index(option) + 1] = value
    else:
        items += [option, value]
    return tuple(items)


DATA_COMMANDS = {
    "evaluate": ("evaluate", "--data", "@data", "--model", "@model", *DEVICE, "--out", "@out/eval"),
    "train": ("train", "--data", "@data", "--out", "@out/run", "--preset", "tiny", "--epochs", "1", *DEVICE),
    "calibrate": (
        "calibrate",
        "--model",
        "@model",
        "--data",
        "@data",
        "--out",
        "@out/cal.pt",
        "--split",
        "all",
        *DEVICE,
    ),
    "benchmark": (
        "benchmark",
        "--data",
        "@data",
        "--model",
        "@model",
        "--out",
        "@out/bench",
        "--quick",
        "--no-elastix",
        *DEVICE,
    ),
}

#: Bad image files (built by ``build_bad_images``) and words of the expected error.
BAD_IMAGES = {
    "2d.nii.gz": "2D",
    "one-slice.nii.gz": "2D",
    "4d.nii.gz": "4D",
    "vector.nii.gz": "components per voxel",
    "rgb.png": "2D",
    "empty.nii.gz": "not a readable image",
    "text.nii.gz": "not a readable image",
    "truncated.nii.gz": "truncated",
    "constant.nii.gz": "constant",
    "nan.nrrd": "NaN or Inf",
    "inf.mha": "NaN or Inf",
    "float64-1e300.nrrd": "beyond what float32 can hold",
    "short-data.nhdr": "not a readable image",
    "missing-raw.mhd": "not a readable image",
    "no-dicom": "no DICOM series",
    "missing.nii.gz": "not found",
}

#: Bad transform files and words of the expected error.
BAD_TRANSFORMS = {
    "affine.tfm": "not rigid",
    "scaled.tfm": "not a linear transform|not rigid",
    "mirror.tfm": "not rigid",
    "bspline.tfm": "",
    "displacement.h5": "",
    "garbage.tfm": "binary data in a text transform file",
    "empty.tfm": "not an ITK text transform file",
    "garbage.h5": "not a readable ITK HDF5 transform file",
    "matrix-3x4.txt": "4x4",
    "matrix-nan.txt": "NaN or Inf",
    "matrix-shear.txt": "not rigid",
    "matrix-words.txt": "'one' is not a number",
    "transform.xyz": "unknown transform file type",
    "missing.tfm": "not found",
}

#: Bad model files and words of the expected error.
BAD_MODELS = {
    "empty.pt": "corrupt or not a model file",
    "text.pt": "corrupt or not a model file",
    "random.pt": "corrupt or not a model file",
    "truncated.pt": "corrupt or not a model file",
    "zip-of-text.pt": "corrupt or not a model file",
    "executes-code.pt": "refused to load",
    "plain-dict.pt": "not an AIRRegistration checkpoint",
    "future-format.pt": "newer than this version supports",
    "no-generator.pt": "lacks generator",
    "missing.pt": "model file not found",
}

#: Bad data folders (built by ``build_datasets``) and words of the expected error.
BAD_DATASETS = {
    "missing": "data folder not found",
    "empty": "no cases|at least 2 cases",
    "two-mr-images": "several 'mr' images",
    "no-gt": "ground-truth",
    "gt-garbage": "binary data in a text transform file",
    "gt-affine": "not rigid",
    "landmarks-no-column": "missing column",
    "landmarks-words": "non-numeric coordinate",
    "mask-intensity": "not a mask",
    "mask-empty": "empty",
    "mr-mask-far-away": "does not overlap",
    "trus-mask-far-away": "does not overlap",
    "mr-2d": "2D",
    "trus-1e300": "beyond what float32 can hold",
    "bad-name-case": "not valid UTF-8",
    "muregpro-no-us-images": "no cases|at least 2 cases",
    "muregpro-bad-label": "not a readable image",
    "muregpro-2d-mr": "2D",
}


def image_rows() -> list[Row]:
    rows = []
    for name, expect in BAD_IMAGES.items():
        rows.append(Row(f"register-mr-{name}", replace_arg(register(), "--mr", f"@in/bad/{name}"), expect))
        rows.append(
            Row(f"register-trus-{name}", replace_arg(register(), "--trus", f"@in/bad/{name}"), expect)
        )
        rows.append(Row(f"score-mr-{name}", replace_arg(score(), "--mr", f"@in/bad/{name}"), expect))
    return rows


def transform_rows() -> list[Row]:
    rows = []
    for name, expect in BAD_TRANSFORMS.items():
        rows.append(Row(f"register-init-{name}", register("--init", f"@in/bad/{name}"), expect or name))
        rows.append(
            Row(
                f"score-transform-{name}",
                replace_arg(score(), "--transform", f"@in/bad/{name}"),
                expect or name,
            )
        )
    return rows


def model_rows() -> list[Row]:
    rows = []
    for name, expect in BAD_MODELS.items():
        model = f"@in/bad/{name}"
        rows.append(Row(f"register-model-{name}", replace_arg(register(), "--model", model), expect))
        rows.append(Row(f"score-model-{name}", replace_arg(score(), "--model", model), expect))
        rows.append(
            Row(f"evaluate-model-{name}", replace_arg(DATA_COMMANDS["evaluate"], "--model", model), expect)
        )
    rows.append(
        Row("register-model-folder", replace_arg(register(), "--model", "@in/bad"), "model file not found")
    )
    return rows


def dataset_rows() -> list[Row]:
    rows = []
    for name, expect in BAD_DATASETS.items():
        for command in ("evaluate", "train", "calibrate"):
            argv = replace_arg(DATA_COMMANDS[command], "--data", f"@in/datasets/{name}")
            rows.append(Row(f"{command}-data-{name}", argv, expect or name.split("-")[0]))
    rows.append(
        Row(
            "train-one-case",
            replace_arg(DATA_COMMANDS["train"], "--data", "@in/datasets/one-case"),
            "at least 2 cases",
        )
    )
    for option in ("--rotation-deg", "--translation-mm"):
        for value in ("0", "-3", "nan"):
            argv = (*DATA_COMMANDS["train"], option, value)
            rows.append(Row(f"train{option}-{value}", argv, "range of the training starts"))
    for option, values in (("--grid-size", ("1", "24", "24")), ("--grid-spacing", ("nan", "3", "3"))):
        argv = (*DATA_COMMANDS["train"], option, *values)
        rows.append(Row(f"train{option}", argv, "grid: every size must be >= 2"))
    rows.append(
        Row(
            "benchmark-data-no-gt",
            replace_arg(DATA_COMMANDS["benchmark"], "--data", "@in/datasets/no-gt"),
            "ground-truth",
        )
    )
    rows.append(
        Row(
            "evaluate-data-is-a-file",
            replace_arg(DATA_COMMANDS["evaluate"], "--data", "@mr"),
            "data folder not found",
        )
    )
    return rows


def name_rows() -> list[Row]:
    """File names that are not UTF-8 (SimpleITK aborted on them), as inputs and as outputs."""
    bad = f"@in/bad/x{BAD_BYTE}.nii.gz"
    rows = [
        Row("register-mr-bad-name", replace_arg(register(), "--mr", bad), "not valid UTF-8"),
        Row("register-trus-bad-name", replace_arg(register(), "--trus", bad), "not valid UTF-8"),
        Row("register-init-bad-name", register("--init", f"@in/bad/t{BAD_BYTE}.tfm"), "not valid UTF-8"),
        Row(
            "register-model-bad-name",
            replace_arg(register(), "--model", f"@in/bad/m{BAD_BYTE}.pt"),
            "not valid UTF-8",
        ),
        Row(
            "score-transform-bad-name",
            replace_arg(score(), "--transform", f"@in/bad/t{BAD_BYTE}.tfm"),
            "not valid UTF-8",
        ),
        Row("register-out-bad-name", register(out=f"@out/t{BAD_BYTE}.tfm"), "not valid UTF-8"),
        Row("register-report-bad-name", register("--report", f"@out/r{BAD_BYTE}.json"), "not valid UTF-8"),
        Row("register-ras-bad-name", register("--ras-matrix", f"@out/m{BAD_BYTE}.txt"), "not valid UTF-8"),
        Row("register-overlay-bad-name", register("--overlay", f"@out/o{BAD_BYTE}.png"), "not valid UTF-8"),
        Row("register-out-folder-bad-name", register(out=f"@out/d{BAD_BYTE}/t.tfm"), "not valid UTF-8"),
        Row(
            "phantom-out-bad-name",
            ("phantom", "--out", f"@out/p{BAD_BYTE}", "--cases", "1"),
            "not valid UTF-8",
        ),
        Row(
            "demo-out-bad-name",
            ("demo", "--out", f"@out/d{BAD_BYTE}", "--model", "@model", *DEVICE),
            "not valid UTF-8",
        ),
    ]
    for command, argv in DATA_COMMANDS.items():
        rows.append(
            Row(
                f"{command}-data-bad-name",
                replace_arg(argv, "--data", f"@in/bad/d{BAD_BYTE}"),
                "not valid UTF-8",
            )
        )
        out = argv[argv.index("--out") + 1]
        rows.append(
            Row(f"{command}-out-bad-name", replace_arg(argv, "--out", out + BAD_BYTE), "not valid UTF-8")
        )
    for command in ("refine-critic", "train-patient-check"):
        argv = (command, "--model", "@model", "--data", "@data", "--out", f"@out/m{BAD_BYTE}.pt", *DEVICE)
        rows.append(Row(f"{command}-out-bad-name", argv, "not valid UTF-8"))
    c_locale = {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    rows += [
        Row(
            "c-locale-mr-non-ascii",
            replace_arg(register(), "--mr", "@in/pair/mr-ü.nii.gz"),
            "not valid UTF-8",
            env=c_locale,
            fresh=True,
        ),
        Row(
            "c-locale-out-non-ascii", register(out="@out/tü.tfm"), "not valid UTF-8", env=c_locale, fresh=True
        ),
        Row(
            "c-locale-data-non-ascii",
            replace_arg(DATA_COMMANDS["evaluate"], "--data", "@in/datasets/dü"),
            "not valid UTF-8",
            env=c_locale,
            fresh=True,
        ),
    ]
    return rows


def collision_rows() -> list[Row]:
    """Outputs that are an input or another output (they used to overwrite it), and the same image twice."""
    rows = []
    outputs = {"--out-transform": ".tfm", "--report": ".json", "--ras-matrix": ".txt", "--overlay": ".png"}
    inputs = {"--mr": "@mr", "--trus": "@trus", "--init": "@gt", "--model": "@model"}
    for out_option in outputs:
        for in_option, path in inputs.items():
            argv = register("--init", "@gt")
            rows.append(
                Row(
                    f"register{out_option}-is{in_option}",
                    replace_arg(argv, out_option, path),
                    f"would overwrite the input {in_option}",
                )
            )
    options = list(outputs)
    for i, a in enumerate(options):
        for b in options[i + 1 :]:
            argv = replace_arg(replace_arg(register(), a, "@out/same.tfm"), b, "@out/same.tfm")
            rows.append(Row(f"register{a}-is{b}", argv, "are the same file"))
    rows += [
        Row(
            "register-out-is-init-hard-link",
            register("--init", "@gt", out="@in/links/gt-hard.tfm"),
            "would overwrite the input --init",
        ),
        Row(
            "register-out-is-init-symlink",
            register("--init", "@gt", out="@in/links/gt-symlink.tfm"),
            "would overwrite the input --init",
        ),
        Row(
            "register-report-is-mr-dotted",
            register("--report", "@in/pair/../pair/./mr.nii.gz"),
            "would overwrite the input --mr",
        ),
        Row(
            "calibrate-out-is-model",
            replace_arg(DATA_COMMANDS["calibrate"], "--out", "@model"),
            "would overwrite the input --model",
        ),
        Row(
            "calibrate-out-is-model-hard-link",
            replace_arg(DATA_COMMANDS["calibrate"], "--out", "@in/links/model-hard.pt"),
            "would overwrite the input --model",
        ),
        Row(
            "refine-critic-out-is-model",
            ("refine-critic", "--model", "@model", "--data", "@data", "--out", "@model", *DEVICE),
            "would overwrite the input --model",
        ),
        Row(
            "train-patient-check-out-is-model",
            ("train-patient-check", "--model", "@model", "--data", "@data", "--out", "@model", *DEVICE),
            "would overwrite the input --model",
        ),
        Row(
            "evaluate-out-is-data",
            replace_arg(DATA_COMMANDS["evaluate"], "--out", "@data"),
            "inside the input folder --data",
        ),
        Row(
            "evaluate-out-inside-data",
            replace_arg(DATA_COMMANDS["evaluate"], "--out", "@data/eval"),
            "inside the input folder --data",
        ),
        Row(
            "evaluate-summary-is-model",
            replace_arg(
                replace_arg(DATA_COMMANDS["evaluate"], "--out", "@in/as-outputs"),
                "--model",
                "@in/as-outputs/summary.json",
            ),
            "would overwrite the input --model",
        ),
        Row(
            "train-out-is-data",
            replace_arg(DATA_COMMANDS["train"], "--out", "@data"),
            "inside the input folder",
        ),
        Row(
            "train-model-is-resume",
            replace_arg(DATA_COMMANDS["train"], "--out", "@in/as-outputs")
            + ("--resume", "@in/as-outputs/model.pt"),
            "would overwrite the input --resume",
        ),
        Row(
            "benchmark-out-is-data",
            replace_arg(DATA_COMMANDS["benchmark"], "--out", "@data"),
            "inside the input folder",
        ),
        Row(
            "demo-report-is-model",
            ("demo", "--out", "@in/as-outputs", "--model", "@in/as-outputs/report.json", *DEVICE),
            "would overwrite the input --model",
        ),
    ]
    folder = ("register", "--mr", "@in/bad/no-dicom", "--trus", "@in/bad/no-dicom/../no-dicom")
    rows.append(Row("register-trus-is-mr-same-folder", folder + register()[5:], "same image as --mr"))
    same_trus = {
        "same-path": "@mr",
        "hard-link": "@in/links/mr-hard.nii.gz",
        "symlink": "@in/links/mr-symlink.nii.gz",
        "copy": "@in/links/mr-copy.nii.gz",
    }
    for kind, path in same_trus.items():
        rows.append(
            Row(f"register-trus-is-mr-{kind}", replace_arg(register(), "--trus", path), "same image as --mr")
        )
        rows.append(
            Row(f"score-trus-is-mr-{kind}", replace_arg(score(), "--trus", path), "same image as --mr")
        )
    return rows


def output_place_rows() -> list[Row]:
    """Outputs that cannot be written, refused before anything runs."""
    rows = [
        Row("register-out-is-a-folder", register(out="@in/bad"), "is a folder"),
        Row("register-out-not-a-transform-type", register(out="@out/t.json"), "unknown transform file type"),
        Row("phantom-out-is-a-file", ("phantom", "--out", "@mr", "--cases", "1"), "is a file, not a folder"),
        Row("register-out-under-a-file", register(out="@mr/t.tfm"), "is a file, not a folder"),
        Row("register-report-under-a-file", register("--report", "@mr/r.json"), "is a file, not a folder"),
        Row("register-out-under-dev-null", register(out="/dev/null/t.tfm"), "is a file, not a folder"),
        Row(
            "register-out-read-only-folder",
            register(out="@in/read-only/t.tfm"),
            "not writable",
            needs_non_root=True,
        ),
        Row(
            "register-report-read-only-folder",
            register("--report", "@in/read-only/r.json"),
            "not writable",
            needs_non_root=True,
        ),
        Row(
            "evaluate-out-under-a-file",
            replace_arg(DATA_COMMANDS["evaluate"], "--out", "@mr/eval"),
            "is a file, not a folder",
        ),
        Row(
            "train-out-under-a-file",
            replace_arg(DATA_COMMANDS["train"], "--out", "@mr/run"),
            "is a file, not a folder",
        ),
        Row(
            "calibrate-out-is-a-folder",
            replace_arg(DATA_COMMANDS["calibrate"], "--out", "@in/bad"),
            "is a folder",
        ),
        Row(
            "benchmark-out-read-only",
            replace_arg(DATA_COMMANDS["benchmark"], "--out", "@in/read-only/b"),
            "not writable",
            needs_non_root=True,
        ),
    ]
    return rows


def device_rows() -> list[Row]:
    rows = []
    commands = {
        "register": register(),
        "score": score(),
        "demo": ("demo", "--out", "@out/demo", "--model", "@model", *DEVICE),
        "refine-critic": (
            "refine-critic",
            "--model",
            "@model",
            "--data",
            "@data",
            "--out",
            "@out/m.pt",
            *DEVICE,
        ),
        "train-patient-check": (
            "train-patient-check",
            "--model",
            "@model",
            "--data",
            "@data",
            "--out",
            "@out/m.pt",
            *DEVICE,
        ),
        **DATA_COMMANDS,
    }
    for command, argv in commands.items():
        rows.append(
            Row(f"{command}-device-bogus", replace_arg(argv, "--device", "bogus"), "--device 'bogus'")
        )
    for value in ("cuda:x", "gpu", "", "cpu:0"):
        rows.append(
            Row(f"register-device-{value or 'empty'}", replace_arg(register(), "--device", value), "--device")
        )
    return rows


ROWS = [
    *image_rows(),
    *transform_rows(),
    *model_rows(),
    *dataset_rows(),
    *name_rows(),
    *collision_rows(),
    *output_place_rows(),
    *device_rows(),
]


# --- the inputs -----------------------------------------------------------------------------------------


def _image(array: np.ndarray, like: sitk.Image | None = None, vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(array, isVector=vector)
    if like is not None and image.GetDimension() == like.GetDimension():
        image.CopyInformation(like)
    return image


def build_bad_images(bad: Path, mr: sitk.Image, mr_file: Path) -> None:
    """The files of ``BAD_IMAGES``: wrong dimension, components or values, unreadable, lying headers."""
    voxels = sitk.GetArrayFromImage(mr)
    sitk.WriteImage(_image(voxels[12]), str(bad / "2d.nii.gz"))
    sitk.WriteImage(_image(voxels[12:13]), str(bad / "one-slice.nii.gz"))
    sitk.WriteImage(_image(np.stack([voxels, voxels])), str(bad / "4d.nii.gz"))
    sitk.WriteImage(_image(np.stack([voxels] * 3, axis=-1), vector=True), str(bad / "vector.nii.gz"))
    sitk.WriteImage(_image(np.zeros((32, 32, 3), np.uint8), vector=True), str(bad / "rgb.png"))
    (bad / "empty.nii.gz").write_bytes(b"")
    (bad / "text.nii.gz").write_text("this is not an image\n")
    raw = mr_file.read_bytes()
    (bad / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    sitk.WriteImage(_image(np.zeros_like(voxels), mr), str(bad / "constant.nii.gz"))
    for name, value in (("nan.nrrd", np.nan), ("inf.mha", np.inf)):
        spoiled = voxels.copy()
        spoiled[5, 5, 5] = value
        sitk.WriteImage(_image(spoiled, mr), str(bad / name))
    huge = voxels.astype(np.float64) * 1e298
    huge[0, 0, 0] = -1e300
    sitk.WriteImage(_image(huge, mr), str(bad / "float64-1e300.nrrd"))
    (bad / "short-data.raw").write_bytes(b"\0" * 1000)
    (bad / "short-data.nhdr").write_text(
        "NRRD0004\ntype: float\ndimension: 3\nsizes: 64 64 64\nencoding: raw\nendian: little\n"
        "data file: short-data.raw\n"
    )
    (bad / "missing-raw.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_FLOAT\nElementDataFile = gone.raw\n"
    )
    (bad / "no-dicom").mkdir()
    (bad / "no-dicom" / "notes.txt").write_text("no DICOM here\n")


def build_bad_transforms(bad: Path) -> None:
    """The files of ``BAD_TRANSFORMS``: not rigid, not a transform, not a 4x4 matrix."""
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.0, 0.2, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteTransform(affine, str(bad / "affine.tfm"))
    sitk.WriteTransform(sitk.ScaleTransform(3, (1.5, 1.5, 1.5)), str(bad / "scaled.tfm"))
    mirror = sitk.AffineTransform(3)
    mirror.SetMatrix((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteTransform(mirror, str(bad / "mirror.tfm"))
    grid = sitk.Image((8, 8, 8), sitk.sitkFloat32)
    sitk.WriteTransform(sitk.BSplineTransformInitializer(grid, (3, 3, 3)), str(bad / "bspline.tfm"))
    field_image = sitk.Image((8, 8, 8), sitk.sitkVectorFloat64, 3)
    sitk.WriteTransform(sitk.DisplacementFieldTransform(field_image), str(bad / "displacement.h5"))
    (bad / "garbage.tfm").write_bytes(bytes(range(256)) * 4)
    (bad / "empty.tfm").write_bytes(b"")
    (bad / "garbage.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    (bad / "matrix-3x4.txt").write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n")
    (bad / "matrix-nan.txt").write_text("1 0 0 nan\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    (bad / "matrix-shear.txt").write_text("1 0.3 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    (bad / "matrix-words.txt").write_text("one zero zero zero\n")
    (bad / "transform.xyz").write_text("1 0 0 0\n")


class _RunsCode:
    """Pickles to a call of ``os.system``: loading it must be refused, never executed."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/airreg-bad-input-pwned",))


def build_bad_models(bad: Path, model: Path) -> None:
    """The files of ``BAD_MODELS``: empty, not a checkpoint, truncated, code, wrong format."""
    (bad / "empty.pt").write_bytes(b"")
    (bad / "text.pt").write_text("not a model\n")
    (bad / "random.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    raw = model.read_bytes()
    (bad / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    with zipfile.ZipFile(bad / "zip-of-text.pt", "w") as archive:
        archive.writestr("archive/data.pkl", "not a pickle")
    buffer = io.BytesIO()
    torch.save({"format": checkpoint.FORMAT, "payload": _RunsCode()}, buffer, pickle_protocol=2)
    (bad / "executes-code.pt").write_bytes(buffer.getvalue())
    torch.save({"weights": torch.zeros(3)}, bad / "plain-dict.pt")
    state = checkpoint.load(model)
    state = {k: v for k, v in state.items() if k not in ("sha256", "path")}
    torch.save({**state, "format_version": checkpoint.FORMAT_VERSION + 1}, bad / "future-format.pt")
    torch.save({k: v for k, v in state.items() if k != "generator"}, bad / "no-generator.pt")


def _copy_case(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def build_datasets(root: Path, good_cases: list[Path]) -> None:
    """The folders of ``BAD_DATASETS``: each the two good cases with the second one spoiled."""
    good = root / "good"
    for case in good_cases:
        _copy_case(case, good / case.name)
    (root / "empty").mkdir()
    one = root / "one-case"
    _copy_case(good_cases[0], one / good_cases[0].name)

    def spoiled(name: str) -> Path:
        folder = root / name
        shutil.copytree(good, folder)
        return folder / good_cases[1].name

    case = spoiled("two-mr-images")
    shutil.copy(case / "mr.nii.gz", case / "mr.nrrd")
    (spoiled("no-gt") / "gt.tfm").unlink()
    (spoiled("gt-garbage") / "gt.tfm").write_bytes(bytes(range(256)))
    shutil.copy(root.parent / "bad" / "affine.tfm", spoiled("gt-affine") / "gt.tfm")
    (spoiled("landmarks-no-column") / "landmarks.csv").write_text("name,mr_x,mr_y\napex,1,2\n")
    (spoiled("landmarks-words") / "landmarks.csv").write_text(
        "name,mr_x,mr_y,mr_z,trus_x,trus_y,trus_z\napex,one,2,3,4,5,6\n"
    )
    mr = sitk.ReadImage(str(good_cases[1] / "mr.nii.gz"))
    sitk.WriteImage(mr, str(spoiled("mask-intensity") / "mr_prostate.nii.gz"))
    mask = sitk.Cast(mr > 1e9, sitk.sitkUInt8)
    sitk.WriteImage(mask, str(spoiled("mask-empty") / "mr_prostate.nii.gz"))
    gland = sitk.Cast(mr > float(np.median(sitk.GetArrayViewFromImage(mr))), sitk.sitkUInt8)
    gland.SetOrigin(tuple(np.asarray(mr.GetOrigin()) + 500.0))  # 500 mm away: the case's TRE went wrong
    sitk.WriteImage(gland, str(spoiled("mr-mask-far-away") / "mr_prostate.nii.gz"))
    trus = sitk.ReadImage(str(good_cases[1] / "trus.nii.gz"))
    far = sitk.Cast(trus > 1.0, sitk.sitkUInt8)
    far.SetOrigin(tuple(np.asarray(trus.GetOrigin()) - 500.0))
    sitk.WriteImage(far, str(spoiled("trus-mask-far-away") / "trus_prostate.nii.gz"))
    case = spoiled("mr-2d")
    (case / "mr.nii.gz").unlink()
    shutil.copy(root.parent / "bad" / "2d.nii.gz", case / "mr.nii.gz")
    case = spoiled("trus-1e300")
    (case / "trus.nii.gz").unlink()
    shutil.copy(root.parent / "bad" / "float64-1e300.nrrd", case / "trus.nrrd")
    case = spoiled("bad-name-case")
    os.rename(case, case.with_name(case.name + BAD_BYTE))
    folder = root / "dü"
    shutil.copytree(good, folder)
    build_muregpro(root, good_cases)


def build_muregpro(root: Path, good_cases: list[Path]) -> None:
    """µRegPro trees (``train/{mr_images,us_images,mr_labels,us_labels}``), each spoiled in one way."""

    def tree(name: str) -> Path:
        split = root / name / "train"
        for i, case in enumerate(good_cases):
            for sub, source in (("mr_images", "mr"), ("us_images", "trus")):
                (split / sub).mkdir(parents=True, exist_ok=True)
                shutil.copy(case / f"{source}.nii.gz", split / sub / f"case{i:06d}.nii.gz")
        return split

    split = tree("muregpro-no-us-images")
    shutil.rmtree(split / "us_images")
    split = tree("muregpro-bad-label")
    for sub in ("mr_labels", "us_labels"):
        (split / sub).mkdir()
        for i in range(len(good_cases)):
            (split / sub / f"case{i:06d}.nii.gz").write_text("not a label image\n")
    split = tree("muregpro-2d-mr")
    shutil.copy(root.parent / "bad" / "2d.nii.gz", split / "mr_images" / "case000001.nii.gz")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """``in/``: a good MR/TRUS pair, the bundled model, good and bad files; ``out/``: one folder per row."""
    root = tmp_path_factory.mktemp("bad-inputs")
    inputs = root / "in"
    cases = [write_synthetic_case(inputs / "cases" / f"case{i}", make_case(300 + i)) for i in range(2)]
    pair = inputs / "pair"
    pair.mkdir()
    for name in ("mr.nii.gz", "trus.nii.gz", "gt.tfm"):
        shutil.copy(cases[0] / name, pair / name)
    shutil.copy(pair / "mr.nii.gz", pair / "mr-ü.nii.gz")
    model = Path(shutil.copy(checkpoint.default_model_path(), inputs / "model.pt"))
    bad = inputs / "bad"
    bad.mkdir()
    build_bad_images(bad, sitk.ReadImage(str(pair / "mr.nii.gz")), pair / "mr.nii.gz")
    build_bad_transforms(bad)
    build_bad_models(bad, model)
    for name in (f"x{BAD_BYTE}.nii.gz", f"t{BAD_BYTE}.tfm", f"m{BAD_BYTE}.pt"):
        shutil.copy(pair / "mr.nii.gz" if name.endswith(".nii.gz") else model, bad / name)
    shutil.copytree(cases[0].parent, bad / f"d{BAD_BYTE}")
    build_datasets(inputs / "datasets", cases)
    links = inputs / "links"
    links.mkdir()
    os.link(pair / "gt.tfm", links / "gt-hard.tfm")
    os.symlink(pair / "gt.tfm", links / "gt-symlink.tfm")
    os.link(model, links / "model-hard.pt")
    os.link(pair / "mr.nii.gz", links / "mr-hard.nii.gz")
    os.symlink(pair / "mr.nii.gz", links / "mr-symlink.nii.gz")
    shutil.copy(pair / "mr.nii.gz", links / "mr-copy.nii.gz")
    as_outputs = inputs / "as-outputs"
    as_outputs.mkdir()
    for name in ("model.pt", "summary.json", "report.json"):
        shutil.copy(model, as_outputs / name)
    (inputs / "read-only").mkdir()
    (inputs / "read-only").chmod(0o555)
    (root / "out").mkdir()
    return root


def input_digests(root: Path) -> dict[str, str]:
    """SHA-256 of every input file (names with bytes that are not UTF-8 included)."""
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in input_files(root)}


def input_stats(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """(inode, size, mtime, ctime) of every input file: any write, rename or replacement changes them (ctime
    cannot be set back), so equal stats mean an unchanged file without hashing the whole tree for every row."""
    stats = {}
    for path in input_files(root):
        st = path.stat()
        stats[str(path)] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return stats


def input_files(root: Path) -> list[Path]:
    return [Path(f, n) for f, _, names in os.walk(root) for n in names if not Path(f, n).is_symlink()]


@pytest.fixture(scope="module")
def digests_at_start(workspace) -> dict[str, str]:
    return input_digests(workspace / "in")


# --- running the command ------------------------------------------------------------------------------


class Zygote:
    """A child process that imported ``airreg`` once and forks one grandchild per command (see cli_zygote.py)."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "cli_zygote.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def run(self, argv: list[str], cwd: Path, stdout: Path, stderr: Path, env: dict) -> int:
        request = {
            "argv": argv,
            "cwd": str(cwd),
            "stdout": str(stdout),
            "stderr": str(stderr),
            "env": env,
            "timeout": CASE_TIMEOUT_S,
        }
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        if "signal" in answer:
            return -answer["signal"]
        assert "timeout" not in answer, f"timed out after {CASE_TIMEOUT_S} s"
        return answer["status"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("airreg")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "airreg.cli"]


def run_fresh(argv: list[str], cwd: Path, stdout: Path, stderr: Path, env: dict) -> int:
    """Run the ``airreg`` console script in a new interpreter (for locale settings made at start-up)."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", **env}
    with stdout.open("wb") as out, stderr.open("wb") as err:
        args = [os.fsencode(a) for a in console_script() + argv]
        return subprocess.run(
            args, cwd=cwd, stdout=out, stderr=err, env=full_env, timeout=CASE_TIMEOUT_S
        ).returncode


def resolve(token: str, workspace: Path, out: Path) -> str:
    if not token.startswith("@"):
        return token
    head, _, rest = token[1:].partition("/")
    base = {"out": out, "in": workspace / "in"}.get(head) or workspace / NAMED[head]
    return str(base / rest) if rest else str(base)


def files_under(folder: Path) -> list[Path]:
    return [Path(f, n) for f, _, names in os.walk(folder) for n in names]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_one_clear_error(
    row: Row, workspace: Path, zygote: Zygote, digests_at_start, tmp_path: Path
):
    if row.needs_non_root and os.geteuid() == 0:
        pytest.skip("permissions do not stop root")
    out = workspace / "out" / row.id.replace(BAD_BYTE, "_")
    out.mkdir()
    argv = [resolve(token, workspace, out) for token in row.argv]
    named = [
        Path(a) for a in argv if Path(a).is_file() and Path(a).resolve().is_relative_to(workspace / "in")
    ]
    before, named_before = (
        input_stats(workspace / "in"),
        {p: hashlib.sha256(p.read_bytes()).digest() for p in named},
    )
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    runner = run_fresh if row.fresh else zygote.run
    status = runner(argv, out, stdout, stderr, row.env)
    err = stderr.read_bytes().decode("utf-8", "replace")
    assert status == 2, f"exit status {status}\n{err}"
    assert "Traceback" not in err
    lines = [line for line in err.split("\n") if line.strip()]
    command = row.argv[0]
    assert lines[-1].startswith(f"airreg {command}: error: "), err  # on its own line, after any progress bar
    assert sum(line.startswith("airreg ") for line in lines) == 1, err
    assert re.search(row.expect, lines[-1], re.IGNORECASE), lines[-1]
    assert input_stats(workspace / "in") == before, "an input file changed"
    assert {p: hashlib.sha256(p.read_bytes()).digest() for p in named} == named_before, (
        "an input file changed"
    )
    assert files_under(out) == [], "files left in the output folder"
    assert not Path("/tmp/airreg-bad-input-pwned").exists()


# --- outputs as a set: failed writes and killed runs ----------------------------------------------------


def register_all_outputs(workspace: Path, out: Path) -> list[str]:
    argv = register(out="@out/t.tfm")
    argv += (
        "--report",
        "@out/r.json",
        "--ras-matrix",
        "@out/m.txt",
        "--overlay",
        "@out/o.png",
        "--init",
        "@gt",
    )
    return [resolve(token, workspace, out) for token in argv]


def test_a_write_failing_part_way_publishes_none_of_the_outputs(workspace, tmp_path):
    """The overlay PNG exceeds a 16 KiB file-size limit: transform, report and matrix must not appear either."""
    import resource

    out = workspace / "out" / "file-size-limit"
    out.mkdir()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        console_script() + register_all_outputs(workspace, out),
        cwd=out,
        env=env,
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=CASE_TIMEOUT_S,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("airreg register: error: ")
    assert "o.png: cannot be written (File too large)" in done.stderr
    assert files_under(out) == []


def test_sigterm_during_a_run_removes_what_it_wrote(workspace):
    """demo writes its phantom case first (read back to register it): a SIGTERM after that removes it too."""
    out = workspace / "out" / "sigterm"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    argv = ["demo", "--out", str(out), "--model", str(workspace / NAMED["model"]), *DEVICE]
    process = subprocess.Popen(console_script() + argv, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + CASE_TIMEOUT_S
    while (
        not (out / "case" / "case.json").exists() and process.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, process.stderr.read()
    assert files_under(out) == []


def test_a_run_removes_the_temporary_files_a_killed_run_left(workspace):
    out = workspace / "out" / "after-sigkill"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = out / f".t~airreg-{int(dead.stdout)}-abcdefgh.tfm"
    stale.write_text("left by a killed run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        console_script() + register_all_outputs(workspace, out),
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=CASE_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in files_under(out)) == ["m.txt", "o.png", "r.json", "t.tfm"]


def test_every_input_file_has_its_sha256_of_the_start(workspace, digests_at_start):
    """Last (pytest runs the tests in file order): the whole input tree is byte for byte the same."""
    assert input_digests(workspace / "in") == digests_at_start
