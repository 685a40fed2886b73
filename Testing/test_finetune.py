"""Fine-tuning (``airreg train --init-from``) and the "flag not calibrated" note of every report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from airreg import checkpoint, distributed
from airreg.cli import main
from airreg.config import TrainConfig, fine_tune_schedule, preset
from airreg.registration import Registrar
from airreg.training import Trainer

FINE_TUNE = ["--init-from", "phantom-3dof", "--batch-size", "2", "--steps-per-epoch", "1", "--device", "cpu"]
NARROW_STARTS = ("--rotation-deg", "10", "--translation-mm", "4")  # a refiner stage's training starts


def _train(data: Path, out: Path, epochs: int, *extra: str) -> int:
    return main(
        ["train", "--data", str(data), "--out", str(out), "--epochs", str(epochs), *FINE_TUNE, *extra]
    )


@pytest.fixture(scope="module")
def fine_tuned(tiny_dataset, tmp_path_factory) -> Path:
    """Two epochs of fine-tuning the bundled 3-DOF model on the tiny dataset, from narrower starts than it was
    trained on (a refiner stage)."""
    out = tmp_path_factory.mktemp("fine-tuned")
    assert _train(tiny_dataset, out, 2, *NARROW_STARTS) == 0
    return out


def _relative_distance(a: dict, b: dict) -> float:
    num = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in a)
    return math.sqrt(num / sum(float(b[k].float().norm() ** 2) for k in b))


def test_init_from_a_bundled_name_starts_from_its_weights(fine_tuned):
    bundled = checkpoint.load("phantom-3dof")
    model = checkpoint.load(fine_tuned / "model.pt")
    assert model["metadata"]["init_from"] == {"model": "airnet-phantom-3dof.pt", "sha256": bundled["sha256"]}
    assert model["preprocessing"]["normalization"] == bundled["preprocessing"]["normalization"]
    # two small steps away from the bundled weights; a fresh initialisation is nowhere near them
    assert _relative_distance(model["generator"], bundled["generator"]) < 0.02
    fresh = Trainer(preset("default"), TrainConfig(), distributed.DistContext(0, 1, torch.device("cpu")))
    assert _relative_distance(fresh.g.state_dict(), bundled["generator"]) > 0.2  # 0.45 when written


def test_fine_tune_schedule_is_saved_with_the_model(fine_tuned):
    cfg = TrainConfig.from_dict(checkpoint.load(fine_tuned / "model.pt")["train_config"])
    assert cfg.lr_g == pytest.approx(3e-5) and cfg.lr_d == pytest.approx(1e-5) and cfg.lr_warmup_epochs == 1
    assert (cfg.rotation_deg, cfg.translation_mm) == (10.0, 4.0)


def test_warm_up_then_cosine():
    cfg = fine_tune_schedule(TrainConfig(epochs=20))
    assert cfg.lr_warmup_epochs == 2
    trainer = Trainer(preset("tiny"), cfg, distributed.DistContext(0, 1, torch.device("cpu")))
    rates = []
    for epoch in (1, 2, 3, 20):
        trainer.set_learning_rates(epoch)
        rates.append(trainer.opt_g.param_groups[0]["lr"] / cfg.lr_g)
    cosine = [0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (e - 1) / 19)) for e in (1, 2, 3, 20)]
    assert rates == pytest.approx([cosine[0] / 3, cosine[1] * 2 / 3, cosine[2], 0.05])


def test_resumed_fine_tune_equals_the_straight_run(tiny_dataset, fine_tuned, tmp_path):
    out = tmp_path / "resumed"
    assert _train(tiny_dataset, out, 1, *NARROW_STARTS) == 0
    assert _train(tiny_dataset, out, 2, *NARROW_STARTS, "--resume", str(out / "last.pt")) == 0
    resumed, straight = checkpoint.load(out / "last.pt"), checkpoint.load(fine_tuned / "last.pt")
    assert resumed["epoch"] == straight["epoch"] == 2
    assert resumed["metadata"]["init_from"] == straight["metadata"]["init_from"]
    for net in ("generator", "discriminator"):
        for key, value in straight[net].items():
            assert torch.equal(resumed[net][key], value), (net, key)


def test_init_from_another_configuration_is_refused(tiny_dataset, tmp_path, capsys):
    assert _train(tiny_dataset, tmp_path / "run", 1, "--preset", "tiny") == 2
    err = capsys.readouterr().err
    assert "airnet-phantom-3dof.pt" in err and "another model configuration" in err and "--preset" in err


# --- the quality flag's calibration ----------------------------------------------------------------------------


def test_flag_calibrated_needs_the_critic_refinement_and_the_patient_check():
    refined = {"metadata": {"critic_refinement": {"steps": 3}}, "patient_check": {"w": 1}}
    assert checkpoint.flag_calibrated(refined)
    assert not checkpoint.flag_calibrated({**refined, "patient_check": None})
    assert not checkpoint.flag_calibrated({**refined, "metadata": {}})
    assert checkpoint.flag_calibrated(checkpoint.load("phantom-3dof"))


def test_freshly_trained_and_fine_tuned_models_say_flag_not_calibrated(tiny_model, fine_tuned):
    for model in (tiny_model, fine_tuned / "model.pt"):
        assert Registrar.from_checkpoint(model, "cpu").flag_note == checkpoint.FLAG_NOT_CALIBRATED
    assert Registrar.from_checkpoint("phantom-3dof", "cpu").flag_note is None


def test_register_report_and_output_say_flag_not_calibrated(tiny_dataset, tiny_model, tmp_path, capsys):
    case = tiny_dataset / "case000"
    report = tmp_path / "report.json"
    args = [
        "register",
        "--mr",
        str(case / "mr.nii.gz"),
        "--trus",
        str(case / "trus.nii.gz"),
        "--device",
        "cpu",
    ]
    args += ["--out-transform", str(tmp_path / "t.tfm"), "--report", str(report), "--model", str(tiny_model)]
    assert main(args) == 0
    assert "WARNING: flag not calibrated" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["flag_calibrated"] is False and data["flag_note"] == checkpoint.FLAG_NOT_CALIBRATED


def test_evaluate_summary_says_flag_not_calibrated(tiny_dataset, tiny_model, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "--data", str(tiny_dataset), "--model", str(tiny_model), "--out", str(out)]
    assert main([*args, "--overlays", "0", "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flag_calibrated"] is False
    assert f"**WARNING: {checkpoint.FLAG_NOT_CALIBRATED}.**" in (out / "summary.md").read_text(
        encoding="utf-8"
    )
