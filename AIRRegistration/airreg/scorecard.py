"""``airreg benchmark --scorecard``: every figure the project's goals name, measured side by side in one run.

For each model (default: both bundled models), on the same held-out cases and seeded starts of the model's own
protocol (3-DOF axial or 6-DOF, :func:`airreg.evaluation.random_starts`):

* accuracy — TRE at the start, after one G pass and after the iterative registration (``airreg register``'s
  default), and the share under 2 mm;
* the quality flag — AUROC of P(TRE > tolerance) for TRE > tolerance, the start and the result of every pair
  pooled (as ``airreg evaluate``), and how many results above the tolerance were reported "ok";
* speed against Mattes MI — MI (:func:`airreg.benchmark.mi_registration`) from the same starts: the ratio of
  the median seconds per pair, MI over one AIR-net pass;
* latency — one pair, one CPU thread, one G pass with D, the patient check and the verdict
  (:func:`airreg.benchmark.airnet_latency`), at the data's size and with the TRUS upsampled to about
  :data:`BIG_TRUS_MEGAVOXELS` M voxels (the size of clinical 3D TRUS volumes);
* training time — the whole pipeline (training epochs, critic refinement, patient check, cascade refiner) as
  recorded in the model file's own metadata, on whatever machine made it.

Each figure is set against the goal of the project's issue 15 (:data:`GOALS`), met or not.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import data
from .benchmark import AIRNET_ITERATIONS, airnet_latency, mi_registration, upsampled_cases
from .evaluation import random_starts, summary_stats, tre_mm, tre_points
from .fileio import write_json, write_text
from .plotting import box_plots
from .quality import auroc
from .registration import Registrar

#: Size (M voxels) the TRUS volumes are upsampled to for the large-input latency row.
BIG_TRUS_MEGAVOXELS = 50.0
#: Pairs timed for latency (each once after a warm-up; the median is reported).
LATENCY_PAIRS = 5
BUNDLED = ("phantom-3dof", "phantom-6dof")


@dataclass(frozen=True)
class Goal:
    """One goal: the scorecard key it reads, the bound, and whether lower is better."""

    key: str
    label: str
    bound: float
    lower_is_better: bool
    unit: str

    def met(self, value: float | None) -> bool | None:
        if value is None or not np.isfinite(value):
            return None
        return value <= self.bound if self.lower_is_better else value >= self.bound

    def text(self) -> str:
        bound = f"{self.bound:.0%}" if self.unit == "%" else f"{self.bound:g}{self.unit}"
        return f"{'≤' if self.lower_is_better else '≥'} {bound}"


def _goals(tre_mm_goal: float, under_2mm_goal: float | None, latency_ms: float) -> tuple[Goal, ...]:
    goals = [Goal("tre_iterative_mean", "mean TRE, iterative (mm)", tre_mm_goal, True, " mm")]
    if under_2mm_goal is not None:
        goals.append(Goal("tre_iterative_under_2mm", "share < 2 mm, iterative", under_2mm_goal, False, "%"))
    return (
        *goals,
        Goal("flag_auroc", "flag AUROC for TRE > 5 mm (start and result pooled)", 0.95, False, ""),
        Goal(
            "latency_ms",
            "one pair, 1 thread (resampling + G + D + patient check), ms",
            latency_ms,
            True,
            " ms",
        ),
        Goal(
            "latency_big_ms", f"the same with a {BIG_TRUS_MEGAVOXELS:g} M-voxel TRUS, ms", 100.0, True, " ms"
        ),
        Goal("speedup_vs_mi", "speed against Mattes MI (MI s / AIR-net one pass s)", 30.0, False, "×"),
        Goal("pipeline_minutes", "training pipeline (from the model file), minutes", 45.0, True, " min"),
    )


#: The goals of issue 15, per degrees of freedom of the model.
GOALS: dict[int, tuple[Goal, ...]] = {3: _goals(1.0, None, 40.0), 6: _goals(2.0, 0.6, 80.0)}


def pipeline_minutes(state: dict) -> dict | None:
    """Minutes of each training stage recorded in a model file (None where the file does not say)."""
    history = state.get("history") or []
    seconds = [h.get("seconds") for h in history]
    if not history or any(not isinstance(s, int | float) for s in seconds):
        return None
    metadata = state.get("metadata") or {}
    stages = {"train": float(sum(seconds))}
    for name in ("critic_refinement", "patient_check", "refiner"):
        stage = metadata.get(name)
        if isinstance(stage, dict) and isinstance(stage.get("seconds"), int | float):
            stages[name] = float(stage["seconds"])
    minutes = {k: v / 60 for k, v in stages.items()}
    minutes["total"] = sum(minutes.values())
    return minutes


def big_trus_spacing(case: data.Case, megavoxels: float = BIG_TRUS_MEGAVOXELS) -> float:
    """Isotropic spacing (mm) at which the case's TRUS box holds about ``megavoxels`` M voxels."""
    extent = (np.asarray(case.trus.GetSize()) - 1) * np.asarray(case.trus.GetSpacing())
    return float((np.prod(extent) / (megavoxels * 1e6)) ** (1 / 3))


def accuracy_and_speed(
    registrar: Registrar, cases: Sequence[data.Case], seed: int, mi_iterations: int, progress: bool
) -> dict:
    """TRE, the flag's AUROC and the per-pair seconds of AIR-net and MI from the same seeded starts."""
    dof = registrar.config.dof
    starts = random_starts(cases, dof, seed)
    mi = mi_registration(iterations=mi_iterations, seed=seed)
    registrar.register(cases[0].mr, cases[0].trus, starts[0], iterations=1)  # warm-up, not timed
    tre = {"start": [], "one_pass": [], "iterative": [], "mi": []}
    seconds = {"one_pass": [], "mi": []}
    p_fail, pooled_tre, ok_above = [], [], 0
    bar = tqdm(cases, desc=f"{registrar.model_id}: pairs", disable=not progress, unit="pair", leave=False)
    for case, start in zip(bar, starts, strict=True):
        points = tre_points(case)
        t0 = time.perf_counter()
        one = registrar.register(case.mr, case.trus, start, iterations=1)
        t_one = time.perf_counter() - t0
        full = registrar.register(case.mr, case.trus, start, iterations=AIRNET_ITERATIONS)
        t0 = time.perf_counter()
        mi_result = mi(case, start)
        t_mi = time.perf_counter() - t0
        tre["start"].append(tre_mm(start, points))
        tre["one_pass"].append(tre_mm(one.mr_to_trus, points))
        tre["iterative"].append(tre_mm(full.mr_to_trus, points))
        tre["mi"].append(tre_mm(mi_result, points))
        seconds["one_pass"].append(t_one)
        seconds["mi"].append(t_mi)
        p_fail += [full.before.p_failure, full.after.p_failure]
        pooled_tre += [tre["start"][-1], tre["iterative"][-1]]
        ok_above += int(tre["iterative"][-1] > full.after.tolerance_mm and full.quality == "ok")
    tolerance = registrar.tolerance_mm
    median_s = {k: float(np.median(v)) for k, v in seconds.items()}
    return {
        "dof": dof,
        "cases": len(cases),
        "seed": seed,
        "tre": {k: summary_stats(v) for k, v in tre.items()},
        "tre_per_case": tre,
        "worse_than_start": int(sum(a > s for a, s in zip(tre["iterative"], tre["start"], strict=True))),
        "flag_auroc": auroc(np.asarray(p_fail), np.asarray(pooled_tre) > tolerance),
        "ok_above_tolerance": ok_above,
        "tolerance_mm": tolerance,
        "median_seconds": median_s,
        "speedup_vs_mi": median_s["mi"] / median_s["one_pass"],
    }


def latency(registrar: Registrar, cases: Sequence[data.Case]) -> dict:
    """Median ms per pair (wall-clock and the thread's CPU time), one thread, one G pass from the ground truth."""
    row = airnet_latency(registrar, cases, threads=1, n_cases=LATENCY_PAIRS, repeats=1, batch=1)[0]
    keys = ("resampling_ms", "generator_ms", "discriminator_ms", "total_ms", "cpu_ms", "mean_tre_mm")
    return {k: row[k] for k in keys}


def model_scorecard(
    model: str | Path,
    cases: Sequence[data.Case],
    big_cases: Sequence[data.Case],
    seed: int,
    device: str,
    mi_iterations: int,
    progress: bool,
) -> dict:
    """All the figures of one model, and each goal met or not."""
    state = ckpt.load(model)
    registrar = Registrar(state, device, AIRNET_ITERATIONS)
    card = accuracy_and_speed(registrar, cases, seed, mi_iterations, progress)
    card["latency"] = latency(registrar, cases)
    card["latency_big"] = latency(registrar, big_cases)
    card["pipeline_minutes"] = pipeline_minutes(state)
    card["model"] = {"id": registrar.model_id, "sha256": registrar.model_sha256, "dof": registrar.config.dof}
    figures = {
        "tre_iterative_mean": card["tre"]["iterative"]["mean"],
        "tre_iterative_under_2mm": card["tre"]["iterative"]["under_2mm"],
        "flag_auroc": card["flag_auroc"],
        "latency_ms": card["latency"]["total_ms"],
        "latency_big_ms": card["latency_big"]["total_ms"],
        "speedup_vs_mi": card["speedup_vs_mi"],
        "pipeline_minutes": None if card["pipeline_minutes"] is None else card["pipeline_minutes"]["total"],
    }
    card["goals"] = [
        {
            "key": g.key,
            "label": g.label,
            "goal": g.text(),
            "value": figures[g.key],
            "met": g.met(figures[g.key]),
        }
        for g in GOALS[registrar.config.dof]
    ]
    return card


def run_scorecard(
    data_root: Path,
    models: Sequence[str | Path],
    seed: int,
    device: str = "cpu",
    quick: bool = False,
    progress: bool = True,
    big_megavoxels: float = BIG_TRUS_MEGAVOXELS,
) -> dict:
    """The scorecard of each model on the cases of ``data_root`` (``quick``: 3 cases, short MI); the large-input
    rows upsample the TRUS to about ``big_megavoxels`` M voxels."""
    cases = data.load_dataset(Path(data_root), require_gt=True, progress=progress)
    if quick:
        cases = cases[:3]
    n_big = 2 if quick else LATENCY_PAIRS
    spacing = big_trus_spacing(cases[0], big_megavoxels)
    big = upsampled_cases(cases[:n_big], spacing, None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the latency goals are for one thread; MI keeps SimpleITK's own threads
    try:
        cards = [model_scorecard(m, cases, big, seed, device, 20 if quick else 100, progress) for m in models]
    finally:
        torch.set_num_threads(threads)
    return {
        "data": str(data_root),
        "cases": len(cases),
        "seed": seed,
        "big_trus": {
            "spacing_mm": spacing,
            "megavoxels": float(np.mean([np.prod(c.trus.GetSize()) for c in big])) / 1e6,
            "pairs": len(big),
        },
        "models": cards,
    }


def write_scorecard(report: dict, out: Path, command: str) -> str:
    """Write ``benchmark.json``, ``benchmark.md`` and ``tre_boxplots.png`` (TRE per model and AIR-net stage) in ``out``;
    returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(report, command)
    box_plots(
        {
            f"TRE (mm), {card['dof']}-DOF model": {
                "start": card["tre_per_case"]["start"],
                "1 G pass": card["tre_per_case"]["one_pass"],
                "iterative": card["tre_per_case"]["iterative"],
            }
            for card in report["models"]
        },
        out / "tre_boxplots.png",
        "AIR-net, same pairs and starts (MI's TRE: benchmark.md)",
    )
    write_json(out / "benchmark.json", {"command": command, **report}, undefined_as_null=True)
    write_text(out / "benchmark.md", text)
    return text


def _value(goal: dict) -> str:
    v = goal["value"]
    if v is None or not np.isfinite(v):
        return "not recorded"
    if goal["key"] == "tre_iterative_under_2mm":
        return f"{v:.0%}"
    if goal["key"] == "flag_auroc":
        return f"{v:.4f}"  # 0.9497 would print as 0.950 at three places, beside a goal of 0.95 not met
    return f"{v:.1f}" if goal["key"] in ("speedup_vs_mi", "latency_ms", "latency_big_ms") else f"{v:.2f}"


def markdown(report: dict, command: str) -> str:
    """The scorecard as a Markdown table (one row per goal and model), with each model's details below."""
    lines = [
        "# AIR-net scorecard: the goals, measured side by side in one run",
        "",
        f"Command: `{command}`",
        "",
        f"Data: `{report['data']}` ({report['cases']} cases, seed of the starts {report['seed']}); large-input "
        f"rows: the TRUS of the first {report['big_trus']['pairs']} pairs upsampled to "
        f"{report['big_trus']['spacing_mm']:.3f} mm ({report['big_trus']['megavoxels']:.1f} M voxels).",
        "",
        "| model | figure | measured | goal | met |",
        "|---|---|---|---|---|",
    ]
    for card in report["models"]:
        name = f"{card['model']['id']} ({card['dof']}-DOF starts)"
        for g in card["goals"]:
            met = "–" if g["met"] is None else ("**yes**" if g["met"] else "no")
            lines.append(f"| {name} | {g['label']} | {_value(g)} | {g['goal']} | {met} |")
    lines.append("")
    for card in report["models"]:
        t, lat, big, mins = card["tre"], card["latency"], card["latency_big"], card["pipeline_minutes"]
        stages = (
            "not recorded"
            if mins is None
            else ", ".join(f"{k.replace('_', ' ')} {v:.0f}" for k, v in mins.items() if k != "total")
        )
        lines += [
            f"## {card['model']['id']} (sha256 {card['model']['sha256'][:12]})",
            "",
            f"- TRE (mm, mean / median / p90 / < 2 mm): start {_tre(t['start'])}; one G pass {_tre(t['one_pass'])}; "
            f"iterative {_tre(t['iterative'])}; MI {_tre(t['mi'])}. Worse than the start (iterative): "
            f"{card['worse_than_start']} of {card['cases']}.",
            f"- Flag: AUROC {card['flag_auroc']:.4f}; results with TRE > {card['tolerance_mm']:g} mm reported "
            f'"ok": {card["ok_above_tolerance"]}.',
            f"- Median seconds per pair: AIR-net one pass {card['median_seconds']['one_pass']:.4f}, MI "
            f"{card['median_seconds']['mi']:.3f}.",
            f"- Latency (ms, 1 thread; resampling / G / D / total / CPU): {_lat(lat)}; large TRUS: {_lat(big)}.",
            f"- Training pipeline (minutes, from the model file): {stages}.",
            "",
        ]
    return "\n".join(lines)


def _tre(s: dict) -> str:
    return f"{s['mean']:.2f} / {s['median']:.2f} / {s['p90']:.2f} / {s['under_2mm']:.0%}"


def _lat(r: dict) -> str:
    cpu = "–" if r["cpu_ms"] is None else f"{r['cpu_ms']:.1f}"
    return (
        f"{r['resampling_ms']:.1f} / {r['generator_ms']:.1f} / {r['discriminator_ms']:.1f} / "
        f"{r['total_ms']:.1f} / {cpu}"
    )
