"""Robust per-modality intensity normalisation to [0, 1].

MR (T2) and TRUS intensities have no absolute scale, and a few extreme voxels (bladder urine, specular
reflections) would dominate a min/max scaling. Instead the ``low_pct`` / ``high_pct`` percentiles of the
relevant voxels are mapped to 0 and 1 and the result is clipped:

* MR: all voxels are relevant.
* TRUS: only voxels > 0, because everything outside the ultrasound fan is exactly 0 and would otherwise
  drag the low percentile to 0.

The percentiles come from every voxel of a volume of up to :data:`STATISTICS_VOXELS` voxels and from a regular
subsample of a larger one, so that their cost stays bounded. The :class:`NormalizationSpec` used in training is stored in the model checkpoint (``to_dict``) so that
inference reproduces the same preprocessing (``from_dict``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import InputError, ModelError

MODALITIES = ("mr", "trus")
#: Above this scale (an intensity range below 1e-30) float32 arithmetic would underflow or overflow.
_FLOAT32_SAFE_SCALE = 1e30
_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Percentiles use every voxel of a volume up to this many (the bundled models' training volumes were all
#: smaller: their statistics are exact) ...
STATISTICS_VOXELS = 2**21
#: ... and a stratified random subsample of about this many of a larger one (one voxel drawn in each run of n
#: voxels in storage order, fixed seed: every n-th voxel would alias with the rows), so that their cost does not
#: grow with the input (issue 15): the percentiles' rank error is then about 0.02 points.
SUBSAMPLE_VOXELS = 2**18


def percentiles(values: np.ndarray, q) -> np.ndarray:
    """``np.percentile(values, q)`` (linear method, same result to the bit) by partial sorting: 2-3x faster."""
    flat = np.asarray(values).reshape(-1)
    n = flat.size
    virtual = (n - 1) * (np.asarray(q, dtype=float) / 100.0)
    below = np.floor(virtual).astype(np.intp)
    above = np.minimum(below + 1, n - 1)
    ordered = np.partition(flat, np.unique(np.concatenate([below, above])))
    a, b, gamma = ordered[below], ordered[above], virtual - below
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)  # numpy's _lerp


def statistics_sample(array: np.ndarray) -> np.ndarray:
    """The voxels the percentiles are taken from: all, or a subsample (see :data:`STATISTICS_VOXELS`), in
    storage order and the same on every call."""
    flat = np.asarray(array).reshape(-1)
    if flat.size <= STATISTICS_VOXELS:
        return flat
    step = -(-flat.size // SUBSAMPLE_VOXELS)
    starts = np.arange(0, flat.size, step)
    drawn = starts + np.random.default_rng(0).integers(0, step, starts.size)
    return flat.take(np.minimum(drawn, flat.size - 1))


def intensity_range(
    values: np.ndarray,
    low_pct: float = 1.0,
    high_pct: float = 99.0,
    mask: np.ndarray | None = None,
    what: str = "image",
) -> tuple[float, float]:
    """The intensities mapped to 0 and 1: the ``low_pct``/``high_pct`` percentiles of the sampled voxels.

    The sampled voxels are those where ``mask`` is true, or the non-zero voxels when ``mask`` is None. If
    the two percentiles coincide (a mostly uniform image) the sample's min/max are used instead; a sample
    with a single value raises InputError (``what`` names the image in the message).
    """
    values = np.asarray(values)
    if not 0.0 <= low_pct < high_pct <= 100.0:
        raise InputError(
            f"{what}: percentiles must satisfy 0 <= low < high <= 100, got {low_pct}, {high_pct}"
        )
    _check_finite(values, what)
    if mask is not None and np.shape(mask) != values.shape:
        raise InputError(f"{what}: mask shape {np.shape(mask)} differs from the image shape {values.shape}")
    sample = values[values != 0] if mask is None else values[np.asarray(mask, dtype=bool)]
    if sample.size == 0:
        raise InputError(f"{what}: no voxels to normalise (all zero or outside the mask)")
    if float(sample.max()) - float(sample.min()) > _FLOAT32_MAX:  # percentiles would interpolate to Inf
        raise InputError(
            f"{what}: intensities span {float(sample.min()):.3g} to {float(sample.max()):.3g}, more than float32 "
            "arithmetic can hold; rescale the image"
        )
    low, high = percentiles(sample, [low_pct, high_pct])
    if high <= low:
        low, high = sample.min(), sample.max()
    if high <= low:
        raise InputError(f"{what}: is constant (every sampled voxel is {float(low):g}); cannot normalise")
    return float(low), float(high)


def scale(values: np.ndarray, low: float, high: float, what: str = "image") -> np.ndarray:
    """Map ``low``/``high`` to 0/1 and clip to [0, 1]; float32, a new array."""
    values = np.asarray(values)
    _check_finite(values, what)
    factor = 1.0 / (float(high) - float(low))
    if factor > _FLOAT32_SAFE_SCALE:  # an intensity range near float32's smallest numbers: scale in float64
        return np.clip((values - low) * factor, 0.0, 1.0).astype(np.float32)
    scaled = values.astype(np.float32)  # in float32 throughout: 10x faster than float64, within 1e-7
    with np.errstate(over="ignore"):  # voxels outside the sample may overflow to ±Inf: clipped to 0 or 1
        scaled -= np.float32(low)
        scaled *= np.float32(factor)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def _check_finite(values: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(values)):
        raise InputError(f"{what}: contains NaN or Inf voxels; cannot normalise intensities")


def normalize(
    array: np.ndarray,
    low_pct: float = 1.0,
    high_pct: float = 99.0,
    mask: np.ndarray | None = None,
    what: str = "image",
) -> np.ndarray:
    """Map the ``low_pct``/``high_pct`` percentiles of the sampled voxels to 0/1, clip to [0, 1]; float32.

    See :func:`intensity_range` for the sampled voxels and the errors.
    """
    return scale(array, *intensity_range(array, low_pct, high_pct, mask, what), what)


@dataclass(frozen=True)
class NormalizationSpec:
    """Percentile normalisation settings for both modalities (stored in checkpoints).

    ``*_positive_only`` selects which voxels define the percentiles: all voxels (False) or only those > 0
    (True, for TRUS whose outside-the-fan region is 0).
    """

    low_pct: float = 1.0
    high_pct: float = 99.0
    mr_positive_only: bool = False
    trus_positive_only: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.low_pct < self.high_pct <= 100.0:
            raise InputError(
                f"normalisation: need 0 <= low_pct < high_pct <= 100, got {self.low_pct}, {self.high_pct}"
            )

    def intensity_range(
        self, array: np.ndarray, modality: str, what: str | None = None
    ) -> tuple[float, float]:
        """The intensities an MR (``modality="mr"``) or TRUS (``"trus"``) volume maps to 0 and 1, from its
        :func:`statistics_sample`."""
        if modality not in MODALITIES:
            raise InputError(f"normalisation: unknown modality {modality!r} (use 'mr' or 'trus')")
        sample = statistics_sample(array)
        positive_only = self.mr_positive_only if modality == "mr" else self.trus_positive_only
        mask = sample > 0 if positive_only else np.ones(sample.shape, dtype=bool)
        return intensity_range(sample, self.low_pct, self.high_pct, mask, what or f"{modality.upper()} image")

    def apply(self, array: np.ndarray, modality: str, what: str | None = None) -> np.ndarray:
        """Normalise an MR (``modality="mr"``) or TRUS (``"trus"``) voxel array to float32 in [0, 1]."""
        what = what or f"{modality.upper()} image"
        return scale(array, *self.intensity_range(array, modality, what), what)

    def to_dict(self) -> dict:
        """Plain dict (JSON- and torch.save-friendly)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NormalizationSpec:
        """Inverse of :meth:`to_dict`; unknown or ill-typed keys raise ModelError (the checkpoint is suspect)."""
        if not isinstance(data, dict):
            raise ModelError(f"normalisation spec: expected a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ModelError(f"normalisation spec: unknown key(s) {', '.join(unknown)}")
        values = {}
        for key, value in data.items():
            is_flag = key.endswith("positive_only")
            if isinstance(value, bool) != is_flag or not isinstance(value, (bool, int, float)):
                raise ModelError(f"normalisation spec: {key} has an invalid value {value!r}")
            values[key] = float(value) if key.endswith("pct") else value
        try:
            return cls(**values)
        except InputError as exc:
            raise ModelError(str(exc)) from None
