"""Tests of the ``airreg`` command line (register, score, evaluate) on the tiny dataset and model."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from airreg import geometry
from airreg.cli import main
from conftest import REPORT_KEYS

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def inputs(tiny_dataset, tiny_model, tmp_path) -> dict[str, Path]:
    """Private copies of one case's images, its ground truth and the model (so mtimes can be checked)."""
    folder = tmp_path / "in"
    folder.mkdir()
    case = tiny_dataset / "case001"
    paths = {}
    for name in ("mr.nii.gz", "trus.nii.gz", "gt.tfm"):
        paths[name.split(".")[0]] = Path(shutil.copy2(case / name, folder / name))
    paths["model"] = Path(shutil.copy2(tiny_model, folder / "model.pt"))
    return paths


def fingerprint(paths) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def pair_args(inputs: dict[str, Path]) -> list[str]:
    return [
        "--mr",
        str(inputs["mr"]),
        "--trus",
        str(inputs["trus"]),
        "--model",
        str(inputs["model"]),
        "--device",
        "cpu",
    ]


def test_register_writes_transform_report_matrix_and_overlay(inputs, tmp_path, capsys):
    before = fingerprint(inputs.values())
    out = tmp_path / "out"
    args = [
        "register",
        *pair_args(inputs),
        "--init",
        str(inputs["gt"]),
        "--out-transform",
        str(out / "t.tfm"),
        "--report",
        str(out / "r.json"),
        "--ras-matrix",
        str(out / "ras.txt"),
        "--overlay",
        str(out / "o.png"),
        "--iterations",
        "2",
    ]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "D-score" in stdout and "quality:" in stdout
    matrix = geometry.read_transform(out / "t.tfm")
    geometry.check_rigid(matrix)
    report = json.loads((out / "r.json").read_text())
    assert set(report) >= REPORT_KEYS
    assert report["quality"] in {"ok", "warning"}
    assert report["transform_file"] == str(out / "t.tfm")
    assert report["model"] == "model.pt"
    np.testing.assert_allclose(report["mr_to_trus_lps"], matrix, atol=1e-6)
    np.testing.assert_allclose(
        report["initial_mr_to_trus_lps"], geometry.read_transform(inputs["gt"]), atol=1e-9
    )
    assert len(report["iterations"]) >= 1
    # the RAS "to parent" matrix file reads back as the same LPS resampling transform
    np.testing.assert_allclose(geometry.read_transform(out / "ras.txt"), matrix, atol=1e-6)
    assert (out / "o.png").read_bytes()[:8] == PNG
    assert sorted(p.name for p in out.iterdir()) == ["o.png", "r.json", "ras.txt", "t.tfm"]  # no temp files
    assert fingerprint(inputs.values()) == before  # inputs untouched


def test_register_without_initial_transform(inputs, tmp_path):
    out = tmp_path / "t.tfm"
    assert main(["register", *pair_args(inputs), "--out-transform", str(out), "--iterations", "1"]) == 0
    geometry.check_rigid(geometry.read_transform(out))


def test_score(inputs, capsys):
    before = fingerprint(inputs.values())
    assert main(["score", *pair_args(inputs), "--transform", str(inputs["gt"])]) == 0
    stdout = capsys.readouterr().out
    assert "D-score" in stdout and "quality:" in stdout
    assert fingerprint(inputs.values()) == before


def test_evaluate_writes_the_summaries_and_figures(tiny_dataset, tiny_model, tmp_path, capsys):
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--data",
        str(tiny_dataset),
        "--model",
        str(tiny_model),
        "--out",
        str(out),
        "--iterations",
        "2",
        "--overlays",
        "1",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert "AUROC" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 6 and summary["dof"] == 3 and summary["seed"] == 1234
    for key in ("tre_before", "tre_one_pass", "tre_after"):
        assert summary[key]["mean"] >= 0 and summary[key]["median"] <= summary[key]["p90"] + 1e-9
    assert summary["tre_before"]["mean"] > 1.0  # paper-style random starts are misaligned
    assert -1.0 <= summary["spearman_d_score_vs_tre"] <= 1.0
    assert "auroc_flag_tre_above_tolerance" in summary and "wilcoxon_p_before_vs_after" in summary
    assert (out / "summary.md").read_text().startswith("## AIR-net evaluation")
    gross = summary["gross_failures"]
    assert set(gross) == {"swapped", "other_patient"}
    assert all(g["cases"] == 6 and 0 <= g["warned"] + g["errors"] <= 6 for g in gross.values())
    assert "gross failure, inputs swapped: warning on" in (out / "summary.md").read_text()
    assert summary["patient_check_false_alarms"] is None  # the model has no patient check
    assert all(g["patient_check"] == 0 for g in gross.values())
    assert (out / "boxplots.png").read_bytes()[:8] == PNG
    with (out / "cases.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["case"] for r in rows) == [f"case{i:03d}" for i in range(6)]
    assert all(float(r["tre_before"]) > 0 for r in rows)
    assert len(list((out / "overlays").glob("*.png"))) == 1


# --- failures: status 2, one line naming the file, nothing written ------------------------------------------


def run_failing(args, out_dir: Path, capsys, names: Path) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("airreg ") and "error:" in err
    assert str(names) in err, err
    assert not out_dir.exists() or not any(out_dir.iterdir()), list(out_dir.iterdir())
    return err


def register_with_init(inputs: dict[str, Path], init: Path, out: Path) -> list[str]:
    """``airreg register`` arguments starting from ``init`` and writing a transform and a report into ``out``."""
    return [
        "register",
        *pair_args(inputs),
        "--init",
        str(init),
        "--out-transform",
        str(out / "t.tfm"),
        "--report",
        str(out / "r.json"),
    ]


def write_text_matrix(path: Path, matrix: np.ndarray) -> Path:
    path.write_text("\n".join(" ".join(repr(float(v)) for v in row) for row in matrix) + "\n")
    return path


def test_missing_mr_file(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "nope.nii.gz"
    args = [
        "register",
        *pair_args({**inputs, "mr": missing}),
        "--out-transform",
        str(out / "t.tfm"),
        "--report",
        str(out / "r.json"),
    ]
    run_failing(args, out, capsys, missing)


def test_corrupt_model_file(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    raw = inputs["model"].read_bytes()
    inputs["model"].write_bytes(raw[: len(raw) // 3])
    args = [
        "register",
        *pair_args(inputs),
        "--out-transform",
        str(out / "t.tfm"),
        "--report",
        str(out / "r.json"),
    ]
    run_failing(args, out, capsys, inputs["model"])
    run_failing(["score", *pair_args(inputs), "--transform", str(inputs["gt"])], out, capsys, inputs["model"])


def test_text_file_as_model(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    inputs["model"].write_bytes(b"hello world")
    args = ["register", *pair_args(inputs), "--out-transform", str(out / "t.tfm")]
    run_failing(args, out, capsys, inputs["model"])


def test_initial_transform_with_nan(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    matrix = np.eye(4)
    matrix[1, 3] = np.nan
    init = write_text_matrix(tmp_path / "init.txt", matrix)
    args = register_with_init(inputs, init, out)
    err = run_failing(args, out, capsys, init)
    assert "NaN" in err


def test_non_rigid_transform(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.2, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    init = tmp_path / "scaled.tfm"
    sitk.WriteTransform(affine, str(init))
    args = register_with_init(inputs, init, out)
    err = run_failing(args, out, capsys, init)
    assert "rigid" in err
    err = run_failing(["score", *pair_args(inputs), "--transform", str(init)], out, capsys, init)
    assert "rigid" in err


def test_failures_leave_inputs_untouched(inputs, tmp_path, capsys):
    before = fingerprint(inputs.values())
    init = write_text_matrix(tmp_path / "init.txt", np.full((4, 4), np.nan))
    out = tmp_path / "out"
    main(["register", *pair_args(inputs), "--init", str(init), "--out-transform", str(out / "t.tfm")])
    capsys.readouterr()
    assert fingerprint(inputs.values()) == before


def test_unwritable_report_leaves_no_partial_output(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = [
        "register",
        *pair_args(inputs),
        "--out-transform",
        str(out / "t.tfm"),
        "--report",
        str(blocker / "r.json"),
    ]
    run_failing(args, out, capsys, blocker)


def calibrate_args(model: Path, data: Path, out: Path) -> list[str]:
    """An ``airreg calibrate`` command line."""
    return ["calibrate", "--model", str(model), "--data", str(data), "--out", str(out)]


def test_calibrate_rewrites_only_the_calibration(tiny_dataset, tiny_model, tmp_path, capsys):
    import torch

    from airreg import checkpoint, scoring

    out = tmp_path / "calibrated.pt"
    assert main([*calibrate_args(tiny_model, tiny_dataset, out), "--device", "cpu"]) == 0
    before, after = checkpoint.load(tiny_model), checkpoint.load(out)
    assert after["calibration"]["statistic"] in scoring.STATISTICS
    assert after["metadata"]["calibration_split"] == "val"
    assert after["metadata"]["calibration_cases"] == before["metadata"]["val_cases"]
    assert "optimizer_g" not in after
    for key, tensor in before["generator"].items():
        assert torch.equal(tensor, after["generator"][key])
    assert main(calibrate_args(tiny_model, tiny_dataset, tmp_path)) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("statistic", ["critic", "contrast"])
def test_calibrate_keeps_the_statistic_asked_for(tiny_dataset, tiny_model, tmp_path, statistic):
    from airreg import checkpoint

    out = tmp_path / f"{statistic}.pt"
    args = calibrate_args(tiny_model, tiny_dataset, out)
    assert main([*args, "--statistic", statistic, "--device", "cpu"]) == 0
    calibration = checkpoint.load(out)["calibration"]
    assert calibration["statistic"] == statistic
    assert len(calibration["critic"]) == len(calibration["tre_mm"]) > 0


def test_calibrate_refuses_an_unknown_statistic(tiny_dataset, tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([*calibrate_args(tiny_model, tiny_dataset, tmp_path / "m.pt"), "--statistic", "mean"])
    assert info.value.code == 2 and "invalid choice: 'mean'" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_the_bundled_model_comes_with_the_phantom_disclaimer(inputs, capsys):
    assert main(["score", *pair_args(inputs), "--transform", str(inputs["gt"])]) == 0
    assert "synthetic phantoms" not in capsys.readouterr().out  # a model of one's own: no disclaimer
    args = [
        "score",
        "--mr",
        str(inputs["mr"]),
        "--trus",
        str(inputs["trus"]),
        "--transform",
        str(inputs["gt"]),
    ]
    for model in ([], ["--model", "phantom-3dof"]):
        assert main([*args, *model, "--device", "cpu"]) == 0
        assert "trained on synthetic phantoms only" in capsys.readouterr().out
