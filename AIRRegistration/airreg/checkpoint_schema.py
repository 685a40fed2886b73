"""The schema of a model file, checked before anything is built from it.

``torch.load(weights_only=True)`` guarantees that loading runs no code, not that the result makes sense: a
crafted file can hold a string where a number belongs, a grid of 4x100000x100000 (building the networks for it
would allocate terabytes) or a calibration of NaNs (the verdict would then say "ok"). :func:`validate` checks
every entry that inference or training reads, with its type, range and, for weights, the exact shapes the
stored configuration implies. The shapes come from networks built on PyTorch's ``meta`` device, which
allocates no memory, so a configuration is judged before a single weight tensor exists.
"""

from __future__ import annotations

import math
from dataclasses import fields

import torch

from . import input_check
from .config import ModelConfig, TrainConfig
from .errors import AirRegError, ModelError
from .intensity import NormalizationSpec
from .networks import Discriminator, Generator
from .quality import PatientCheckCalibration
from .scoring import STATISTICS

#: Bounds of the model configuration (the ``paper`` preset is 26x256x256 voxels, width 128, hidden 256).
MAX_GRID_SIDE = 1024
MAX_GRID_VOXELS = 2**24
MAX_GRID_SPACING_MM = 100.0
MAX_WIDTH = 1024
MAX_HIDDEN = 16384
MAX_BOTTLENECK = 1024
#: Weights of one network (2^28 float32 values: 1 GiB).
MAX_NETWORK_VALUES = 2**28
#: Calibration pairs (ours hold a few thousand) and the magnitudes of their values: the bundled models' critic
#: values lie within ±7 and their TREs within 30 mm; values near 1e300 overflow the logistic fit to NaN.
MAX_CALIBRATION_PAIRS = 10**6
MAX_CRITIC_MAGNITUDE = 1e6
MAX_TRE_MM = 1e4


class _Invalid(Exception):
    """One schema violation: the message says which entry and why (the caller adds the file)."""


def validate(data: dict, where: str) -> None:
    """Raise ModelError naming ``where`` and the entry if the checkpoint ``data`` does not fit the schema."""
    try:
        _validate(data)
    except _Invalid as exc:
        raise ModelError(f"{where}: invalid model file: {exc}") from None


def _validate(data: dict) -> None:
    version = data.get("format_version")
    if not _is_int(version) or version < 1:
        raise _Invalid(f"format_version must be a whole number >= 1, got {_show(version)}")
    if "package_version" in data and not isinstance(data["package_version"], str):
        raise _Invalid("package_version must be text")
    for key in ("model_config", "preprocessing", "generator", "discriminator"):
        if key not in data:
            raise _Invalid(f"it lacks {key}")
    config = model_config(data["model_config"])
    _preprocessing(data["preprocessing"])
    shapes = expected_shapes(config)
    state_dict(data["generator"], shapes["generator"], "generator")
    state_dict(data["discriminator"], shapes["discriminator"], "discriminator")
    if data.get("patient_check") is not None:
        state_dict(data["patient_check"], shapes["discriminator"], "patient_check")
        _patient_check_calibration(data.get("patient_check_calibration"))
    if data.get("calibration") is not None:
        calibration(data["calibration"])
    if data.get("refiner") is not None:
        _refiner(data["refiner"], config.dof)
    if "train_config" in data:
        _train_config(data["train_config"])
    try:
        input_check.load(data, "input_check")
    except ModelError as exc:
        raise _Invalid(str(exc)) from None
    for key in ("optimizer_g", "optimizer_d", "metadata"):
        if key in data and not isinstance(data[key], dict):
            raise _Invalid(f"{key} must be a dict, got {_show(data[key])}")
    for key in ("epoch", "step"):
        if key in data and (not _is_int(data[key]) or data[key] < 0):
            raise _Invalid(f"{key} must be a whole number >= 0, got {_show(data[key])}")
    if "history" in data and not (
        isinstance(data["history"], list) and all(isinstance(h, dict) for h in data["history"])
    ):
        raise _Invalid("history must be a list of dicts")


# --- entries ---------------------------------------------------------------------------------------------


def model_config(value: object) -> ModelConfig:
    """The ModelConfig of a ``model_config`` entry whose every field has the right type and a sane size."""
    _dict_with(value, "model_config", {f.name for f in fields(ModelConfig)})
    for key, low, high in (
        ("width", 1, MAX_WIDTH),
        ("hidden", 1, MAX_HIDDEN),
        ("bottleneck", 1, MAX_BOTTLENECK),
    ):
        _int_in(value[key], low, high, f"model_config.{key}")
    if not _is_int(value["dof"]) or value["dof"] not in (3, 6):
        raise _Invalid(f"model_config.dof must be 3 or 6, got {_show(value['dof'])}")
    grid = value["grid"]
    _dict_with(grid, "model_config.grid", {"size", "spacing"})
    size, spacing = grid["size"], grid["spacing"]
    if not (isinstance(size, (list, tuple)) and len(size) == 3):
        raise _Invalid(f"model_config.grid.size must be 3 whole numbers, got {_show(size)}")
    for v in size:
        _int_in(v, 2, MAX_GRID_SIDE, "model_config.grid.size")
    if math.prod(size) > MAX_GRID_VOXELS:
        raise _Invalid(f"model_config.grid.size {list(size)} has more than {MAX_GRID_VOXELS} voxels")
    if not (isinstance(spacing, (list, tuple)) and len(spacing) == 3):
        raise _Invalid(f"model_config.grid.spacing must be 3 numbers, got {_show(spacing)}")
    for v in spacing:
        if not _is_number(v) or not 0 < v <= MAX_GRID_SPACING_MM:
            raise _Invalid(
                f"model_config.grid.spacing must be in (0, {MAX_GRID_SPACING_MM:g}] mm, got {_show(v)}"
            )
    try:
        return ModelConfig.from_dict(value)
    except (AirRegError, TypeError, ValueError) as exc:
        raise _Invalid(f"model_config: {exc}") from None


def expected_shapes(config: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Parameter and buffer shapes of G and D for ``config``, from networks built without memory."""
    with torch.device("meta"):
        networks = {"generator": Generator(config), "discriminator": Discriminator(config)}
    shapes = {
        name: {k: tuple(t.shape) for k, t in net.state_dict().items()} for name, net in networks.items()
    }
    for name, entries in shapes.items():
        total = sum(math.prod(s) for s in entries.values())
        if total > MAX_NETWORK_VALUES:
            raise _Invalid(f"model_config makes a {name} of {total:,} weights (limit {MAX_NETWORK_VALUES:,})")
    return shapes


def state_dict(value: object, shapes: dict[str, tuple[int, ...]], name: str) -> None:
    """A dict of finite floating-point tensors with exactly the names and shapes of ``shapes``."""
    if not isinstance(value, dict):
        raise _Invalid(f"{name} must be a dict of weight tensors, got {_show(value)}")
    missing, unexpected = sorted(set(shapes) - set(value)), sorted(map(str, set(value) - set(shapes)))
    if missing or unexpected:
        detail = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}"
        raise _Invalid(f"{name} weights do not match model_config ({detail})")
    for key, shape in shapes.items():
        tensor = value[key]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise _Invalid(f"{name}.{key} must be a floating-point tensor, got {_show(tensor)}")
        if tuple(tensor.shape) != shape:
            raise _Invalid(f"{name}.{key} has shape {tuple(tensor.shape)}; model_config implies {shape}")
        if not bool(torch.isfinite(tensor).all()):
            raise _Invalid(f"{name}.{key} contains NaN or Inf")


def _refiner(value: object, dof: int) -> None:
    """A cascade's second stage: its own model configuration (same DOF) and a generator of that shape."""
    _dict_with(value, "refiner", {"model_config", "generator"})
    config = model_config(value["model_config"])
    if config.dof != dof:
        raise _Invalid(f"refiner.model_config.dof is {config.dof}; the model's is {dof}")
    state_dict(value["generator"], expected_shapes(config)["generator"], "refiner.generator")


def calibration(value: object) -> None:
    """Critic values and TREs: finite numbers, as many of each (4 or more), a known statistic."""
    _dict_with(value, "calibration", {"critic", "tre_mm"}, optional={"statistic"})
    lists = {}
    for key in ("critic", "tre_mm"):
        values = value[key]
        if not isinstance(values, (list, tuple)) or not 4 <= len(values) <= MAX_CALIBRATION_PAIRS:
            raise _Invalid(f"calibration.{key} must be a list of 4 to {MAX_CALIBRATION_PAIRS} numbers")
        if not all(_is_number(v) for v in values):
            raise _Invalid(
                f"calibration.{key} must hold finite numbers only (found NaN, Inf or a non-number)"
            )
        lists[key] = values
    if len(lists["critic"]) != len(lists["tre_mm"]):
        raise _Invalid("calibration.critic and calibration.tre_mm differ in length")
    if min(lists["tre_mm"]) < 0 or max(lists["tre_mm"]) > MAX_TRE_MM:
        raise _Invalid(f"calibration.tre_mm must lie in [0, {MAX_TRE_MM:g}] mm")
    if max(abs(v) for v in lists["critic"]) > MAX_CRITIC_MAGNITUDE:
        raise _Invalid(f"calibration.critic must lie within ±{MAX_CRITIC_MAGNITUDE:g}")
    statistic = value.get("statistic", "critic")
    if not isinstance(statistic, str) or statistic not in STATISTICS:
        raise _Invalid(
            f"calibration.statistic must be one of {', '.join(STATISTICS)}, got {_show(statistic)}"
        )


def _patient_check_calibration(value: object) -> None:
    if value is None:
        raise _Invalid("the patient check has no calibration")
    names = {f.name for f in fields(PatientCheckCalibration)}
    _dict_with(value, "patient_check_calibration", names)
    threshold = value["threshold"]  # ±Inf is a valid "always" / "never" threshold; NaN would never flag
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or math.isnan(threshold):
        raise _Invalid(f"patient_check_calibration.threshold must be a number, got {_show(threshold)}")
    for key in ("false_alarm_rate", "detection_rate", "auroc"):
        v = value[key]
        nan_ok = (
            key == "auroc" and isinstance(v, float) and math.isnan(v)
        )  # no other-patient pairs: undefined
        if not nan_ok and (not _is_number(v) or not 0 <= v <= 1):
            raise _Invalid(f"patient_check_calibration.{key} must be a number in [0, 1], got {_show(v)}")
    for key in ("same_pairs", "other_pairs"):
        _int_in(value[key], 0, 2**31, f"patient_check_calibration.{key}")


def _preprocessing(value: object) -> None:
    if not isinstance(value, dict) or not isinstance(value.get("normalization"), dict):
        raise _Invalid("preprocessing must be a dict holding a normalization dict")
    for key, v in value["normalization"].items():
        if not isinstance(v, (bool, int, float)):
            raise _Invalid(
                f"preprocessing.normalization.{str(key)[:30]} must be a number or a flag, got {_show(v)}"
            )
    try:
        NormalizationSpec.from_dict(value["normalization"])
    except ModelError as exc:
        raise _Invalid(str(exc)) from None


def _train_config(value: object) -> None:
    _dict_with(value, "train_config", set(), optional={f.name for f in fields(TrainConfig)})
    for key, v in value.items():
        if not isinstance(v, (bool, int, float, str)) or (isinstance(v, float) and not math.isfinite(v)):
            raise _Invalid(f"train_config.{key} must be a finite number, a flag or text, got {_show(v)}")


# --- helpers ---------------------------------------------------------------------------------------------


def _dict_with(value: object, name: str, required: set[str], optional: frozenset | set = frozenset()) -> None:
    if not isinstance(value, dict):
        raise _Invalid(f"{name} must be a dict, got {_show(value)}")
    missing = sorted(required - set(value))
    if missing:
        raise _Invalid(f"{name} lacks {', '.join(missing)}")
    unknown = sorted(map(str, set(value) - required - set(optional)))
    if unknown:
        raise _Invalid(f"{name} has unknown entries {', '.join(unknown[:5])}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_in(value: object, low: int, high: int, name: str) -> None:
    if not _is_int(value) or not low <= value <= high:
        raise _Invalid(f"{name} must be a whole number in [{low}, {high}], got {_show(value)}")


def _show(value: object) -> str:
    """A short description of a value for a message: small scalars as written, anything else by type."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value[:30])
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
