"""Tests of airreg.checkpoint: round trip, refusal of code-executing pickles, corrupt and foreign files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import airreg
from airreg import checkpoint
from airreg.config import ModelConfig, TrainConfig, preset
from airreg.errors import ModelError
from airreg.intensity import NormalizationSpec
from airreg.networks import Discriminator, Generator
from airreg.registration import Registrar


def minimal_state(config: ModelConfig | None = None) -> dict:
    config = config or preset("tiny")
    torch.manual_seed(0)
    g, d = Generator(config), Discriminator(config)
    with torch.no_grad():
        g.head.bias.copy_(torch.arange(config.dof, dtype=torch.float32))
    return {
        "model_config": config.to_dict(),
        "train_config": TrainConfig(epochs=3).to_dict(),
        "preprocessing": {"normalization": NormalizationSpec().to_dict(), "grid_center": "mr_volume_center"},
        "calibration": {"critic": [0.0, 1.0, 2.0, 3.0], "tre_mm": [9.0, 6.0, 3.0, 1.0]},
        "generator": g.state_dict(),
        "discriminator": d.state_dict(),
        "epoch": 3,
        "history": [{"epoch": 1, "loss_d": -0.5}],
        "metadata": {"note": "test"},
    }


def test_round_trip_preserves_tensors_and_config(tmp_path):
    state = minimal_state()
    path = checkpoint.save(tmp_path / "sub" / "m.pt", state)
    loaded = checkpoint.load(path)
    assert loaded["format"] == checkpoint.FORMAT
    assert loaded["format_version"] == checkpoint.FORMAT_VERSION
    assert loaded["package_version"] == airreg.__version__
    assert loaded["path"] == str(path)
    assert len(loaded["sha256"]) == 64
    for key in (
        "model_config",
        "train_config",
        "preprocessing",
        "calibration",
        "epoch",
        "history",
        "metadata",
    ):
        assert loaded[key] == state[key]
    assert ModelConfig.from_dict(loaded["model_config"]) == preset("tiny")
    assert TrainConfig.from_dict(loaded["train_config"]) == TrainConfig(epochs=3)
    for net in ("generator", "discriminator"):
        assert loaded[net].keys() == state[net].keys()
        for name, tensor in state[net].items():
            assert torch.equal(loaded[net][name], tensor), name
    assert not list(tmp_path.glob("sub/.*")), "no temporary file left beside the checkpoint"


def test_export_for_inference_drops_optimiser_state():
    state = {**minimal_state(), "optimizer_g": {"a": 1}, "optimizer_d": {"b": 2}, "sha256": "x", "path": "p"}
    exported = checkpoint.export_for_inference(state)
    assert "optimizer_g" not in exported and "optimizer_d" not in exported and "sha256" not in exported
    assert exported["generator"] is state["generator"]


class RunsCode:
    """Unpickling this object runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_torch_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({**minimal_state(), "format": checkpoint.FORMAT, "payload": RunsCode(marker)}, path)
    with pytest.raises(ModelError, match="refused"):
        checkpoint.load(path)
    assert not marker.exists()


def test_code_executing_plain_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": checkpoint.FORMAT, "payload": RunsCode(marker)}, protocol=2))
    with pytest.raises(ModelError, match=str(path)):
        checkpoint.load(path)
    assert not marker.exists()


def test_code_executing_checkpoint_is_refused_by_the_registrar(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({**minimal_state(), "format": checkpoint.FORMAT, "payload": RunsCode(marker)}, path)
    with pytest.raises(ModelError):
        Registrar.from_checkpoint(path, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.02])
def test_truncated_checkpoint(tmp_path, fraction):
    path = checkpoint.save(tmp_path / "m.pt", minimal_state())
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(ModelError, match=str(path)):
        checkpoint.load(path)


def test_empty_file(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(b"")
    with pytest.raises(ModelError, match="corrupt"):
        checkpoint.load(path)


def test_text_file_as_model_is_a_model_error(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(b"hello world")
    with pytest.raises(ModelError, match=str(path)):
        checkpoint.load(path)


def test_garbage_file_is_reported_as_corrupt_not_as_code(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ModelError, match="corrupt"):
        checkpoint.load(path)


def test_garbage_file_is_a_model_error(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ModelError, match=str(path)):
        checkpoint.load(path)


@pytest.mark.parametrize("content", [{"a": 1}, [1, 2, 3], {"format": "something-else"}])
def test_non_checkpoint_is_refused(tmp_path, content):
    path = tmp_path / "m.pt"
    torch.save(content, path)
    with pytest.raises(ModelError, match="not an AIRRegistration checkpoint"):
        checkpoint.load(path)


def test_newer_format_and_missing_keys(tmp_path):
    state = minimal_state()
    path = tmp_path / "m.pt"
    torch.save({**state, "format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION + 1}, path)
    with pytest.raises(ModelError, match="newer"):
        checkpoint.load(path)
    del state["discriminator"]
    checkpoint.save(path, state)
    with pytest.raises(ModelError, match="discriminator"):
        checkpoint.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        checkpoint.load(tmp_path / "nope.pt")


@pytest.mark.parametrize("config", [preset("default"), preset("tiny", dof=6)])
def test_weights_of_another_preset_are_refused_on_loading(tmp_path, config):
    state = minimal_state(preset("tiny"))
    state["model_config"] = config.to_dict()
    path = checkpoint.save(tmp_path / "m.pt", state)
    with pytest.raises(ModelError, match=r"m\.pt: invalid model file: generator\..* model_config implies"):
        checkpoint.load(path)  # the schema compares the weights with the configuration before building


def test_model_without_calibration_is_refused(tmp_path):
    state = minimal_state()
    state["calibration"] = None
    path = checkpoint.save(tmp_path / "m.pt", state)
    with pytest.raises(ModelError, match="calibration"):
        Registrar.from_checkpoint(path, device="cpu")


def test_registrar_loads_a_valid_minimal_checkpoint(tmp_path):
    path = checkpoint.save(tmp_path / "m.pt", minimal_state())
    registrar = Registrar.from_checkpoint(path, device="cpu")
    assert registrar.config == preset("tiny")
    assert registrar.model_id == "m.pt"
    assert registrar.model_sha256 == checkpoint.load(path)["sha256"]
    assert torch.equal(registrar.g.head.bias, torch.arange(3, dtype=torch.float32))


def test_default_model_path_points_into_the_package():
    path = checkpoint.default_model_path()
    package = Path(airreg.__file__).resolve().parent
    assert path.resolve().parent == package / "models"
    assert path.name == checkpoint.DEFAULT_MODEL_NAME and path.suffix == ".pt"


def test_bundled_model_names_resolve_inside_the_package(tmp_path, monkeypatch):
    from airreg import checkpoint as ckpt_module

    monkeypatch.chdir(tmp_path)
    assert ckpt_module.resolve(None) == ckpt_module.default_model_path()
    assert ckpt_module.resolve("phantom-3dof") == ckpt_module.default_model_path()
    assert ckpt_module.resolve("no-such-model") == Path("no-such-model")  # not a bundled name: stays a path
    (tmp_path / "phantom-3dof").write_bytes(b"x")  # a real file of that name wins
    assert ckpt_module.resolve("phantom-3dof") == Path("phantom-3dof")


@pytest.mark.parametrize(
    ("name", "dof", "other_patient"), [("phantom-3dof", 3, "as-given"), ("phantom-6dof", 6, "as-given")]
)
def test_bundled_models_record_how_their_critic_was_refined(name, dof, other_patient):
    from airreg.training import refined_other_patient

    path = checkpoint.resolve(name)
    if not path.exists():
        pytest.skip(f"bundled model {path.name} is not installed")
    state = checkpoint.load(path)
    assert state["model_config"]["dof"] == dof
    info = state["metadata"]["critic_refinement"]
    assert info["objective"] == "rank" and len(info["from_model_sha256"]) == 64
    assert refined_other_patient(state).value == other_patient  # what a recalibration reproduces
    calibration = state["calibration"]
    assert (
        len(calibration["critic"])
        == len(calibration["tre_mm"])
        == 40 * (24 * 2 + 3 + (other_patient == "registered"))
    )


@pytest.mark.parametrize("name", ["phantom-3dof", "phantom-6dof"])
def test_bundled_models_carry_a_patient_check_for_their_own_generator(name):
    from airreg.quality import PatientCheckCalibration

    path = checkpoint.resolve(name)
    if not path.exists():
        pytest.skip(f"bundled model {path.name} is not installed")
    state = checkpoint.load(path)
    check = PatientCheckCalibration.from_dict(state["patient_check_calibration"])
    assert check.false_alarm_rate == pytest.approx(0.05, abs=0.01) and check.detection_rate > 0.5
    assert check.same_pairs == 8 * 32  # the calibration draws of the validation cases
    info = state["metadata"]["patient_check"]
    assert info["false_alarm"] == 0.05 and info["steps"] == 3000 and len(info["from_model_sha256"]) == 64
    assert Registrar(state, "cpu").patient_check == check


def test_export_in_half_precision_halves_the_file_and_barely_moves_a_registration(
    tiny_model, tiny_case, tmp_path
):
    from airreg.cli import main

    out = tmp_path / "half.pt"
    assert main(["export", "--model", str(tiny_model), "--out", str(out), "--float16"]) == 0
    full, half = checkpoint.load(tiny_model), checkpoint.load(out)
    assert out.stat().st_size < 0.6 * tiny_model.stat().st_size
    for key in ("generator", "discriminator"):
        assert all(t.dtype == torch.float16 for t in half[key].values())
        assert all(
            torch.allclose(half[key][k].float(), v, rtol=1e-3, atol=1e-4) for k, v in full[key].items()
        )
    assert "optimizer_g" not in half and half["calibration"] == full["calibration"]
    a = Registrar(full, "cpu").register(tiny_case.mr, tiny_case.trus)
    b = Registrar(half, "cpu").register(tiny_case.mr, tiny_case.trus)
    assert np.abs(a.mr_to_trus - b.mr_to_trus).max() < 0.05  # mm and rotation entries
    assert Registrar(half, "cpu").g.head.weight.dtype == torch.float32  # computed in float32


@pytest.mark.parametrize("name", ["phantom-3dof", "phantom-6dof"])
def test_bundled_models_are_shipped_in_half_precision_with_a_refiner(name):
    path = checkpoint.resolve(name)
    if not path.exists():
        pytest.skip(f"bundled model {path.name} is not installed")
    state = checkpoint.load(path)
    assert all(t.dtype == torch.float16 for t in state["generator"].values())
    assert all(t.dtype == torch.float16 for t in state["refiner"]["generator"].values())
    meta = state["metadata"]["refiner"]
    assert meta["rotation_deg"] < 25 and meta["translation_mm"] < 5 and meta["seconds"] > 0
