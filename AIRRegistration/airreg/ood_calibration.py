"""Fitting a model's input check (``airreg calibrate-ood``); inference only evaluates it (:mod:`airreg.input_check`).

The reference is the mean and a shrunk covariance of the check's features on cases of the model's training
family, each seen as at inference: the MR stack on the grid and the TRUS cache sampled through a start drawn like
the paper's protocol (the ground truth perturbed, ±25° and ±5 mm; volume centres aligned for a case without
ground truth). The threshold is the ``pass_rate`` quantile of leave-one-out statistics (each case's distance to
the reference fitted without it), so that about that share of unseen cases of the family pass; the reference
stored is then fitted on all the cases. Cases of other families (``held_out``) are only counted: how many the
threshold flags.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import checkpoint as ckpt
from . import data, input_check
from .errors import InputError
from .evaluation import random_start
from .registration import Registrar, centers_aligned

#: Share of in-distribution cases the threshold lets pass (estimated out-of-fold).
DEFAULT_PASS_RATE = 0.95
#: Weight of the diagonal in the shrunk covariance: a few dozen cases cannot estimate 23x23 covariances.
SHRINKAGE = 0.5
#: Smallest standard deviation assumed for a feature, so that one constant in training (an empty histogram
#: bin) does not make any change infinitely unusual.
MIN_SD = 0.005
#: Fewest reference cases accepted.
MIN_CASES = 8


@dataclass(frozen=True)
class OodSummary:
    """What the fit found: the threshold, the share of reference cases under it out-of-fold, and the held-out
    cases flagged."""

    path: Path
    check: input_check.InputCheck
    reference_statistics: np.ndarray
    held_out_statistics: np.ndarray


def case_features(registrar: Registrar, cases: list[data.Case], seed: int, progress: bool) -> np.ndarray:
    """(N, d) features of cases as the check sees them at inference, each from one seeded start."""
    rng = np.random.default_rng(seed)
    rows = []
    for case in tqdm(cases, desc="input features", disable=not progress, unit="case"):
        if case.gt is None:
            start = centers_aligned(case.mr, case.trus)
        else:
            start = random_start(case, registrar.config.dof, rng)
        pair = registrar.prepare(case.mr, case.trus, start)
        rows.append(input_check.features(pair.mr, pair.trus_cache))
    return np.stack(rows)


def fit_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, precision) of (N, d) features: covariance with per-feature variance floored at MIN_SD², shrunk
    towards its diagonal by SHRINKAGE, inverted."""
    mean = x.mean(axis=0)
    cov = np.atleast_2d(np.cov(x, rowvar=False))
    cov = cov + np.diag(np.maximum(MIN_SD**2 - np.diag(cov), 0.0))
    shrunk = (1.0 - SHRINKAGE) * cov + SHRINKAGE * np.diag(np.diag(cov))
    return mean, np.linalg.inv(shrunk)


def leave_one_out_statistics(x: np.ndarray) -> np.ndarray:
    """Each row's Mahalanobis distance to the reference fitted on the other rows."""
    out = np.empty(len(x))
    for i in range(len(x)):
        mean, precision = fit_reference(np.delete(x, i, axis=0))
        delta = x[i] - mean
        out[i] = np.sqrt(max(float(delta @ precision @ delta), 0.0))
    return out


def check_pass_rate(pass_rate: float) -> None:
    """Refuse a pass rate the threshold cannot be set for (InputError)."""
    if not 0.5 <= pass_rate < 1.0:
        raise InputError(f"the pass rate must be in [0.5, 1), got {pass_rate}")


def fit_check(
    x: np.ndarray, pass_rate: float, held_out: np.ndarray | None = None
) -> tuple[input_check.InputCheck, np.ndarray, np.ndarray]:
    """The check from reference features ``x`` (N, d), with its threshold at the ``pass_rate`` quantile of the
    leave-one-out statistics; returns it, those statistics and the held-out cases' statistics."""
    if len(x) < MIN_CASES:
        raise InputError(f"the input check needs at least {MIN_CASES} reference cases, got {len(x)}")
    check_pass_rate(pass_rate)
    oof = leave_one_out_statistics(x)
    threshold = float(np.quantile(oof, pass_rate, method="higher"))
    mean, precision = fit_reference(x)
    check = input_check.InputCheck(
        features=input_check.FEATURES,
        mean=tuple(float(v) for v in mean),
        precision=tuple(tuple(float(v) for v in row) for row in precision),
        threshold=threshold,
        pass_rate=float((oof <= threshold).mean()),
        reference_cases=len(x),
    )
    held = np.array([check.statistic(row) for row in held_out]) if held_out is not None else np.empty(0)
    flagged = int((held > threshold).sum())
    check = replace(check, held_out_cases=len(held), held_out_flagged=flagged)
    return check, oof, held


def calibrate_ood(
    model: Path | str | None,
    data_root: Path,
    out: Path,
    held_out_root: Path | None = None,
    pass_rate: float = DEFAULT_PASS_RATE,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> OodSummary:
    """Fit the input check of ``model`` on the cases in ``data_root`` (the model's training family), count the
    cases of ``held_out_root`` it flags, and write the model with the check to ``out`` (networks unchanged)."""
    check_pass_rate(pass_rate)
    path = ckpt.resolve(model)
    state = ckpt.load(path)
    registrar = Registrar(state, device)
    reference = data.load_dataset(Path(data_root), require_gt=False, progress=progress)
    x = case_features(registrar, reference, seed, progress)
    held = None
    if held_out_root is not None:
        held_cases = data.load_dataset(Path(held_out_root), require_gt=False, progress=progress)
        held = case_features(registrar, held_cases, seed + 1, progress)
    check, oof, held_stats = fit_check(x, pass_rate, held)
    exported = ckpt.export_for_inference(state)
    exported[input_check.SECTION] = check.to_dict()
    exported["metadata"] = {
        **state.get("metadata", {}),
        "input_check": {
            "data": str(data_root),
            "held_out": "" if held_out_root is None else str(held_out_root),
            "seed": seed,
            "from_model_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        },
    }
    return OodSummary(ckpt.save(out, exported), check, oof, held_stats)
