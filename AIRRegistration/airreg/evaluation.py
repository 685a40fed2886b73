"""Evaluation with the paper's protocol (section 3.2) and the figures that go with it.

Per case a random start is made like the training perturbations — a rigid perturbation of the ground truth in the
grid frame, ±25° and ±5 mm, 3-DOF axial or 6-DOF — drawn from a seed, so every method sees the same starts. TRE
is measured on the case's landmarks when it has them (distance between the mapped MR landmark and the TRUS
landmark), else on points spread through the MR gland mask (distance between the estimate's and the ground
truth's images of the point).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import stats

from . import data, geometry, resampling
from .checkpoint import FLAG_NOT_CALIBRATED
from .config import PAPER_ROTATION_DEG, PAPER_TRANSLATION_MM
from .errors import AirRegError
from .fileio import atomic_write, write_json, write_text, written_at_once
from .plotting import box_plots, fusion_panels, scatter
from .quality import QualityResult, auroc
from .registration import Registrar

#: Number of gland points used for transform-derived TRE when a case has no landmarks.
TRE_POINTS = 32


def random_start(
    case: data.Case,
    dof: int,
    rng: np.random.Generator,
    rotation_deg: float = PAPER_ROTATION_DEG,
    translation_mm: float = PAPER_TRANSLATION_MM,
) -> np.ndarray:
    """MR->TRUS start: the ground truth perturbed in the grid frame like a training sample (paper protocol)."""
    u = rng.uniform(-1.0, 1.0, size=dof)
    scale = [rotation_deg] + [translation_mm] * 2 if dof == 3 else [rotation_deg] * 3 + [translation_mm] * 3
    perturb = geometry.RigidTransform.from_vector(u * np.array(scale), dof).matrix
    return case.gt @ geometry.to_world(perturb, resampling.mr_frame(case.mr))


def tre_points(case: data.Case, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(MR points, TRUS points) used for TRE: landmarks, else gland points mapped by the ground truth."""
    if case.landmarks_mr is not None and len(case.landmarks_mr):
        return case.landmarks_mr, case.landmarks_trus
    if case.gt is None:
        raise ValueError(f"{case.case_id}: TRE needs landmarks or a ground-truth transform")
    if case.mr_mask is not None:
        mr_pts = data.points_in_mask(case.mr_mask, TRE_POINTS, seed)
    else:
        mr_pts = resampling.physical_center(case.mr) + np.random.default_rng(seed).normal(
            scale=12.0, size=(TRE_POINTS, 3)
        )
    return mr_pts, geometry.apply(case.gt, mr_pts)


def tre_mm(transform: np.ndarray, points: tuple[np.ndarray, np.ndarray]) -> float:
    """Mean distance (mm) between the transform's image of the MR points and the TRUS points."""
    mr_pts, trus_pts = points
    return float(np.linalg.norm(geometry.apply(transform, mr_pts) - trus_pts, axis=1).mean())


def summary_stats(values: Sequence[float], tolerances: Sequence[float] = (2.0, 5.0)) -> dict:
    """Mean, median, percentiles and share under each tolerance of a list of TREs."""
    v = np.asarray(values, float)
    out = {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "median": float(np.median(v)),
        "p10": float(np.percentile(v, 10)),
        "p25": float(np.percentile(v, 25)),
        "p75": float(np.percentile(v, 75)),
        "p90": float(np.percentile(v, 90)),
        "max": float(v.max()),
    }
    for tol in tolerances:
        out[f"under_{tol:g}mm"] = float((v < tol).mean())
    return out


def slice_through(stack: np.ndarray) -> np.ndarray:
    """The middle slice of an (S, H, W) stack, for figures."""
    return stack[stack.shape[0] // 2]


def overlay_png(
    registrar: Registrar,
    mr: sitk.Image,
    trus: sitk.Image,
    alignments: Sequence[tuple[str, np.ndarray]],
    png: Path,
    suptitle: str = "",
) -> Path:
    """Fig. 3-style panels: MR grey, TRUS colour, one panel per alignment with its D-score in the corner."""
    mr_slices, trus_slices, titles = [], [], []
    for label, transform in alignments:
        mr_stack, trus_stack, verdict = registrar.inspect(mr, trus, transform)
        mr_slices.append(slice_through(mr_stack))
        trus_slices.append(slice_through(trus_stack))
        titles.append(f"{label}\nD-score {verdict.d_score:.2f}")
    return fusion_panels(mr_slices, trus_slices, titles, png, suptitle)


def random_starts(cases: Sequence[data.Case], dof: int, seed: int) -> list[np.ndarray]:
    """One seeded start per case, drawn up front so that every method sees the same starts."""
    rng = np.random.default_rng(seed)
    return [random_start(c, dof, rng) for c in cases]


def evaluate_cases(
    cases: Sequence[data.Case], registrar: Registrar, starts: Sequence[np.ndarray], progress: bool = True
) -> tuple[list[dict], list[np.ndarray]]:
    """Per-case rows (TRE and D-score at the start, after one G pass, after the iterative registration) and the
    final MR->TRUS transforms."""
    from tqdm import tqdm  # here: the Slicer self-test imports this module (random_start) without tqdm

    rows, finals = [], []
    for case, start in zip(
        tqdm(cases, desc="evaluating", disable=not progress, unit="case"), starts, strict=True
    ):
        points = tre_points(case)
        one = registrar.register(case.mr, case.trus, start, iterations=1)
        full = registrar.register(case.mr, case.trus, start)
        finals.append(full.mr_to_trus)
        at_gt = registrar.score(case.mr, case.trus, case.gt)
        rows.append(
            {
                "case": case.case_id,
                "tre_before": tre_mm(start, points),
                "tre_one_pass": tre_mm(one.mr_to_trus, points),
                "tre_after": tre_mm(full.mr_to_trus, points),
                "d_before": full.d_score_before,
                "d_one_pass": one.d_score,
                "d_after": full.d_score,
                "d_ground_truth": at_gt.d_score,
                "p_fail_before": full.before.p_failure,
                "p_fail_after": full.after.p_failure,
                "est_tre_before": full.before.estimated_tre_mm,
                "est_tre_after": full.estimated_tre_mm,
                "flag_before": full.before.quality == "warning",
                "flag_after": full.quality == "warning",
                "same_patient_after": full.after.same_patient_score,
                "patient_flag_after": full.after.patient_flagged,
                "input_statistic": _input_statistic(full.after),
                "out_of_distribution": full.after.out_of_distribution,
                "seconds_one_pass": one.seconds,
                "seconds": full.seconds,
            }
        )
    return rows, finals


def _input_statistic(verdict: QualityResult) -> float:
    """The input check's statistic of a verdict (NaN for a model without the check)."""
    return float("nan") if verdict.input_check is None else verdict.input_check.statistic


def gross_failures(cases: Sequence[data.Case], registrar: Registrar, progress: bool = True) -> dict:
    """How often the warning fires on registrations that cannot be right: inputs swapped (TRUS given as MR) and
    another patient's TRUS (the next case's), each registered from aligned volume centres. A clear input error
    (e.g. no overlap) counts as caught too; returns ``{kind: {"warned", "patient_check", "errors", "cases"}}``,
    ``patient_check`` counting the registrations the model's patient check flagged."""
    counts = {
        kind: {"warned": 0, "patient_check": 0, "errors": 0, "cases": len(cases)}
        for kind in ("swapped", "other_patient")
    }
    from tqdm import tqdm

    for i, case in enumerate(tqdm(cases, desc="gross failures", disable=not progress, unit="case")):
        other = cases[(i + 1) % len(cases)]
        for kind, (mr, trus) in (("swapped", (case.trus, case.mr)), ("other_patient", (case.mr, other.trus))):
            try:
                verdict = registrar.register(mr, trus).after
            except AirRegError:
                counts[kind]["errors"] += 1
                continue
            counts[kind]["warned"] += verdict.quality == "warning"
            counts[kind]["patient_check"] += verdict.patient_flagged
    return counts


def summarize(rows: Sequence[dict], tolerance_mm: float) -> dict:
    """Aggregate figures: TRE statistics, paired test, D-score/TRE correlation and the flag's AUROC."""
    col = {k: np.array([r[k] for r in rows], dtype=float) for k in rows[0] if k != "case"}
    tre_all = np.concatenate([col["tre_before"], col["tre_after"]])
    d_all = np.concatenate([col["d_before"], col["d_after"]])
    p_all = np.concatenate([col["p_fail_before"], col["p_fail_after"]])
    flags = np.concatenate([col["flag_before"], col["flag_after"]]).astype(bool)
    failing = tre_all > tolerance_mm
    paired = stats.wilcoxon(col["tre_before"], col["tre_after"]) if len(rows) > 1 else None
    checked = np.isfinite(col["same_patient_after"]).all()
    ood_checked = np.isfinite(col["input_statistic"]).all()
    ok_failing = (col["tre_after"] > tolerance_mm) & ~col["flag_after"].astype(bool)
    return {
        "cases": len(rows),
        "tolerance_mm": tolerance_mm,
        "tre_before": summary_stats(col["tre_before"]),
        "tre_one_pass": summary_stats(col["tre_one_pass"]),
        "tre_after": summary_stats(col["tre_after"]),
        "worse_than_start": float((col["tre_after"] > col["tre_before"]).mean()),
        "wilcoxon_p_before_vs_after": None if paired is None else float(paired.pvalue),
        "d_score_before_mean": float(col["d_before"].mean()),
        "d_score_after_mean": float(col["d_after"].mean()),
        "d_score_ground_truth_mean": float(col["d_ground_truth"].mean()),
        "spearman_d_score_vs_tre": float(stats.spearmanr(d_all, tre_all).statistic),
        "auroc_flag_tre_above_tolerance": auroc(p_all, failing),
        "flag_sensitivity": float(flags[failing].mean()) if failing.any() else None,
        "flag_specificity": float((~flags[~failing]).mean()) if (~failing).any() else None,
        "patient_check_false_alarms": float(col["patient_flag_after"].mean()) if checked else None,
        "ok_above_tolerance": int(ok_failing.sum()),
        "out_of_distribution": float(col["out_of_distribution"].mean()) if ood_checked else None,
        "good_flagged_out_of_distribution": int(
            ((col["tre_after"] < 2.0) & col["out_of_distribution"].astype(bool)).sum()
        ),
        "median_seconds_one_pass": float(np.median(col["seconds_one_pass"])),
        "median_seconds": float(np.median(col["seconds"])),
    }


def markdown(summary: dict, title: str) -> str:
    """A short Markdown report of :func:`summarize`'s figures."""
    lines = [
        f"## {title}",
        "",
        f"{summary['cases']} cases, tolerance {summary['tolerance_mm']:g} mm.",
        "",
        *([f"**WARNING: {FLAG_NOT_CALIBRATED}.**", ""] if summary.get("flag_calibrated") is False else []),
        "| TRE (mm) | mean | median | p90 | < 2 mm | < 5 mm |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in (
        ("tre_before", "start"),
        ("tre_one_pass", "one G pass"),
        ("tre_after", "iterative G + D"),
    ):
        s = summary[key]
        lines.append(
            f"| {label} | {s['mean']:.2f} | {s['median']:.2f} | {s['p90']:.2f} | {s['under_2mm']:.0%} | {s['under_5mm']:.0%} |"
        )
    p = summary["wilcoxon_p_before_vs_after"]
    lines += [
        "",
        f"- Wilcoxon signed-rank p (start vs after): {p:.2g}" if p is not None else "- Wilcoxon: n/a",
        f"- cases worse than their start: {summary['worse_than_start']:.0%}",
        f"- mean D-score: start {summary['d_score_before_mean']:.2f}, after {summary['d_score_after_mean']:.2f}, "
        f"ground truth {summary['d_score_ground_truth_mean']:.2f}",
        f"- Spearman ρ (D-score vs TRE): {summary['spearman_d_score_vs_tre']:.2f}",
        f"- AUROC of the quality flag for TRE > {summary['tolerance_mm']:g} mm: {summary['auroc_flag_tre_above_tolerance']:.3f}",
        f"- median seconds per pair: one pass {summary['median_seconds_one_pass']:.3f}, iterative {summary['median_seconds']:.3f}",
    ]
    lines.append(
        f"- reported ok with TRE > {summary['tolerance_mm']:g} mm after registration: "
        f"{summary['ok_above_tolerance']} of {summary['cases']}"
    )
    if summary["out_of_distribution"] is not None:
        lines.append(
            f"- input check: out of distribution on {summary['out_of_distribution']:.0%} of the pairs "
            f"({summary['good_flagged_out_of_distribution']} of them registered to TRE < 2 mm)"
        )
    if summary["patient_check_false_alarms"] is not None:
        lines.append(
            f"- patient check: another patient flagged on {summary['patient_check_false_alarms']:.0%} of the "
            "registrations above (all of the same patient)"
        )
    for kind, label in (("swapped", "inputs swapped"), ("other_patient", "another patient's TRUS")):
        g = summary.get("gross_failures", {}).get(kind)
        if g:
            lines.append(
                f"- gross failure, {label}: warning on {g['warned']} of {g['cases']} (patient check: "
                f"{g['patient_check']}), input error on {g['errors']}"
            )
    return "\n".join(lines) + "\n"


def write_rows(path: Path, rows: Sequence[dict]) -> Path:
    """Per-case rows as CSV, atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def evaluate(
    data_root: Path,
    out: Path,
    model: Path | None = None,
    dof: int | None = None,
    iterations: int = 3,
    seed: int = 1234,
    tolerance_mm: float = 5.0,
    device: str = "auto",
    overlays: int = 3,
    progress: bool = True,
) -> dict:
    """``airreg evaluate``: per-case CSV, summary JSON and Markdown, box plots, scatter and overlays (PNG)."""
    registrar = Registrar.from_checkpoint(model, device, iterations, tolerance_mm)
    dof = dof or registrar.config.dof
    cases = data.load_dataset(data_root, require_gt=True, progress=progress)
    starts = random_starts(cases, dof, seed)
    rows, finals = evaluate_cases(cases, registrar, starts, progress)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "cases.csv", rows)
    summary = summarize(rows, tolerance_mm)
    if len(cases) > 1:
        summary["gross_failures"] = gross_failures(cases, registrar, progress)
    summary.update(
        model=registrar.model_id,
        model_sha256=registrar.model_sha256,
        flag_calibrated=registrar.flag_note is None,
        dof=dof,
        seed=seed,
        iterations=iterations,
    )
    summary["markdown"] = markdown(summary, f"AIR-net evaluation ({dof}-DOF starts, seed {seed})")
    write_json(out / "summary.json", summary, undefined_as_null=True)
    write_text(out / "summary.md", summary["markdown"])
    col = {k: [r[k] for r in rows] for k in rows[0]}
    box_plots(
        {
            "TRE (mm)": {
                "start": col["tre_before"],
                "one G pass": col["tre_one_pass"],
                "iterative": col["tre_after"],
            },
            "D-score": {
                "start": col["d_before"],
                "after": col["d_after"],
                "ground truth": col["d_ground_truth"],
            },
        },
        out / "boxplots.png",
        "TRE and D-score before and after registration (paper Fig. 4)",
    )
    scatter(
        col["d_before"] + col["d_after"],
        col["tre_before"] + col["tre_after"],
        "D-score",
        "TRE (mm)",
        out / "dscore_vs_tre.png",
        f"Spearman ρ = {summary['spearman_d_score_vs_tre']:.2f}",
    )
    for case, start, final, row in list(zip(cases, starts, finals, rows, strict=True))[:overlays]:
        overlay_png(
            registrar,
            case.mr,
            case.trus,
            [("before", start), ("after", final), ("ground truth", case.gt)],
            out / "overlays" / f"{case.case_id}.png",
            f"{case.case_id}: TRE {row['tre_before']:.1f} -> {row['tre_after']:.1f} mm",
        )
    return summary


def demo(out: Path, seed: int, model: Path | None = None, device: str = "auto") -> dict:
    """Register one synthetic phantom pair (from a paper-protocol start) and write transform, report and overlay."""
    from .phantom import generate_case, write_case

    with written_at_once(remove_on_failure=True):  # read back below, still removed if the demo fails
        case_folder = write_case(generate_case(seed), out / "case")
    case = data.read_case(case_folder, require_gt=True)
    registrar = Registrar.from_checkpoint(model, device, iterations=3)
    start = random_start(case, registrar.config.dof, np.random.default_rng(seed))
    result = registrar.register(case.mr, case.trus, start)
    points = tre_points(case)
    geometry.write_transform(out / "transform.tfm", result.mr_to_trus)
    geometry.write_matrix_text(out / "transform_ras.txt", result.mr_to_trus)
    report = result.report(str(out / "transform.tfm"))
    report.update(
        tre_mm_before=tre_mm(start, points),
        tre_mm_after=tre_mm(result.mr_to_trus, points),
        tre_source="landmarks" if case.landmarks_mr is not None else "ground truth on gland points",
    )
    write_json(out / "report.json", report)
    overlay_png(
        registrar,
        case.mr,
        case.trus,
        [("before", start), ("after", result.mr_to_trus), ("ground truth", case.gt)],
        out / "overlay.png",
        f"TRE {report['tre_mm_before']:.1f} -> {report['tre_mm_after']:.1f} mm",
    )
    return report
