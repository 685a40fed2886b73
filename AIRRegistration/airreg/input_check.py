"""An input check: are these images like the ones the model was trained on? (evaluated at inference only)

The D-score judges an alignment as the critic learned to on its training data; on images unlike those (another
scanner, another simulator, an inverted or noisy volume) the critic's value means little, and a poor result can
look "ok". This check looks at what the networks see, before any alignment: simple intensity statistics of the
normalised MR stack on the network grid and of the TRUS voxels in the cache grid (:func:`features`), compared
with those of the model's training family by a Mahalanobis distance (:class:`InputCheck`). Above a threshold
the report says "out of distribution" and the quality is never "ok".

The reference and the threshold are fitted on cases of the training family (``airreg calibrate-ood``, in
:mod:`airreg.ood_calibration`) and stored in the model file as the optional section ``input_check``, a plain dict
(:meth:`InputCheck.to_dict`)::

    features: str               the feature set's name (FEATURES); a file with another name is refused
    mean: list[float]           (d,) reference mean of the features
    precision: list[list[float]]  (d, d) inverse of the shrunk reference covariance
    threshold: float            the statistic above which the inputs are out of distribution
    pass_rate: float            share of in-distribution validation statistics (out-of-fold) under it
    reference_cases: int        cases the reference was fitted on
    held_out_cases: int         cases of other families checked at calibration (0 if none)
    held_out_flagged: int       how many of those were above the threshold

A model file without the section still loads; its reports say the check is unavailable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import ModelError
from .quality import InputVerdict

#: Name of the feature set below; stored with the reference so that a changed feature set is never mixed up.
FEATURES = "intensity-stats-v1"
#: Histogram bins of the normalised [0, 1] intensities.
HISTOGRAM_BINS = 8
#: The section's key in a model file.
SECTION = "input_check"


def _intensity_stats(values: torch.Tensor, weight: torch.Tensor) -> list[float]:
    """Mean, standard deviation and the share in each of HISTOGRAM_BINS bins over [0, 1] of the ``values``
    where ``weight`` is 1 (float tensors of one shape; weights rather than indexing: several times faster)."""
    count = weight.sum().clamp(min=1.0)
    mean = (values * weight).sum() / count
    var = ((values - mean) ** 2 * weight).sum() / (count - 1).clamp(min=1.0)
    bins = (values * HISTOGRAM_BINS).long().clamp(0, HISTOGRAM_BINS - 1).flatten()
    histogram = torch.bincount(bins, weights=weight.flatten(), minlength=HISTOGRAM_BINS) / count
    return [float(mean), float(var.sqrt()), *histogram.tolist()]


def _texture(volume: torch.Tensor, weight: torch.Tensor) -> float:
    """Mean absolute in-plane difference between neighbouring voxels that both have ``weight`` 1 (speckle,
    noise, edges): (Z, Y, X) float tensors."""
    total, count = 0.0, 0.0
    for axis in (1, 2):
        n = volume.shape[axis] - 1
        both = weight.narrow(axis, 1, n) * weight.narrow(axis, 0, n)
        total += float(((volume.narrow(axis, 1, n) - volume.narrow(axis, 0, n)).abs() * both).sum())
        count += float(both.sum())
    return total / max(count, 1.0)


def features(mr_stack: torch.Tensor, trus_cache: torch.Tensor) -> np.ndarray:
    """The statistics the check compares: for the normalised MR stack (S, H, W) on the network grid and the TRUS
    voxels > 0 of the cache (Zc, Yc, Xc), the mean, standard deviation, an 8-bin histogram and the in-plane
    texture; and the share of the cache the TRUS covers. (2 x 11 + 1 = 23 values, float64.)

    These do not depend on the alignment beyond which TRUS voxels fall in the cache, so the check can run once
    per registration, before G."""
    mr = mr_stack.detach().float()
    trus = trus_cache.detach().float()
    everywhere, inside = torch.ones_like(mr), (trus > 0).float()
    values = _intensity_stats(mr, everywhere) + [_texture(mr, everywhere)]
    values += _intensity_stats(trus, inside) + [_texture(trus, inside), float(inside.mean())]
    return np.asarray(values, dtype=np.float64)


@dataclass(frozen=True)
class InputCheck:
    """The reference of the training family's features and the threshold on their distance to it."""

    features: str
    mean: tuple[float, ...]
    precision: tuple[tuple[float, ...], ...]
    threshold: float
    pass_rate: float
    reference_cases: int
    held_out_cases: int = 0
    held_out_flagged: int = 0

    def statistic(self, values: np.ndarray) -> float:
        """Mahalanobis distance of a feature vector to the reference mean (square root of the quadratic form)."""
        delta = np.asarray(values, dtype=np.float64) - np.asarray(self.mean)
        return float(math.sqrt(max(float(delta @ np.asarray(self.precision) @ delta), 0.0)))

    def judge(self, mr_stack: torch.Tensor, trus_cache: torch.Tensor) -> InputVerdict:
        """The verdict on what the networks see for one pair (see :func:`features`)."""
        return InputVerdict(self.statistic(features(mr_stack, trus_cache)), self.threshold)

    def to_dict(self) -> dict:
        """Plain numbers, strings and lists: loadable with ``torch.load(weights_only=True)``."""
        out = asdict(self)
        out["mean"] = [float(v) for v in self.mean]
        out["precision"] = [[float(v) for v in row] for row in self.precision]
        return out

    @classmethod
    def from_dict(cls, values: dict, where: str = "model") -> InputCheck:
        """Inverse of :meth:`to_dict`; a section that is incomplete, of another feature set or of the wrong
        shape raises ModelError."""
        try:
            if values["features"] != FEATURES:
                raise ModelError(
                    f"{where}: the input check uses features {values['features']!r}, this version computes "
                    f"{FEATURES!r} (recalibrate it with airreg calibrate-ood)"
                )
            mean = tuple(float(v) for v in values["mean"])
            precision = tuple(tuple(float(v) for v in row) for row in values["precision"])
            check = cls(
                features=FEATURES,
                mean=mean,
                precision=precision,
                threshold=float(values["threshold"]),
                pass_rate=float(values["pass_rate"]),
                reference_cases=int(values["reference_cases"]),
                held_out_cases=int(values.get("held_out_cases", 0)),
                held_out_flagged=int(values.get("held_out_flagged", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: the input check is incomplete or invalid ({exc})") from exc
        size = len(features(torch.zeros(1, 2, 2), torch.ones(1, 2, 2)))
        if len(mean) != size or any(len(row) != size for row in precision):
            raise ModelError(f"{where}: the input check's reference does not have {size} features")
        if not all(math.isfinite(v) for v in (*mean, *sum(precision, ()), check.threshold)):
            raise ModelError(f"{where}: the input check holds non-finite numbers")
        return check


def load(state: dict, where: str = "model") -> InputCheck | None:
    """A model file's input check, or None if it has none (files written before the check existed)."""
    section = state.get(SECTION)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ModelError(f"{where}: the input check must be a dict, got {type(section).__name__}")
    return InputCheck.from_dict(section, where)


def report(verdict: InputVerdict | None) -> dict:
    """The ``input_check`` entry of a registration report."""
    if verdict is None:
        return {
            "available": False,
            "verdict": "unavailable",
            "note": "the model file has no input check (add one with airreg calibrate-ood)",
        }
    return {
        "available": True,
        "features": FEATURES,
        "statistic": verdict.statistic,
        "threshold": verdict.threshold,
        "verdict": "out of distribution" if verdict.out_of_distribution else "in distribution",
        "warning": verdict.warning,
    }
