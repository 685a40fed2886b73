"""PNG figures: loss curves (paper Fig. 2), fusion overlays (Fig. 3) and TRE / D-score box plots (Fig. 4).

matplotlib is imported inside each function (Agg backend), so the rest of the package never loads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .fileio import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, png: Path) -> Path:
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    _pyplot().close(fig)
    return Path(png)


def loss_curves(history: Sequence[dict], png: Path) -> Path:
    """Losses of G and D per epoch, and validation TRE before/after (the paper's Fig. 2, plus TRE)."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("loss_d", "D loss (critic)"), ("loss_adv", "G adversarial loss")):
        ax1.plot(epochs, [row.get(key, np.nan) for row in history], marker=".", label=label)
    ax1b = ax1.twinx()
    ax1b.plot(
        epochs,
        [row.get("loss_param", np.nan) for row in history],
        color="tab:green",
        marker=".",
        label="G parameter loss (mm²)",
    )
    ax1b.set_yscale("log")
    ax1.set_xlabel("epoch")
    ax1.set_title("training losses")
    lines = ax1.get_legend_handles_labels()
    lines_b = ax1b.get_legend_handles_labels()
    ax1.legend(lines[0] + lines_b[0], lines[1] + lines_b[1], fontsize=8, loc="upper right")
    for key, label in (
        ("val_tre_before", "start"),
        ("val_tre_after", "after one G pass"),
        ("train_tre", "train (after G)"),
    ):
        ax2.plot(epochs, [row.get(key, np.nan) for row in history], marker=".", label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("TRE (mm)")
    ax2.set_title("target registration error")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, png)


def critic_curves(history: Sequence[dict], png: Path) -> Path:
    """Critic refinement: its losses per step, and the validation AUROC of the quality flag."""
    plt = _pyplot()
    steps = np.array([row["step"] for row in history])
    ranking = "rank_accuracy" in history[0]
    curves = (
        (("loss_d", "ranking loss"), ("rank_accuracy", "pairs ordered correctly"))
        if ranking
        else (("wasserstein", "Wasserstein estimate"), ("gradient_penalty", "gradient penalty"))
    )
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in curves:
        values = np.array([row.get(key, np.nan) for row in history], dtype=float)
        if np.isfinite(values).any():
            ax1.plot(steps, values, lw=0.8, label=label)
    ax1.set_xlabel("critic step")
    ax1.set_title("critic refinement")
    ax1.legend(fontsize=8)
    _validation_auroc(ax2, history, "critic step", "AUROC, TRE > 5 mm", "validation: quality flag")
    fig.tight_layout()
    return _save(fig, png)


def _validation_auroc(ax, history: Sequence[dict], xlabel: str, ylabel: str, title: str) -> None:
    """The validation AUROC of the rows that have one, against the step."""
    checked = [row for row in history if "val_auroc" in row]
    ax.plot([row["step"] for row in checked], [row["val_auroc"] for row in checked], marker="o")
    ax.set_ylim(0.4, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def fusion_panels(
    mr_slices: Sequence[np.ndarray],
    trus_slices: Sequence[np.ndarray],
    titles: Sequence[str],
    png: Path,
    suptitle: str = "",
) -> Path:
    """Side-by-side fusion views: MR in grey, TRUS in pseudo-colour at half opacity (paper Fig. 3 style).

    Each title is written in the panel's corner (e.g. the D-score of that alignment). Zero TRUS (outside the
    fan) is transparent.
    """
    plt = _pyplot()
    n = len(mr_slices)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, mr, trus, title in zip(axes[0], mr_slices, trus_slices, titles, strict=True):
        ax.imshow(mr, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
        ax.imshow(
            np.ma.masked_where(trus <= 0.02, trus),
            cmap="jet",
            vmin=0,
            vmax=1,
            alpha=0.45,
            interpolation="bilinear",
        )
        ax.text(
            0.03,
            0.97,
            title,
            transform=ax.transAxes,
            va="top",
            ha="left",
            color="yellow",
            fontsize=9,
            bbox={"facecolor": "black", "alpha": 0.5, "pad": 2},
        )
        ax.set_axis_off()
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return _save(fig, png)


def box_plots(groups: dict[str, dict[str, Sequence[float]]], png: Path, title: str = "") -> Path:
    """One box plot per metric (e.g. ``{"TRE (mm)": {"before": [...], "after": [...]}}``), paper Fig. 4 style."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), squeeze=False)
    for ax, (metric, series) in zip(axes[0], groups.items(), strict=True):
        ax.boxplot([np.asarray(v, float) for v in series.values()], showmeans=True)
        ax.set_xticks(range(1, len(series) + 1), list(series), rotation=20, ha="right")
        ax.set_ylabel(metric)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, png)


def scatter(
    x: Sequence[float], y: Sequence[float], xlabel: str, ylabel: str, png: Path, title: str = ""
) -> Path:
    """A plain scatter plot (e.g. D-score against TRE)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.8))
    ax.scatter(x, y, s=10, alpha=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, png)


def patient_check_curves(history: Sequence[dict], png: Path) -> Path:
    """Patient-check training: its loss per step, and the validation AUROC (same patient against another)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot([row["step"] for row in history], [row["loss"] for row in history], lw=0.8)
    ax1.set_xlabel("step")
    ax1.set_ylabel("binary cross-entropy")
    ax1.set_title("patient check")
    _validation_auroc(ax2, history, "step", "AUROC, same patient vs another", "validation")
    fig.tight_layout()
    return _save(fig, png)


def _finish_tre_axes(fig, ax, png: Path, title: str) -> Path:
    """Shared ending of the TRE line plots: axis from zero, grid, legend, title; saved as PNG."""
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, png)


def tre_against_minutes(runs: dict[str, Sequence[dict]], png: Path, title: str = "") -> Path:
    """Validation TRE after one G pass against cumulative training minutes, one line per run (``log.csv`` rows).

    Compares runs by what they cost (e.g. fine-tuning against training from scratch); the dotted line is the
    validation start of the first run.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    for label, history in runs.items():
        minutes = np.cumsum([float(row["seconds"]) for row in history]) / 60.0
        ax.plot(minutes, [float(row["val_tre_after"]) for row in history], marker=".", label=label)
    first = next(iter(runs.values()))
    if first:
        ax.axhline(float(first[0]["val_tre_before"]), color="grey", ls=":", label="start")
    ax.set_xlabel("training time (CPU minutes, one thread)")
    ax.set_ylabel("validation TRE after one G pass (mm)")
    return _finish_tre_axes(fig, ax, png, title)


def learning_curve(points: dict[int, dict[str, float]], png: Path, title: str = "") -> Path:
    """Test TRE against the number of training cases, one line per measure (``{cases: {measure: mm}}``)."""
    plt = _pyplot()
    cases = sorted(points)
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    for measure in points[cases[0]]:
        ax.plot(cases, [points[n][measure] for n in cases], marker="o", label=measure)
    ax.set_xscale("log", base=2)
    ax.set_xticks(cases, [str(n) for n in cases])
    ax.set_xlabel("training cases")
    ax.set_ylabel("mean TRE on held-out pairs (mm)")
    return _finish_tre_axes(fig, ax, png, title)
