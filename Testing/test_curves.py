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
