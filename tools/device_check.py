"""The GPU figures of BENCHMARKS.md in one run (issue 15): called by ``tools/device_check.sh`` on a lent machine.

Steps, each timed and written under ``--out`` as it finishes (a step that fails is recorded and the next one runs):

1. ``env.json``: Python, torch, CUDA device, SimpleITK;
2. phantoms: ``--cases`` held-out pairs (seed 9001, as BENCHMARKS.md's test set) and ``--train-cases`` for training;
3. ``airreg benchmark --latency-only`` for the bundled 3-DOF and 6-DOF models: batch 1 latency per pair and the
   networks' throughput at ``--batch`` pairs, with bf16 autocast off and on; and the 3-DOF model with the TRUS
   upsampled to ``--trus-spacing`` mm (about 50 M voxels at 0.21 mm);
4. training throughput (``benchmark.throughput_table``: synthetic caches, presets tiny/default/paper);
5. ``airreg train`` wall-clock for ``--epochs`` short epochs, bf16 autocast on (the default on CUDA) and off;
6. ``summary.md``: every table and command, ready for BENCHMARKS.md.

Run ``python tools/device_check.py --device cpu --quick --out /tmp/x`` to try it on a CPU (tiny settings).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from airreg import benchmark
from airreg.cli import main as airreg
from airreg.distributed import select_device
from airreg.phantom import generate_dataset


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cases", type=int, default=8, help="held-out phantom pairs timed")
    p.add_argument("--train-cases", type=int, default=24)
    p.add_argument("--batch", type=int, default=256, help="pairs per batch for the throughput rows")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the airreg train timing")
    p.add_argument("--trus-spacing", type=float, default=0.21, help="upsampled TRUS (mm); 0 skips the row")
    p.add_argument("--quick", action="store_true", help="tiny settings (to try the script on a CPU)")
    return p.parse_args(argv)


class Steps:
    """Runs named steps, records their seconds and errors in ``steps.json`` after each."""

    def __init__(self, out: Path) -> None:
        self.out, self.records = out, []

    def run(self, name: str, fn, *args) -> object:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result, error = fn(*args), None
        except Exception:  # noqa: BLE001 - one failed measurement must not lose the others
            result, error = None, traceback.format_exc(limit=3)
            print(error, file=sys.stderr, flush=True)
        self.records.append({"step": name, "seconds": time.perf_counter() - t0, "error": error})
        (self.out / "steps.json").write_text(json.dumps(self.records, indent=2))
        return result


def environment(device: torch.device) -> dict:
    import SimpleITK as sitk

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "simpleitk": sitk.Version.VersionString(),
        "platform": platform.platform(),
    }


def cli(argv: list[str]) -> str:
    """Run an ``airreg`` command in this process; returns the command line (raises on a non-zero status)."""
    status = airreg(argv)
    if status:
        raise RuntimeError(f"airreg {argv[0]} exited with status {status}")
    return "airreg " + shlex.join(argv)


def benchmarks(args: argparse.Namespace, data: Path) -> list[str]:
    """The latency runs; returns their commands (each writes benchmark.md under its folder)."""
    common = ["--data", str(data), "--latency-only", "--device", args.device, "--batch", str(args.batch)]
    common += ["--bf16", "--threads", "1"] + (["--quick"] if args.quick else [])
    commands = []
    for name in ("phantom-3dof", "phantom-6dof"):
        commands.append(
            cli(["benchmark", "--out", str(args.out / f"bench-{name}"), "--model", name, *common])
        )
    if args.trus_spacing:
        out = args.out / "bench-phantom-3dof-large"
        large = ["--trus-spacing", str(args.trus_spacing)]
        commands.append(cli(["benchmark", "--out", str(out), "--model", "phantom-3dof", *common, *large]))
    return commands


def training_throughput(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows, skipped = benchmark.throughput_table(device, quick=args.quick, progress=False)
    return rows + [{"preset": k, "skipped": v} for k, v in skipped.items()]


def train_timing(args: argparse.Namespace, data: Path) -> list[dict]:
    """Wall-clock of a short ``airreg train`` (default preset), bf16 autocast on and off."""
    rows = []
    steps = ["--epochs", str(args.epochs), "--steps-per-epoch", "2" if args.quick else "20"]
    preset = ["--preset", "tiny" if args.quick else "default", "--batch-size", "4" if args.quick else "32"]
    for amp in (True, False):
        out = args.out / f"train-{'amp' if amp else 'fp32'}"
        argv = ["train", "--data", str(data), "--out", str(out), *preset, *steps, "--device", args.device]
        argv += [] if amp else ["--no-amp"]
        t0 = time.perf_counter()
        command = cli(argv)
        rows.append({"command": command, "amp": amp, "seconds": time.perf_counter() - t0})
    return rows


def summary(out: Path, env: dict | None, commands, throughput, training) -> str:
    lines = ["# Device check", "", f"Environment: `{json.dumps(env)}`", ""]
    for command in commands or []:
        folder = Path(shlex.split(command)[shlex.split(command).index("--out") + 1])
        md = (folder / "benchmark.md").read_text() if (folder / "benchmark.md").exists() else "(missing)"
        table = md.split("## AIR-net latency per stage (median ms)")[-1].split("## Machine")[0]
        lines += [f"## `{command}`", "", table.strip(), ""]
    lines += [
        "## Training throughput (benchmark.throughput_table)",
        "",
        "```",
        json.dumps(throughput, indent=1),
    ]
    lines += ["```", "", "## airreg train wall-clock", ""]
    for row in training or []:
        lines.append(
            f"- `{row['command']}`: {row['seconds']:.1f} s (bf16 autocast {'on' if row['amp'] else 'off'})"
        )
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.cases, args.train_cases, args.batch, args.epochs = 3, 6, 4, 1
    args.out.mkdir(parents=True, exist_ok=True)
    device = select_device(args.device)
    steps = Steps(args.out)
    env = steps.run("environment", environment, device)
    (args.out / "env.json").write_text(json.dumps(env, indent=2))
    test, train = args.out / "data-test", args.out / "data-train"
    steps.run(
        "phantoms",
        lambda: (generate_dataset(test, args.cases, 9001), generate_dataset(train, args.train_cases, 1)),
    )
    commands = steps.run("latency benchmarks", benchmarks, args, test)
    throughput = steps.run("training throughput", training_throughput, args, device)
    training = steps.run("airreg train timing", train_timing, args, train)
    print(summary(args.out, env, commands, throughput, training))
    return 1 if any(r["error"] for r in steps.records) else 0


if __name__ == "__main__":
    sys.exit(main())
