"""Tests of airreg.training on the tiny preset: a few steps, logs, checkpoints, resume, cache and helpers."""

from __future__ import annotations

import csv
import math
import os
import shutil

import numpy as np
import pytest
import torch
from scipy import stats

from airreg import checkpoint, distributed, resampling, training
from airreg.config import TrainConfig, preset
from airreg.errors import InputError, ModelError
from airreg.training import Trainer
from conftest import TINY_EPOCHS, TINY_TRAIN_KW

LOSS_KEYS = ("loss_d", "loss_g", "loss_adv", "loss_param", "train_tre", "wasserstein")
VAL_KEYS = ("val_tre_before", "val_tre_after", "val_critic_aligned", "val_critic_estimate")

# --- one short training run (session fixture ``tiny_run``) ---------------------------------------------


def test_history_losses_are_finite(tiny_run):
    last = checkpoint.load(tiny_run / "last.pt")
    history = last["history"]
    assert [row["epoch"] for row in history] == list(range(1, TINY_EPOCHS + 1))
    for row in history:
        for key in LOSS_KEYS + VAL_KEYS + ("seconds",):
            assert math.isfinite(row[key]), (key, row)
        assert row["val_tre_before"] > 1.0  # the ±25°/±5 mm starts are visibly misaligned
        assert row["loss_param"] > 0


def test_log_csv_and_loss_curves(tiny_run):
    with (tiny_run / "log.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == TINY_EPOCHS
    assert [int(r["epoch"]) for r in rows] == list(range(1, TINY_EPOCHS + 1))
    for key in LOSS_KEYS + VAL_KEYS:
        assert all(math.isfinite(float(r[key])) for r in rows), key
    png = (tiny_run / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_training_checkpoint_round_trip(tiny_run):
    last = checkpoint.load(tiny_run / "last.pt")
    assert last["epoch"] == TINY_EPOCHS
    assert "optimizer_g" in last and "optimizer_d" in last
    assert last["model_config"] == preset("tiny").to_dict()
    assert TrainConfig.from_dict(last["train_config"]) == TrainConfig(**TINY_TRAIN_KW)
    # the critic's weights are clipped to ±0.01 (WGAN)
    for name, tensor in last["discriminator"].items():
        assert tensor.abs().max() <= 0.01 + 1e-7, name
    # training moved G's head away from the identity start
    assert last["generator"]["head.weight"].abs().sum() > 0


def test_exported_model_has_calibration_and_no_optimiser(tiny_run):
    model = checkpoint.load(tiny_run / "model.pt")
    assert "optimizer_g" not in model and "optimizer_d" not in model
    cal = model["calibration"]
    n_val = model["metadata"]["val_cases"]
    assert model["metadata"]["train_cases"] + n_val == 6 and n_val == 1  # 5:1 split by case
    assert len(cal["critic"]) == len(cal["tre_mm"]) == n_val * (24 * 2 + 3)
    assert all(math.isfinite(v) for v in cal["critic"] + cal["tre_mm"])
    assert cal["tre_mm"].count(training.GROSS_FAILURE_TRE_MM) >= 3 * n_val
    assert model["metadata"]["selected_epoch"] in range(1, TINY_EPOCHS + 1)
    assert len(model["history"]) == TINY_EPOCHS


# --- resume ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed_run(tiny_dataset, tmp_path_factory):
    """One epoch, then resumed to TINY_EPOCHS from last.pt (in the same folder).

    Before resuming, the epoch-1 validation TRE in last.pt is set to 0 mm (a best epoch that later epochs cannot
    beat): this changes nothing in the parameters, only which epoch should be exported.
    """
    out = tmp_path_factory.mktemp("resumed")
    kw = {**TINY_TRAIN_KW, "epochs": 1}
    training.train(tiny_dataset, out, preset("tiny"), TrainConfig(**kw), device="cpu", progress=False)
    caches = sorted((out / "cache").glob("*/mr.npy"))
    mtimes = [p.stat().st_mtime_ns for p in caches]
    state = checkpoint.load(out / "last.pt")
    assert state["epoch"] == 1
    state["history"][0]["val_tre_after"] = 0.0
    checkpoint.save(out / "last.pt", {k: v for k, v in state.items() if k not in ("sha256", "path")})
    training.train(
        tiny_dataset,
        out,
        preset("tiny"),
        TrainConfig(**TINY_TRAIN_KW),
        resume=out / "last.pt",
        device="cpu",
        progress=False,
    )
    return out, caches, mtimes


def test_resume_continues_at_the_next_epoch_with_identical_parameters(resumed_run, tiny_run):
    out, _, _ = resumed_run
    resumed, straight = checkpoint.load(out / "last.pt"), checkpoint.load(tiny_run / "last.pt")
    assert resumed["epoch"] == straight["epoch"] == TINY_EPOCHS
    assert [r["epoch"] for r in resumed["history"]] == list(range(1, TINY_EPOCHS + 1))
    for net in ("generator", "discriminator"):
        for name, tensor in straight[net].items():
            torch.testing.assert_close(resumed[net][name], tensor, rtol=0, atol=1e-6, msg=f"{net}.{name}")
    for key in LOSS_KEYS:
        assert resumed["history"][-1][key] == pytest.approx(straight["history"][-1][key], rel=1e-5, abs=1e-7)


def test_resume_reuses_the_cache(resumed_run):
    out, caches, mtimes = resumed_run
    assert len(caches) == 2  # train and validation
    assert sorted((out / "cache").glob("*/mr.npy")) == caches
    assert [p.stat().st_mtime_ns for p in caches] == mtimes


def test_resume_keeps_the_best_epoch_from_before(resumed_run):
    out, _, _ = resumed_run
    assert checkpoint.load(out / "model.pt")["metadata"]["selected_epoch"] == 1


def test_resume_from_an_exported_model_is_refused(tiny_dataset, tiny_run, tmp_path):
    with pytest.raises(ModelError, match="optimiser"):
        training.train(
            tiny_dataset,
            tmp_path,
            preset("tiny"),
            TrainConfig(**TINY_TRAIN_KW),
            resume=tiny_run / "model.pt",
            device="cpu",
            progress=False,
        )


def test_resume_with_another_configuration_is_refused(tiny_dataset, tiny_run, tmp_path):
    with pytest.raises(ModelError, match="another model configuration"):
        training.train(
            tiny_dataset,
            tmp_path,
            preset("tiny", dof=6),
            TrainConfig(**TINY_TRAIN_KW),
            resume=tiny_run / "last.pt",
            device="cpu",
            progress=False,
        )


# --- the cache ---------------------------------------------------------------------------------------------


def cpu_trainer(model=None) -> Trainer:
    ctx = distributed.DistContext(0, 1, torch.device("cpu"))
    return Trainer(model or preset("tiny"), TrainConfig(**TINY_TRAIN_KW), ctx)


def test_cache_is_reused_not_rebuilt(tiny_dataset, tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(tiny_run / "cache", out / "cache")

    def fail(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(training, "build_cache", fail)
    train_cache, val_cache = training.split_caches(tiny_dataset, out, cpu_trainer(), progress=False)
    assert len(train_cache) == 5 and len(val_cache) == 1
    assert sorted(p.name for p in (out / "cache").iterdir()) == sorted(
        p.name for p in (tiny_run / "cache").iterdir()
    )


def test_cache_is_rebuilt_when_a_case_file_changes_even_with_its_size_and_mtime_kept(tiny_dataset, tmp_path):
    root = shutil.copytree(tiny_dataset, tmp_path / "data")
    out = tmp_path / "run"
    train_cache, _ = training.split_caches(root, out, cpu_trainer(), progress=False)
    case = train_cache.ids[0]
    landmarks = root / case / "landmarks.csv"
    stat = landmarks.stat()
    lines = landmarks.read_text().splitlines()
    row = lines[1].split(",")
    row[1] = row[1][:-1] + ("1" if row[1][-1] != "1" else "2")  # the last digit of the first MR coordinate
    changed = "\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n"
    assert len(changed) == stat.st_size
    landmarks.write_text(changed)
    os.utime(landmarks, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    rebuilt, _ = training.split_caches(root, out, cpu_trainer(), progress=False)
    assert len(list((out / "cache").glob("train-*"))) == 2
    assert not np.allclose(rebuilt.points[0], train_cache.points[0], equal_nan=True)
    np.testing.assert_array_equal(rebuilt.mr, train_cache.mr)  # only the landmarks changed


def test_a_truncated_cache_is_rebuilt_and_reads_as_a_clear_error(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    cache, _ = training.split_caches(tiny_dataset, out, cpu_trainer(), progress=False)
    expected = np.array(cache.mr)
    folder = next((out / "cache").glob("train-*"))
    raw = (folder / "mr.npy").read_bytes()
    (folder / "mr.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="damaged training cache"):
        training.open_cache(folder)
    rebuilt, _ = training.split_caches(tiny_dataset, out, cpu_trainer(), progress=False)
    np.testing.assert_array_equal(np.array(rebuilt.mr), expected)


def test_cache_key_depends_on_what_the_cache_holds():
    from airreg.intensity import NormalizationSpec

    norm = NormalizationSpec()
    key = training.cache_key(preset("tiny"), norm, ["a", "b"])
    assert key == training.cache_key(preset("tiny"), NormalizationSpec(), ["a", "b"])
    assert key != training.cache_key(preset("tiny", dof=6), norm, ["a", "b"])
    assert key != training.cache_key(preset("default"), norm, ["a", "b"])
    assert key != training.cache_key(preset("tiny"), NormalizationSpec(low_pct=2.0), ["a", "b"])
    assert key != training.cache_key(preset("tiny"), norm, ["a", "c"])


def test_cache_contents(tiny_run):
    from airreg.preprocessing import cache_spec

    folder = next((tiny_run / "cache").glob("train-*"))
    cache = training.open_cache(folder)
    config = preset("tiny")
    assert cache.ids == [f"case{i:03d}" for i in range(6) if f"case{i:03d}" in cache.ids] and len(cache) == 5
    assert cache.mr.shape == (5, *config.grid.size) and cache.mr.dtype == np.float16
    assert cache.trus.shape == (5, *cache_spec(config.grid, config.dof).size)
    # landmarks in the grid frame: the frame origin is the MR centre, so distances from it are the offsets'
    expected = sorted([18.0, 18.0, 15.0, 15.0, math.hypot(12, 3), math.hypot(12, 3)])
    for points in cache.points:
        np.testing.assert_allclose(sorted(np.linalg.norm(points, axis=1)), expected, atol=1e-3)


def test_cached_trus_is_aligned_with_the_mr(tiny_run):
    """TRUS is a monotone intensity map of the MR through gt: aligned stacks correlate, shifted ones less."""
    folder = next((tiny_run / "cache").glob("train-*"))
    cache = training.open_cache(folder)
    trainer = cpu_trainer()
    mr, trus, _ = cache.batch(np.arange(len(cache)), torch.device("cpu"))
    shift = resampling.rigid_matrices(torch.tensor([[0.0, 7.0, -7.0]]).expand(len(cache), 3), 3)
    aligned, shifted = trainer.sample(trus, None), trainer.sample(trus, shift)
    for b in range(len(cache)):
        keep = (aligned[b] > 0) & (shifted[b] > 0)
        rho_aligned = stats.spearmanr(mr[b][keep].numpy(), aligned[b][keep].numpy()).statistic
        rho_shifted = stats.spearmanr(mr[b][keep].numpy(), shifted[b][keep].numpy()).statistic
        assert rho_aligned > 0.9, rho_aligned
        assert rho_shifted < rho_aligned - 0.2, (rho_aligned, rho_shifted)


# --- perturbations and losses ------------------------------------------------------------------------------


@pytest.mark.parametrize("dof", [3, 6])
def test_perturbation_draws_are_seeded_and_in_range(dof):
    def draw(seed, epoch, step, sub=0):
        return training.draw_perturbations(
            training.step_generator(seed, epoch, step, sub), 500, dof, 25.0, 5.0
        )

    a, b = draw(0, 3, 7), draw(0, 3, 7)
    assert torch.equal(a, b)
    for other in (draw(0, 3, 8), draw(0, 4, 7), draw(1, 3, 7), draw(0, 3, 7, 1)):
        assert not torch.equal(a, other)
    n_rot = 1 if dof == 3 else 3
    assert a.shape == (500, dof)
    assert a[:, :n_rot].abs().max() <= 25.0 and a[:, n_rot:].abs().max() <= 5.0
    assert a[:, :n_rot].abs().max() > 20.0 and a[:, n_rot:].abs().max() > 4.0  # spans the range


def test_draw_batch_is_reproducible_and_its_target_undoes_the_perturbation(tiny_run):
    cache = training.open_cache(next((tiny_run / "cache").glob("train-*")))
    trainer = cpu_trainer()
    b1, b2 = trainer.draw_batch(cache, 2, 1, 0), trainer.draw_batch(cache, 2, 1, 0)
    assert torch.equal(b1.perturb, b2.perturb) and torch.equal(b1.mr, b2.mr)
    assert not torch.equal(b1.perturb, trainer.draw_batch(cache, 2, 1, 1).perturb)
    undo = b1.perturb @ resampling.rigid_matrices(b1.target, 3)
    torch.testing.assert_close(undo, torch.eye(4).expand_as(undo), rtol=0, atol=1e-5)


def test_parameter_distance():
    target = torch.tensor([[10.0, 2.0, -1.0], [-5.0, 0.0, 3.0]])
    assert training.parameter_distance(target, target, 3, 25.0).item() == 0.0
    one_mm = target + torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    assert training.parameter_distance(one_mm, target, 3, 25.0).item() == pytest.approx(1.0)
    two_mm = target + torch.tensor([[0.0, 2.0, 0.0], [0.0, 2.0, 0.0]])
    assert training.parameter_distance(two_mm, target, 3, 25.0).item() == pytest.approx(4.0)
    one_deg = target + torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    arc = math.radians(1.0) * 25.0  # 1° at 25 mm is an arc of 0.436 mm
    assert training.parameter_distance(one_deg, target, 3, 25.0).item() == pytest.approx(arc**2)
    assert training.parameter_distance(one_deg, target, 3, 50.0).item() == pytest.approx((2 * arc) ** 2)
    half = target + torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])  # mean over the batch
    assert training.parameter_distance(half, target, 3, 25.0).item() == pytest.approx(2.0)
    six = torch.zeros(1, 6)
    err = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 3.0]])
    assert training.parameter_distance(err, six, 6, 25.0).item() == pytest.approx(arc**2 + 9.0)


def test_tre_in_frame():
    points = torch.tensor([[[10.0, 0.0, 0.0], [0.0, 5.0, 2.0], [float("nan")] * 3]]).expand(2, 3, 3)
    eye = torch.eye(4).expand(2, 4, 4)
    assert torch.equal(training.tre_in_frame(eye, points), torch.zeros(2))
    shift = torch.eye(4).repeat(2, 1, 1)
    shift[0, :3, 3] = torch.tensor([3.0, 4.0, 0.0])
    shift[1, :3, 3] = torch.tensor([1.0, -2.0, 2.0])
    torch.testing.assert_close(training.tre_in_frame(shift, points), torch.tensor([5.0, 3.0]))
    quarter = resampling.rigid_matrices(torch.tensor([[90.0, 0.0, 0.0]]), 3)
    one = torch.tensor([[[10.0, 0.0, 0.0]]])
    assert training.tre_in_frame(quarter, one).item() == pytest.approx(10.0 * math.sqrt(2.0), rel=1e-6)


@pytest.mark.parametrize(
    "optimizer",
    [{"state": {}, "param_groups": []}, {"param_groups": "x"}, {}],
    ids=["no-groups", "text", "empty"],
)
def test_resume_from_a_crafted_optimiser_state_is_a_model_error(tiny_run, optimizer):
    state = checkpoint.load(tiny_run / "last.pt")
    state["optimizer_g"] = optimizer
    with pytest.raises(ModelError, match=r"last\.pt: the optimiser state or epoch cannot be resumed"):
        cpu_trainer().load_state(state, str(tiny_run / "last.pt"))
