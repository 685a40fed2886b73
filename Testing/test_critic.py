"""The critic's Lipschitz constraints (clip, gradient penalty) and the critic refinement of a trained model."""

from __future__ import annotations

import csv

import pytest
import torch

from airreg import checkpoint, distributed, resampling, training
from airreg.cli import main
from airreg.config import CriticConstraint, CriticObjective, OtherPatientPairs, TrainConfig, preset
from airreg.errors import InputError
from airreg.registration import Registrar
from airreg.training import Trainer
from conftest import TINY_TRAIN_KW


def trainer_with(constraint: str, **kw) -> Trainer:
    ctx = distributed.DistContext(0, 1, torch.device("cpu"))
    cfg = TrainConfig(**{**TINY_TRAIN_KW, "critic_constraint": constraint, **kw})
    return Trainer(preset("tiny"), cfg, ctx)


@pytest.fixture(scope="module")
def train_cache(tiny_run):
    return training.open_cache(next((tiny_run / "cache").glob("train-*")))


def test_constraint_is_recorded_and_selects_the_optimiser():
    assert isinstance(trainer_with("clip").opt_d, torch.optim.RMSprop)
    gp = trainer_with("gp")
    assert isinstance(gp.opt_d, torch.optim.Adam) and gp.opt_d.defaults["betas"] == (0.5, 0.9)
    assert TrainConfig.from_dict(gp.cfg.to_dict()).critic_constraint is CriticConstraint.GP
    assert gp.cfg.to_dict()["critic_constraint"] == "gp"


def test_clipped_critic_stays_within_the_clip(train_cache):
    trainer = trainer_with("clip", lr_d=0.05)
    logs = trainer.critic_step(trainer.draw_batch(train_cache, 1, 0, 0))
    assert "gradient_penalty" not in logs
    assert max(p.abs().max().item() for p in trainer.d.parameters()) <= trainer.cfg.clip + 1e-9


def test_gradient_penalty_matches_a_direct_computation(train_cache):
    trainer = trainer_with("gp", lr_d=0.05)
    b = trainer.draw_batch(train_cache, 1, 0, 0)
    # the penalty on the interpolates, computed independently before the update changes D
    with torch.no_grad():
        x_gt = trainer.sample(b.trus, None)
        fake_mr, fake_trus = trainer.fakes(b, x_gt)
    w = b.mix[:, None, None, None]
    mr = (w * b.mr + (1 - w) * fake_mr).requires_grad_()
    trus = (w * x_gt + (1 - w) * fake_trus).requires_grad_()
    grads = torch.autograd.grad(trainer.d(mr, trus).sum(), (mr, trus))
    norm = torch.cat([g.flatten(1) for g in grads], dim=1).norm(dim=1)
    expected = ((norm - 1) ** 2).mean().item()
    logs = trainer.critic_step(b)
    assert logs["gradient_penalty"] == pytest.approx(expected, rel=1e-4)
    assert logs["loss_d"] == pytest.approx(-logs["wasserstein"] + 10.0 * expected, rel=1e-4, abs=1e-6)
    # a penalised critic is not clipped: a large step leaves weights beyond the clip bound
    assert max(p.abs().max().item() for p in trainer.d.parameters()) > trainer.cfg.clip


def test_gradient_penalty_reduces_the_gradient_norm_error(train_cache):
    trainer = trainer_with("gp", lr_d=3e-3, gp_weight=100.0)
    penalties = [trainer.critic_step(trainer.draw_batch(train_cache, 1, 0, 0))["gradient_penalty"]]
    for _ in range(15):
        penalties.append(trainer.critic_step(trainer.draw_batch(train_cache, 1, 0, 0))["gradient_penalty"])
    assert penalties[-1] < 0.2 * penalties[0]  # the critic is pushed towards gradient norm 1


def test_ranking_pairs_hold_another_patients_trus_one_in_eight(train_cache):
    trainer = trainer_with("gp", batch_size=8)
    b = trainer.draw_batch(train_cache, 1, 0, 0)
    b.case = torch.arange(8)  # eight different cases
    (mr, trus), _tre_a, tre_b = trainer.ranking_pairs(b)
    n, aligned = 8, trainer.sample(b.trus, None)
    torch.testing.assert_close(mr[n + 7], b.mr[6])  # case 6's MR ...
    torch.testing.assert_close(trus[n + 7], aligned[5])  # ... against case 5's aligned TRUS, a gross failure
    assert tre_b[7].item() == training.GROSS_FAILURE_TRE_MM
    torch.testing.assert_close(mr[n + 6], b.mr[5])  # otherwise the previous case's perturbed start
    torch.testing.assert_close(trus[n + 6], trainer.sample(b.trus[5:6], b.perturb[5:6])[0])
    torch.testing.assert_close(tre_b[:7], training.tre_in_frame(b.perturb, b.points).roll(1, 0)[:7])
    b.case = torch.zeros(8, dtype=torch.long)  # a draw that repeats one case: its own TRUS, aligned
    assert trainer.ranking_pairs(b)[2][7].item() == 0.0


def test_registered_other_patient_pairs(train_cache):
    trainer = trainer_with("gp", batch_size=8)
    b = trainer.draw_batch(train_cache, 1, 0, 0)
    b.case = torch.arange(8)
    (mr, trus), tre_a, tre_b = trainer.ranking_pairs(b, OtherPatientPairs.REGISTERED)
    n, aligned = 8, trainer.sample(b.trus, None)

    def registered(mr: int, trus: int) -> torch.Tensor:  # case trus's TRUS registered by G to case mr's MR
        start = b.perturb[trus : trus + 1]
        with torch.no_grad():
            theta = trainer.g(b.mr[mr : mr + 1], trainer.sample(b.trus[trus : trus + 1], start))
        return trainer.sample(b.trus[trus : trus + 1], start @ resampling.rigid_matrices(theta, 3))[0]

    # pair 1: case 0's MR against case 7's TRUS as given
    torch.testing.assert_close(mr[n + 1], b.mr[0])
    torch.testing.assert_close(trus[n + 1], aligned[7])
    # pair 3: case 3's MR with its own TRUS registered by G, against case 2's TRUS registered by G to it
    torch.testing.assert_close(mr[3], b.mr[3])
    torch.testing.assert_close(mr[n + 3], b.mr[3])
    torch.testing.assert_close(trus[3], registered(3, 3))
    torch.testing.assert_close(trus[n + 3], registered(3, 2))
    # pair 7: case 7's graded misalignment against case 6's TRUS registered by G to case 7's MR
    graded = resampling.rigid_matrices(b.target[7:8] * b.magnitude[7:8, None], 3)
    torch.testing.assert_close(trus[7], trainer.sample(b.trus[7:8], graded)[0])
    torch.testing.assert_close(trus[n + 7], registered(7, 6))
    gross = [i for i in range(n) if tre_b[i].item() == training.GROSS_FAILURE_TRE_MM]
    assert gross == [1, 3, 7]
    assert tre_a[3].item() < training.GROSS_FAILURE_TRE_MM


def test_calibration_with_registered_other_patients(train_cache):
    trainer = trainer_with("gp")
    default = trainer.calibrate(train_cache, per_case=2)
    registered = trainer.calibrate(train_cache, per_case=2, other_patient=OtherPatientPairs.REGISTERED)
    count = len(train_cache)
    assert len(default.tre_mm) == count * (2 * 2 + 3) and len(registered.tre_mm) == count * (2 * 2 + 4)
    gross = sum(t == training.GROSS_FAILURE_TRE_MM for t in registered.tre_mm)
    assert gross == 4 * count


def test_ranking_step_learns_to_order_alignments_by_tre(train_cache):
    trainer = trainer_with("gp", lr_d=1e-3, batch_size=8)
    b = trainer.draw_batch(train_cache, 1, 0, 0)
    first = trainer.ranking_step(b)
    assert 0.0 <= first["rank_accuracy"] <= 1.0 and first["loss_d"] > 0
    for _ in range(30):  # the same batch: its pairs end up ordered
        logs = trainer.ranking_step(b)
    assert logs["loss_d"] < first["loss_d"] and logs["rank_accuracy"] == 1.0


@pytest.fixture(scope="module", params=["rank", "wgan"])
def refined(request, tiny_dataset, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"refined-{request.param}") / "refined.pt"
    training.refine_critic(
        tiny_model,
        tiny_dataset,
        out,
        steps=4,
        objective=CriticObjective(request.param),
        batch_size=4,
        check_every=2,
        device="cpu",
        progress=False,
    )
    return request.param, out


def test_refinement_keeps_the_generator_and_replaces_the_critic(refined, tiny_model):
    objective, path = refined
    before, after = checkpoint.load(tiny_model), checkpoint.load(path)
    for name, value in before["generator"].items():
        assert torch.equal(value, after["generator"][name]), name
    assert any(not torch.equal(v, after["discriminator"][k]) for k, v in before["discriminator"].items())
    assert after["train_config"] == before["train_config"]  # how G and D were trained adversarially
    info = after["metadata"]["critic_refinement"]
    assert info["objective"] == objective and info["steps"] == 4 and info["fresh_critic"] is False
    assert info["constraint"] == ("gp" if objective == "wgan" else None)
    assert 0.0 <= info["validation_auroc"] <= 1.0
    assert after["calibration"]["statistic"] in ("critic", "contrast")
    assert "optimizer_d" not in after


def test_refinement_log_and_curves(refined):
    objective, path = refined
    rows = list(csv.DictReader((path.parent / "refined-critic-log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    key = "rank_accuracy" if objective == "rank" else "gradient_penalty"
    assert all(float(r[key]) >= 0 for r in rows)
    assert [r["val_auroc"] != "" for r in rows] == [False, True, False, True]
    assert (path.parent / "refined-critic-curves.png").read_bytes()[:4] == b"\x89PNG"


def test_refined_model_registers(refined, tiny_case):
    result = Registrar.from_checkpoint(refined[1], device="cpu").register(tiny_case.mr, tiny_case.trus)
    assert 0.0 <= result.d_score <= 1.0 and result.quality in ("ok", "warning")


def test_refinement_needs_a_step(tiny_dataset, tiny_model, tmp_path):
    with pytest.raises(InputError, match="at least 1 step"):
        training.refine_critic(tiny_model, tiny_dataset, tmp_path / "m.pt", steps=0, device="cpu")
    assert not (tmp_path / "m.pt").exists()


def test_cli_refine_critic(tiny_dataset, tiny_model, tmp_path, capsys):
    out = tmp_path / "cli.pt"
    args = ["refine-critic", "--model", str(tiny_model), "--data", str(tiny_dataset), "--out", str(out)]
    options = [
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--fresh",
        "--other-patient",
        "registered",
        "--device",
        "cpu",
    ]
    assert main([*args, *options]) == 0
    model = checkpoint.load(out)
    info = model["metadata"]["critic_refinement"]
    assert (
        info["fresh_critic"] is True and info["objective"] == "rank" and info["other_patient"] == "registered"
    )
    assert len(model["calibration"]["tre_mm"]) == model["metadata"]["val_cases"] * (24 * 2 + 4)
    assert "refined critic written" in capsys.readouterr().out
    # a recalibration uses the same gross failures as the refinement did
    recalibrated = training.recalibrate(
        out, tiny_dataset, tmp_path / "recalibrated.pt", device="cpu", progress=False
    )
    assert checkpoint.load(recalibrated)["calibration"]["tre_mm"] == model["calibration"]["tre_mm"]
    with pytest.raises(InputError, match="statistic must be one of critic, contrast, got 'mean'"):
        training.recalibrate(
            out, tiny_dataset, tmp_path / "bad.pt", device="cpu", progress=False, statistic="mean"
        )
    assert not (tmp_path / "bad.pt").exists()
    assert main([*args, "--steps", "0"]) == 2
    assert "at least 1 step" in capsys.readouterr().err
