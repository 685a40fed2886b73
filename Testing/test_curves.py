"""scripts/curves.py: the fine-tune-against-scratch and learning-curve PNGs of BENCHMARKS.md."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def curves():
    spec = importlib.util.spec_from_file_location("curves", ROOT / "scripts" / "curves.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir()
    with open(folder / "log.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def _summary(folder: Path, before: float, one: float, after: float) -> Path:
    folder.mkdir()
    summary = {"tre_before": {"mean": before}, "tre_one_pass": {"mean": one}, "tre_after": {"mean": after}}
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder


def test_minutes_curve_is_a_png(curves, tmp_path):
    rows = [
        {"epoch": i, "seconds": 30.0, "val_tre_before": 5.0, "val_tre_after": 5.0 - i} for i in range(1, 4)
    ]
    a, b = _run(tmp_path / "a", rows), _run(tmp_path / "b", rows[:2])
    curves.main(["minutes", str(tmp_path / "m.png"), f"scratch={a}", f"fine-tuned={b}"])
    assert (tmp_path / "m.png").read_bytes().startswith(PNG_SIGNATURE)


def test_learning_curve_is_a_png(curves, tmp_path):
    args = [f"{n}={_summary(tmp_path / str(n), 5.0, 4.0 - n / 100, 3.0)}" for n in (25, 50, 100)]
    curves.main(["cases", str(tmp_path / "c.png"), *args])
    assert (tmp_path / "c.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    "args, message",
    [
        (["minutes", "x.png", "no-equals-sign"], "expected NAME=PATH, got 'no-equals-sign'"),
        (["curve", "x.png", "a=b"], "python scripts/curves.py minutes"),
        (["cases"], "python scripts/curves.py cases"),
        (["cases", "x.png", "many=somewhere"], "each NAME must be a number of training cases"),
        (["cases", "x.png", "50=missing"], "missing/summary.json: not a readable airreg evaluate summary"),
        (["minutes", "x.png", "a=missing"], "missing/log.csv: not a readable airreg training log"),
    ],
)
def test_bad_arguments_are_refused(curves, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        curves.main(args)
    assert message in str(info.value.code)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "iterative, lines", [(None, {"start", "one G pass"}), (2.5, {"start", "one G pass", "iterative"})]
)
def test_the_iterative_line_is_drawn_only_where_it_differs(curves, iterative, lines, tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(curves.plotting, "learning_curve", lambda points, png: drawn.update(points))
    args = [f"{n}={_summary(tmp_path / str(n), 5.0, 3.0, iterative or 3.0)}" for n in (25, 50)]
    curves.main(["cases", str(tmp_path / "c.png"), *args])
    assert {n: set(p) for n, p in drawn.items()} == {25: lines, 50: lines}


@pytest.mark.parametrize(
    "text, message",
    [
        ("epoch,seconds\n1,3\n", "not a readable airreg training log (KeyError('val_tre_before'))"),
        ("epoch,seconds,val_tre_before,val_tre_after\n1,x,5,4\n", "not a readable airreg training log"),
        ("epoch,seconds,val_tre_before,val_tre_after\n", "no epochs logged"),
    ],
)
def test_a_bad_training_log_is_one_line_naming_it(curves, text, message, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.csv").write_text(text, encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        curves.main(["minutes", str(tmp_path / "m.png"), f"a={tmp_path / 'run'}"])
    assert message in str(info.value.code) and str(tmp_path / "run" / "log.csv") in str(info.value.code)
    assert "\n" not in str(info.value.code) and not (tmp_path / "m.png").exists()
