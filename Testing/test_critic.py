"""The critic's Lipschitz constraints (clip, gradient penalty) and the critic refinement of a trained model."""

from __future__ import annotations

import csv

import pytest
import torch

from airreg import checkpoint, distributed, resampling, training
from airreg.cli import main
from airreg.config import CriticConstraint, CriticObjective, TrainConfig, preset
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


def test_ranking_pairs_hold_another_patients_trus_as_given_and_registered_by_g(train_cache):
    trainer = trainer_with("gp", batch_size=8)
    b = trainer.draw_batch(train_cache, 1, 0, 0)
    seen = {}

    def record(mr, trus):
        seen["mr"], seen["trus"] = mr, trus
        return trainer.d(mr, trus)

    trainer.d_ddp = record
    trainer.ranking_step(b)
    n, aligned = 8, trainer.sample(b.trus, None)

    def registered(mr: int, trus: int) -> torch.Tensor:  # case trus's TRUS registered by G to case mr's MR
        with torch.no_grad():
            theta = trainer.g(
                b.mr[mr : mr + 1], trainer.sample(b.trus[trus : trus + 1], b.perturb[trus : trus + 1])
            )
        moved = b.perturb[trus : trus + 1] @ resampling.rigid_matrices(theta, trainer.model.dof)
        return trainer.sample(b.trus[trus : trus + 1], moved)[0]

    # pair 1: case 0's MR against case 7's TRUS as given
    torch.testing.assert_close(seen["mr"][n + 1], b.mr[0])
    torch.testing.assert_close(seen["trus"][n + 1], aligned[7])
    # pair 3: case 3's MR with its own TRUS registered by G, against case 2's TRUS registered by G
    torch.testing.assert_close(seen["mr"][3], b.mr[3])
    torch.testing.assert_close(seen["mr"][n + 3], b.mr[3])
    torch.testing.assert_close(seen["trus"][3], registered(3, 3))
    torch.testing.assert_close(seen["trus"][n + 3], registered(3, 2))
    # pair 6: case 6's graded misalignment against case 5's perturbed start
    torch.testing.assert_close(seen["mr"][n + 6], b.mr[5])
    torch.testing.assert_close(seen["trus"][n + 6], trainer.sample(b.trus[5:6], b.perturb[5:6])[0])
    graded = resampling.rigid_matrices(b.target[6:7] * b.magnitude[6:7, None], trainer.model.dof)
    torch.testing.assert_close(seen["trus"][6], trainer.sample(b.trus[6:7], graded)[0])


def test_ranking_step_learns_to_order_alignments_by_tre(train_cache):
    trainer = trainer_with("gp", lr_d=1e-3, batch_size=8)
    b = trainer.draw_batch(train_cache, 1, 0, 0)
    first = trainer.ranking_step(b)
    assert 0.0 <= first["rank_accuracy"] <= 1.0 and first["loss_d"] > 0
    for _ in range(80):  # the same batch: its pairs end up ordered
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
    assert main([*args, "--steps", "2", "--batch-size", "4", "--fresh", "--device", "cpu"]) == 0
    info = checkpoint.load(out)["metadata"]["critic_refinement"]
    assert info["fresh_critic"] is True and info["objective"] == "rank"
    assert "refined critic written" in capsys.readouterr().out
    assert main([*args, "--steps", "0"]) == 2
    assert "at least 1 step" in capsys.readouterr().err


def test_calibration_holds_four_gross_failures_per_case(train_cache):
    trainer = trainer_with("gp")
    calibration = trainer.calibrate(train_cache, per_case=2)
    tre = torch.tensor(calibration.tre_mm)
    # other patient as given and registered by G, blank TRUS, swapped inputs; 2 starts and 2 estimates
    assert (tre == training.GROSS_FAILURE_TRE_MM).sum().item() == 4 * len(train_cache)
    assert len(tre) == 8 * len(train_cache)
