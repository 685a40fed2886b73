"""Draw the fine-tune-against-scratch curve and the learning curve of BENCHMARKS.md §8.3–8.4 as PNG.

    python scripts/curves.py minutes OUT.png LABEL=RUN_FOLDER ...      # validation TRE against training minutes
    python scripts/curves.py cases OUT.png CASES=EVAL_FOLDER ...       # test TRE against training cases

RUN_FOLDER holds an ``airreg train`` run's ``log.csv``; EVAL_FOLDER an ``airreg evaluate`` output's
``summary.json``.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from airreg import plotting


def _pairs(args: list[str]) -> list[tuple[str, Path]]:
    """``NAME=PATH`` arguments as (name, path), refusing anything else."""
    pairs = []
    for arg in args:
        name, sep, path = arg.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"curves.py: expected NAME=PATH, got {arg!r}")
        pairs.append((name, Path(path)))
    return pairs


def _history(run: Path) -> list[dict]:
    """The rows of a run's ``log.csv``, checked for the columns the curve needs."""
    path = run / "log.csv"
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            float(row["seconds"]), float(row["val_tre_before"]), float(row["val_tre_after"])
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as exc:
        raise SystemExit(f"curves.py: {path}: not a readable airreg training log ({exc!r})") from None
    if not rows:
        raise SystemExit(f"curves.py: {path}: no epochs logged")
    return rows


def _means(folder: Path) -> dict[str, float]:
    """Mean TRE at the start, after one G pass and iterative, from an ``airreg evaluate`` summary."""
    path = folder / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        keys = {"start": "tre_before", "one G pass": "tre_one_pass", "iterative": "tre_after"}
        return {label: float(summary[key]["mean"]) for label, key in keys.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"curves.py: {path}: not a readable airreg evaluate summary ({exc!r})") from None


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] not in ("minutes", "cases"):
        raise SystemExit(__doc__)
    kind, png, pairs = argv[0], Path(argv[1]), _pairs(argv[2:])
    if kind == "minutes":
        plotting.tre_against_minutes({name: _history(run) for name, run in pairs}, png)
    else:
        if not all(name.isdigit() and int(name) > 0 for name, _ in pairs):
            raise SystemExit("curves.py: cases: each NAME must be a number of training cases, e.g. 50=eval/x")
        points = {int(name): _means(folder) for name, folder in pairs}
        if all(p["iterative"] == p["one G pass"] for p in points.values()):  # D chose no pass: one line
            for p in points.values():
                del p["iterative"]
        plotting.learning_curve(points, png)
    print(png)


if __name__ == "__main__":
    main(sys.argv[1:])
