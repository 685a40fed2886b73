"""Draw the fine-tune-against-scratch curve and the learning curve of BENCHMARKS.md §8.2 as PNG.

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
    with open(run / "log.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] not in ("minutes", "cases"):
        raise SystemExit(__doc__)
    kind, png, pairs = argv[0], Path(argv[1]), _pairs(argv[2:])
    if kind == "minutes":
        plotting.tre_against_minutes({name: _history(run) for name, run in pairs}, png)
    else:
        points = {}
        for name, folder in pairs:
            summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
            points[int(name)] = {
                "start": summary["tre_before"]["mean"],
                "one G pass": summary["tre_one_pass"]["mean"],
                "iterative": summary["tre_after"]["mean"],
            }
        if all(p["iterative"] == p["one G pass"] for p in points.values()):  # D chose no pass: one line
            for p in points.values():
                del p["iterative"]
        plotting.learning_curve(points, png)
    print(png)


if __name__ == "__main__":
    main(sys.argv[1:])
