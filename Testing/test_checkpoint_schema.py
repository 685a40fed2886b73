"""A model file is checked against its schema before anything is built (airreg.checkpoint_schema)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from airreg import checkpoint, checkpoint_schema
from airreg.checkpoint import default_model_path
from airreg.config import preset
from airreg.errors import ModelError
from test_checkpoint import minimal_state


def _set(state: dict, dotted: str, value) -> dict:
    """A deep copy of ``state`` with the entry at ``a.b.c`` replaced (or removed when value is ``...``)."""
    state = copy.deepcopy(state)
    parts = dotted.split(".")
    if parts[0] in ("generator", "discriminator", "patient_check") and len(parts) > 1:
        parts = [parts[0], ".".join(parts[1:])]  # state dict keys hold dots themselves
    *parents, last = parts
    node = state
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return state


PATIENT_CALIBRATION = {
    "threshold": -3.0,
    "false_alarm_rate": 0.05,
    "detection_rate": 0.9,
    "auroc": 0.95,
    "same_pairs": 10,
    "other_pairs": 10,
}

#: (entry, crafted value, what the message must say)
BAD_ENTRIES = [
    ("format_version", "1", "format_version must be a whole number"),
    ("format_version", 0, "format_version must be a whole number >= 1"),
    ("format_version", True, "format_version must be a whole number"),
    ("package_version", 1, "package_version must be text"),
    ("model_config", ..., "lacks model_config"),
    ("model_config", "tiny", "model_config must be a dict"),
    ("model_config.hidden", -1, "model_config.hidden must be a whole number in [1, 16384], got -1"),
    ("model_config.hidden", 0, "model_config.hidden"),
    ("model_config.hidden", 2.5, "model_config.hidden"),
    ("model_config.width", 10**7, "model_config.width must be a whole number in [1, 1024], got 10000000"),
    ("model_config.bottleneck", "8", "model_config.bottleneck"),
    ("model_config.dof", 4, "model_config.dof must be 3 or 6"),
    ("model_config.dof", 3.0, "model_config.dof must be 3 or 6"),
    ("model_config.dof", torch.tensor([]), "model_config.dof must be 3 or 6, got a tensor of shape (0,)"),
    ("model_config.extra", 1, "model_config has unknown entries extra"),
    ("model_config.grid", [6, 24, 24], "model_config.grid must be a dict"),
    (
        "model_config.grid.size",
        (4, 100000, 100000),
        "model_config.grid.size must be a whole number in [2, 1024]",
    ),
    ("model_config.grid.size", (1000, 1000, 1000), "has more than 16777216 voxels"),
    ("model_config.grid.size", (6, 24), "model_config.grid.size must be 3 whole numbers"),
    ("model_config.grid.size", "6x24x24", "model_config.grid.size must be 3 whole numbers"),
    ("model_config.grid.spacing", (6.0, 0.0, 3.5), "model_config.grid.spacing must be in (0, 100] mm"),
    ("model_config.grid.spacing", (6.0, math.nan, 3.5), "model_config.grid.spacing"),
    ("model_config.grid.spacing", (6.0, 1e9, 3.5), "model_config.grid.spacing"),
    ("preprocessing", None, "preprocessing must be a dict holding a normalization dict"),
    ("preprocessing.normalization.low_pct", "1", "low_pct must be a number or a flag, got '1'"),
    ("preprocessing.normalization.mr_positive_only", 1, "mr_positive_only has an invalid value 1"),
    ("preprocessing.normalization.low_pct", 99.5, "normalisation"),
    (
        "preprocessing.normalization.low_pct",
        torch.zeros(2, 1),
        "low_pct must be a number or a flag, got a tensor",
    ),
    ("preprocessing.normalization", [1.0, 99.0], "holding a normalization dict"),
    (
        "calibration.statistic",
        torch.zeros(2),
        "calibration.statistic must be one of critic, contrast, got a tensor",
    ),
    ("generator", torch.zeros(3), "generator must be a dict of weight tensors, got a tensor of shape (3,)"),
    ("generator", [1, 2], "generator must be a dict of weight tensors"),
    ("generator.head.bias", torch.zeros(4), "generator.head.bias has shape (4,); model_config implies (3,)"),
    (
        "generator.head.bias",
        torch.zeros(3, dtype=torch.int64),
        "generator.head.bias must be a floating-point",
    ),
    (
        "generator.head.bias",
        [0.0, 0.0, 0.0],
        "generator.head.bias must be a floating-point tensor, got a list",
    ),
    ("generator.head.bias", torch.tensor([0.0, math.nan, 0.0]), "generator.head.bias contains NaN or Inf"),
    ("generator.head.bias", ..., "generator weights do not match model_config (missing head.bias)"),
    (
        "generator.head.extra",
        torch.zeros(1),
        "generator weights do not match model_config (unexpected head.extra)",
    ),
    (
        "discriminator.head.weight",
        torch.full((1, 32), math.inf),
        "discriminator.head.weight contains NaN or Inf",
    ),
    ("patient_check", "yes", "patient_check must be a dict of weight tensors"),
    ("calibration", "x", "calibration must be a dict"),
    ("calibration.critic", [math.nan] * 4, "calibration.critic must hold finite numbers only"),
    ("calibration.tre_mm", [math.nan] * 4, "calibration.tre_mm must hold finite numbers only"),
    ("calibration.critic", [0.0, 1.0], "calibration.critic must be a list of 4 to"),
    ("calibration.critic", ["a", "b", "c", "d"], "finite numbers only"),
    ("calibration.critic", [0.0, 1.0, 2.0, 3.0, 4.0], "differ in length"),
    ("calibration.tre_mm", [9.0, -6.0, 3.0, 1.0], "calibration.tre_mm must lie in [0, 10000] mm"),
    ("calibration.tre_mm", [9.0, 6.0, 3.0, 1e300], "calibration.tre_mm must lie in [0, 10000] mm"),
    ("calibration.critic", [0.0, 1.0, -1e300, 1e300], "calibration.critic must lie within ±1e+06"),
    ("calibration.statistic", "abcd", "calibration.statistic must be one of critic, contrast, got 'abcd'"),
    ("calibration.critic_values", [1.0], "calibration has unknown entries critic_values"),
    ("train_config", "fast", "train_config must be a dict"),
    ("train_config.epochs", [1], "train_config.epochs must be a finite number"),
    ("train_config.bogus", 1, "train_config has unknown entries bogus"),
    ("optimizer_g", "adam", "optimizer_g must be a dict"),
    ("metadata", [1], "metadata must be a dict"),
    ("epoch", -1, "epoch must be a whole number >= 0"),
    ("epoch", "3", "epoch must be a whole number >= 0"),
    ("history", {"epoch": 1}, "history must be a list of dicts"),
    ("history", [1, 2], "history must be a list of dicts"),
]


@pytest.mark.parametrize(
    ("entry", "value", "message"), BAD_ENTRIES, ids=[f"{e}-{i}" for i, (e, *_) in enumerate(BAD_ENTRIES)]
)
def test_a_crafted_entry_is_refused_on_loading_naming_file_and_entry(tmp_path, entry, value, message):
    path = checkpoint.save(tmp_path / "m.pt", _set(minimal_state(), entry, value))
    with pytest.raises(ModelError) as caught:
        checkpoint.load(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


PATIENT_ENTRIES = [
    ("patient_check_calibration", ..., "the patient check has no calibration"),
    ("patient_check_calibration", "strict", "patient_check_calibration must be a dict"),
    ("patient_check_calibration.threshold", math.nan, "patient_check_calibration.threshold must be a number"),
    ("patient_check_calibration.threshold", "low", "patient_check_calibration.threshold must be a number"),
    ("patient_check_calibration.auroc", 2.0, "patient_check_calibration.auroc must be a number in [0, 1]"),
    ("patient_check_calibration.same_pairs", -1, "patient_check_calibration.same_pairs"),
    ("patient_check_calibration.other_pairs", ..., "patient_check_calibration lacks other_pairs"),
    ("patient_check.head.bias", torch.zeros(2), "patient_check.head.bias has shape (2,)"),
]


@pytest.mark.parametrize(("entry", "value", "message"), PATIENT_ENTRIES, ids=[e for e, *_ in PATIENT_ENTRIES])
def test_a_crafted_patient_check_is_refused(tmp_path, entry, value, message):
    state = minimal_state()
    state["patient_check"] = copy.deepcopy(state["discriminator"])
    state["patient_check_calibration"] = dict(PATIENT_CALIBRATION)
    path = checkpoint.save(tmp_path / "ok.pt", state)
    assert checkpoint.load(path)["patient_check_calibration"] == PATIENT_CALIBRATION
    path = checkpoint.save(tmp_path / "m.pt", _set(state, entry, value))
    with pytest.raises(ModelError, match=r"m\.pt: invalid model file") as caught:
        checkpoint.load(path)
    assert message in str(caught.value)


def test_infinite_threshold_and_undefined_auroc_are_valid(tmp_path):
    state = minimal_state()
    state["patient_check"] = state["discriminator"]
    state["patient_check_calibration"] = {**PATIENT_CALIBRATION, "threshold": math.inf, "auroc": math.nan}
    assert (
        checkpoint.load(checkpoint.save(tmp_path / "m.pt", state))["patient_check_calibration"]["threshold"]
        > 0
    )


def test_expected_shapes_allocate_nothing_for_a_huge_grid():
    """4x100000x100000 would be 5 TB of weights: the schema refuses it by its bounds, and even the shape
    computation for a large valid-looking grid runs on the meta device without memory."""
    config = preset("tiny")
    big = config.__class__(
        dof=3, grid=config.grid.__class__((64, 1024, 1024), (1.0, 1.0, 1.0)), width=8, hidden=1024
    )
    with pytest.raises(checkpoint_schema._Invalid, match="makes a generator of"):
        checkpoint_schema.expected_shapes(big)


def test_the_model_file_size_is_capped_and_the_cap_overridable(tmp_path, monkeypatch):
    path = checkpoint.save(tmp_path / "m.pt", minimal_state())
    size = path.stat().st_size
    monkeypatch.setenv(checkpoint.MAX_MODEL_BYTES_ENV, str(size - 1))
    with pytest.raises(
        ModelError, match=r"m\.pt: .* is larger than a model file may be .*AIRREG_MAX_MODEL_BYTES"
    ):
        checkpoint.load(path)
    monkeypatch.setenv(checkpoint.MAX_MODEL_BYTES_ENV, str(size))
    assert checkpoint.load(path)["epoch"] == 3
    monkeypatch.setenv(checkpoint.MAX_MODEL_BYTES_ENV, "big")
    with pytest.raises(ModelError, match="AIRREG_MAX_MODEL_BYTES"):
        checkpoint.load(path)


def test_a_sparse_20_gb_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.pt"
    with path.open("wb") as f:
        f.truncate(20 * 2**30)  # sparse: takes no disk space
    with pytest.raises(
        ModelError, match=r"huge\.pt: 21,474,836,480 bytes is larger than a model file may be"
    ):
        checkpoint.load(path)


def test_the_bundled_models_fit_the_schema():
    for name in ("phantom-3dof", "phantom-6dof"):
        assert checkpoint.load(name)["model_config"]["dof"] in (3, 6)


def test_a_bad_input_check_section_is_refused_before_anything_is_built():
    data = torch.load(default_model_path(), weights_only=True)
    checkpoint_schema.validate(data, "model.pt")
    data["input_check"] = {"features": "intensity-stats-v1", "mean": [0.0] * 3}
    with pytest.raises(ModelError, match=r"model\.pt: invalid model file: .*input check"):
        checkpoint_schema.validate(data, "model.pt")
