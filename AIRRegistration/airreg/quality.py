"""Turning the critic's raw value into something a clinician can act on.

The WGAN critic's output is not a probability. On validation cases we record pairs (statistic of D, TRE) for
alignments ranging from exact to grossly wrong and store them in the checkpoint, the statistic being the raw critic
value or its contrast against small displacements (see :mod:`airreg.scoring`; calibration keeps the better one).
In what follows "critic" means that statistic. From the pairs:

* ``expected_tre_mm`` — a monotone (non-increasing) isotonic fit of TRE against the critic value;
* ``p_failure(tol)`` — P(TRE > tol | critic), a one-dimensional logistic fit made for the tolerance the user
  chooses (default 5 mm), so the warning threshold follows from the tolerance;
* the displayed D-score — ``sigmoid((critic - mid) / scale)``, with ``mid`` and ``scale`` the median and spread
  of the calibration critic values: a number in (0, 1), higher meaning better aligned.

A pair is flagged ("warning") when ``p_failure >= 0.5``; also when a model's patient check (see
:mod:`airreg.patient_check`) scores the result below its threshold, whose calibration
(:class:`PatientCheckCalibration`) lives here too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from .errors import ModelError

DEFAULT_TOLERANCE_MM = 5.0


def isotonic_decreasing(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares non-increasing fit of y on x (pool adjacent violators); returns knots (x, fitted y)."""
    order = np.argsort(x, kind="stable")
    xs, ys = np.asarray(x, float)[order], -np.asarray(y, float)[order]
    means, weights, counts = [], [], []
    for value in ys:  # fit non-decreasing on -y
        means.append(value)
        weights.append(1.0)
        counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            w = weights[-2] + weights[-1]
            m = (means[-2] * weights[-2] + means[-1] * weights[-1]) / w
            c = counts[-2] + counts[-1]
            means[-2:], weights[-2:], counts[-2:] = [m], [w], [c]
    fitted = -np.repeat(means, counts)
    return xs, fitted


def logistic_fit(
    x: np.ndarray, labels: np.ndarray, l2: float = 1e-3, iterations: int = 50
) -> tuple[float, float]:
    """(a, b) of P(label=1 | x) = sigmoid(a + b x) by Newton's method with a small ridge penalty."""
    x = np.asarray(x, float)
    yl = np.asarray(labels, float)
    mu, sd = x.mean(), x.std() or 1.0
    z = (x - mu) / sd
    design = np.stack([np.ones_like(z), z], axis=1)
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ w)))
        grad = design.T @ (p - yl) + l2 * w
        hess = design.T @ (design * (p * (1 - p))[:, None]) + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(w[0] - w[1] * mu / sd), float(w[1] / sd)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positives`` (Mann-Whitney, ties count half)."""
    s = np.asarray(scores, float)
    p = np.asarray(positives, bool)
    n_pos, n_neg = p.sum(), (~p).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[p].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


@dataclass(frozen=True)
class InputVerdict:
    """The check's outcome on one pair: the statistic, the threshold and whether it is above."""

    statistic: float
    threshold: float

    @property
    def out_of_distribution(self) -> bool:
        return self.statistic > self.threshold

    @property
    def warning(self) -> str | None:
        if not self.out_of_distribution:
            return None
        return (
            f"these images are unlike the model's training data (statistic {self.statistic:.2f} > threshold "
            f"{self.threshold:.2f}): the registration and its D-score may be wrong"
        )


@dataclass(frozen=True)
class Calibration:
    """Calibration data of one model: critic values and the TRE (mm) they were observed with."""

    critic: tuple[float, ...]
    tre_mm: tuple[float, ...]
    statistic: str = "critic"  # which statistic of D the values are (see scoring.py)

    def __post_init__(self) -> None:
        if len(self.critic) != len(self.tre_mm) or len(self.critic) < 4:
            raise ValueError("calibration needs at least 4 (critic, TRE) pairs of equal length")
        if self.statistic not in ("critic", "contrast"):
            raise ValueError(f"unknown calibration statistic {self.statistic!r}")

    # The fits below are made once per calibration and kept: a verdict then costs microseconds, not milliseconds.

    @cached_property
    def _knots(self) -> tuple[np.ndarray, np.ndarray]:
        return isotonic_decreasing(np.array(self.critic), np.array(self.tre_mm))

    @cached_property
    def _logistic(self) -> dict[float, tuple[float, float] | bool]:
        """Per tolerance: the logistic fit's (a, b), or the constant answer when every pair is on one side."""
        return {}

    @cached_property
    def _d_score_center(self) -> tuple[float, float]:
        c = np.array(self.critic)
        return float(np.median(c)), float(np.subtract(*np.percentile(c, [75, 25]))) or 1.0

    def expected_tre_mm(self, critic: float) -> float:
        """Expected TRE for a critic value (isotonic fit, constant beyond the calibrated range)."""
        xs, fitted = self._knots
        return float(np.interp(critic, xs, fitted))

    def p_failure(self, critic: float, tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> float:
        """P(TRE > tolerance | critic) from a logistic fit on the calibration pairs."""
        if tolerance_mm not in self._logistic:
            labels = np.array(self.tre_mm) > tolerance_mm
            constant = labels.all() or not labels.any()
            self._logistic[tolerance_mm] = (
                bool(labels.all()) if constant else logistic_fit(np.array(self.critic), labels)
            )
        fit = self._logistic[tolerance_mm]
        if isinstance(fit, bool):
            return float(fit)
        a, b = fit
        return float(0.5 * (1.0 + np.tanh(0.5 * (a + b * critic))))  # the logistic function, without overflow

    def d_score(self, critic: float) -> float:
        """Displayed D-score in (0, 1): the critic value standardised on the calibration set, through a sigmoid."""
        mid, scale = self._d_score_center
        return float(1.0 / (1.0 + np.exp(-(critic - mid) / scale)))

    def to_dict(self) -> dict:
        return {
            "critic": [float(v) for v in self.critic],
            "tre_mm": [float(v) for v in self.tre_mm],
            "statistic": self.statistic,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(tuple(data["critic"]), tuple(data["tre_mm"]), data.get("statistic", "critic"))


@dataclass(frozen=True)
class PatientCheckCalibration:
    """The threshold on P's logit (below it: warning) and what it did on the validation cases."""

    threshold: float
    false_alarm_rate: float
    detection_rate: float
    auroc: float
    same_pairs: int
    other_pairs: int

    @classmethod
    def fit(cls, same: np.ndarray, other: np.ndarray, false_alarm: float) -> PatientCheckCalibration:
        """The threshold that flags a share ``false_alarm`` of the same-patient logits ``same``, and how many of
        the other-patient logits ``other`` it flags."""
        same, other = np.asarray(same, dtype=float), np.asarray(other, dtype=float)
        threshold = float(np.quantile(same, false_alarm))
        is_same = np.r_[np.ones(len(same), bool), np.zeros(len(other), bool)]
        return cls(
            threshold=threshold,
            false_alarm_rate=float((same < threshold).mean()),
            detection_rate=float((other < threshold).mean()),
            auroc=auroc(np.concatenate([same, other]), is_same),
            same_pairs=len(same),
            other_pairs=len(other),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PatientCheckCalibration:
        rates = ("threshold", "false_alarm_rate", "detection_rate", "auroc")
        try:
            counts = {k: int(values[k]) for k in ("same_pairs", "other_pairs")}
            return cls(**{k: float(values[k]) for k in rates}, **counts)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"patient-check calibration is incomplete or invalid ({exc})") from exc

    @property
    def threshold_score(self) -> float:
        """The threshold as a same-patient score (the sigmoid of the logit)."""
        return same_patient_score(self.threshold)

    def flags(self, logit: float) -> bool:
        return logit < self.threshold


def same_patient_score(logit: float) -> float:
    """P's logit as a score in [0, 1]: about 0.5 where, on training pairs, both answers were equally likely."""
    return float(1.0 / (1.0 + np.exp(-logit)))


@dataclass(frozen=True)
class QualityResult:
    """The quality verdict on one alignment."""

    critic: float
    d_score: float
    estimated_tre_mm: float
    p_failure: float
    tolerance_mm: float
    warning: str | None
    same_patient_score: float | None = None  # the patient check's score, if the model has one
    patient_flagged: bool = False  # the patient check says another patient (whichever warning is shown)
    input_check: InputVerdict | None = None  # the input check's verdict, if the model has one

    @property
    def out_of_distribution(self) -> bool:
        """The input check says the images are unlike the model's training data."""
        return self.input_check is not None and self.input_check.out_of_distribution

    @property
    def quality(self) -> str:
        return "warning" if self.warning else "ok"


def assess(
    critic: float,
    calibration: Calibration,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    overlap: float = 1.0,
    input_warning: str | None = None,
    patient_logit: float | None = None,
    patient_check: PatientCheckCalibration | None = None,
    input_check: InputVerdict | None = None,
) -> QualityResult:
    """Quality verdict from a critic value; ``overlap`` is the fraction of the grid the TRUS covers;
    ``input_warning`` (e.g. the images belong to different patients) overrides the rest; ``patient_logit`` is
    the patient check's value (with its ``patient_check`` calibration), judged after the alignment;
    ``input_check`` is the input check's verdict: out of distribution, the quality is never "ok", because the
    critic's value means little on images unlike its training data."""
    tre = calibration.expected_tre_mm(critic)
    p_fail = calibration.p_failure(critic, tolerance_mm)
    same = None if patient_logit is None else same_patient_score(patient_logit)
    flagged = same is not None and patient_check is not None and patient_check.flags(patient_logit)
    warning = None
    if input_warning:
        warning = f"{input_warning}: check the inputs"
    elif overlap < 0.2:
        warning = f"the TRUS covers only {overlap:.0%} of the MR field of view: check the inputs and the initial transform"
    elif input_check is not None and input_check.out_of_distribution:
        warning = f"{input_check.warning}; review it before use"
    elif p_fail >= 0.5:
        warning = (
            f"alignment looks poor: estimated error {tre:.1f} mm, P(error > {tolerance_mm:g} mm) = {p_fail:.2f}; "
            "review it before use"
        )
    elif flagged:
        warning = (
            f"the TRUS may belong to another patient (same-patient score {same:.2f}, below "
            f"{patient_check.threshold_score:.2f}): check the inputs"
        )
    return QualityResult(
        critic, calibration.d_score(critic), tre, p_fail, tolerance_mm, warning, same, flagged, input_check
    )
