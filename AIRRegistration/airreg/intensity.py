"""Robust per-modality intensity normalisation to [0, 1].

MR (T2) and TRUS intensities have no absolute scale, and a few extreme voxels (bladder urine, specular
reflections) would dominate a min/max scaling. Instead the ``low_pct`` / ``high_pct`` percentiles of the
relevant voxels are mapped to 0 and 1 and the result is clipped:

* MR: all voxels are relevant.
* TRUS: only voxels > 0, because everything outside the ultrasound fan is exactly 0 and would otherwise
  drag the low percentile to 0.

The :class:`NormalizationSpec` used in training is stored in the model checkpoint (``to_dict``) so that
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


def normalize(
    array: np.ndarray,
    low_pct: float = 1.0,
    high_pct: float = 99.0,
    mask: np.ndarray | None = None,
    what: str = "image",
) -> np.ndarray:
    """Map the ``low_pct``/``high_pct`` percentiles of the sampled voxels to 0/1, clip to [0, 1]; float32.

    The sampled voxels are those where ``mask`` is true, or the non-zero voxels when ``mask`` is None. If
    the two percentiles coincide (a mostly uniform image) the sample's min/max are used instead; a sample
    with a single value raises InputError (``what`` names the image in the message).
    """
    values = np.asarray(array)
    if not 0.0 <= low_pct < high_pct <= 100.0:
        raise InputError(
            f"{what}: percentiles must satisfy 0 <= low < high <= 100, got {low_pct}, {high_pct}"
        )
    if not np.all(np.isfinite(values)):
        raise InputError(f"{what}: contains NaN or Inf voxels; cannot normalise intensities")
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
    low, high = np.percentile(sample, [low_pct, high_pct])
    if high <= low:
        low, high = sample.min(), sample.max()
    if high <= low:
        raise InputError(f"{what}: is constant (every sampled voxel is {float(low):g}); cannot normalise")
    scale = 1.0 / (float(high) - float(low))
    if scale > _FLOAT32_SAFE_SCALE:  # an intensity range near float32's smallest numbers: scale in float64
        return np.clip((values - low) * scale, 0.0, 1.0).astype(np.float32)
    scaled = values.astype(np.float32)  # in float32 throughout: 10x faster than float64, within 1e-7
    with np.errstate(over="ignore"):  # voxels outside the sample may overflow to ±Inf: clipped to 0 or 1
        scaled -= np.float32(low)
        scaled *= np.float32(scale)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


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

    def apply(self, array: np.ndarray, modality: str, what: str | None = None) -> np.ndarray:
        """Normalise an MR (``modality="mr"``) or TRUS (``"trus"``) voxel array to float32 in [0, 1]."""
        if modality not in MODALITIES:
            raise InputError(f"normalisation: unknown modality {modality!r} (use 'mr' or 'trus')")
        values = np.asarray(array)
        positive_only = self.mr_positive_only if modality == "mr" else self.trus_positive_only
        mask = values > 0 if positive_only else np.ones(values.shape, dtype=bool)
        return normalize(values, self.low_pct, self.high_pct, mask, what or f"{modality.upper()} image")

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
