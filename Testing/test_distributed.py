"""``airreg train`` under ``torchrun`` with 2 CPU processes (Gloo) against a single-process run.

The global batch is drawn from a generator seeded by (seed, epoch, step) and sharded by rank, each rank's loss is
a mean over its shard and DDP averages gradients, so 2 processes must reproduce the single-process parameters
(up to float summation order). ``d_fakes="estimates"`` keeps the critic's fake batch independent of the per-rank
batch size. One 2-process run goes through a small wrapper that records which rank builds the cache and writes
files; the resume run goes through ``python -m airreg.cli`` itself.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from airreg import checkpoint, distributed, training
from airreg.config import TrainConfig, preset
from airreg.errors import InputError
from airreg.registration import Registrar
from airreg.training import train

pytestmark = pytest.mark.slow  # ~40 s on 2 idle cores: two torchrun launches, one spawn

WORLD = 2
RUN_KW = dict(batch_size=4, steps_per_epoch=2, d_fakes="estimates", seed=0)
CLI_ARGS = ["--preset", "tiny", "--batch-size", "4", "--steps-per-epoch", "2", "--d-fakes", "estimates"]
ATOL = 1e-5
D_MAX_DIFF = 1e-4  # a tenth of one RMSprop step (about 10 * lr_d)
TIMEOUT_S = 240

# Wraps ``airreg.cli.main`` and appends "<what> <rank>" to $AIRREG_SPY for every cache build and file write.
SPY = textwrap.dedent(
    """
    import os, sys
    from airreg import checkpoint, cli, training

    def spy(what, fn):
        def wrapped(*args, **kwargs):
            with open(os.environ["AIRREG_SPY"], "a") as fh:
                fh.write(f"{what} {os.environ.get('RANK', '0')}\\n")
            return fn(*args, **kwargs)
        return wrapped

    training.build_cache = spy("build_cache", training.build_cache)
    training.write_logs = spy("write_logs", training.write_logs)
    checkpoint.save = spy("save", checkpoint.save)
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    target: list[str], args: list[str], env_extra: dict | None = None
) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=2 <target> <args>`` on 127.0.0.1, CPU, one thread each."""
    port = free_port()
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "PYTHONIOENCODING": "utf-8",  # tqdm's bars are not ASCII; CI may run with the C locale
        **(env_extra or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        *target,
        "train",
        *args,
    ]
    proc = subprocess.run(
        cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def weights(state: dict) -> dict[str, torch.Tensor]:
    return {
        **{f"g.{k}": v for k, v in state["generator"].items()},
        **{f"d.{k}": v for k, v in state["discriminator"].items()},
    }


def assert_close_weights(a: dict, b: dict, what: str) -> None:
    """G within ATOL. D within D_MAX_DIFF and on average within ATOL / 10: the critic's loss is ~1e-9 at
    clipped weights, so a few of its gradient entries are at float-rounding level, and RMSprop turns their sign
    into a step of about 10 * lr_d; the summation order (world size, threads) decides such entries."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    d_diffs = []
    for name in wa:
        diff = (wa[name] - wb[name]).abs()
        if name.startswith("g."):
            assert diff.max().item() <= ATOL, f"{what}: {name} differs by {diff.max().item():.2e}"
        else:
            assert diff.max().item() <= D_MAX_DIFF, f"{what}: {name} differs by {diff.max().item():.2e}"
            d_diffs.append(diff.flatten())
    assert torch.cat(d_diffs).mean().item() <= ATOL / 10, what


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory) -> dict:
    """Single-process reference (1 epoch, then resumed to 2) and the same under torchrun with 2 processes."""
    ref = tmp_path_factory.mktemp("ddp-ref")
    threads = torch.get_num_threads()
    try:
        train(
            tiny_dataset, ref, preset("tiny"), TrainConfig(epochs=1, **RUN_KW), device="cpu", progress=False
        )
        ref_epoch1 = checkpoint.load(ref / "last.pt")
        train(
            tiny_dataset,
            ref,
            preset("tiny"),
            TrainConfig(epochs=2, **RUN_KW),
            resume=ref / "last.pt",
            device="cpu",
            progress=False,
        )
        ref_epoch2 = checkpoint.load(ref / "last.pt")
    finally:
        torch.set_num_threads(threads)

    out = tmp_path_factory.mktemp("ddp-run")
    spy_script, spy_log = out.parent / f"{out.name}-spy.py", out.parent / f"{out.name}-spy.log"
    spy_script.write_text(SPY)
    common = ["--data", str(tiny_dataset), "--out", str(out), *CLI_ARGS, "--device", "cpu"]
    first = torchrun([str(spy_script)], [*common, "--epochs", "1"], {"AIRREG_SPY": str(spy_log)})
    ddp_epoch1 = checkpoint.load(out / "last.pt")
    cache_files = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*")}
    resumed = torchrun(["-m", "airreg.cli"], [*common, "--epochs", "2", "--resume", str(out / "last.pt")])
    return {
        "ref_epoch1": ref_epoch1,
        "ref_epoch2": ref_epoch2,
        "ddp_epoch1": ddp_epoch1,
        "ddp_epoch2": checkpoint.load(out / "last.pt"),
        "out": out,
        "spy": spy_log.read_text().split(),
        "cache_files": cache_files,
        "logs": first.stdout + first.stderr + resumed.stdout + resumed.stderr,
    }


def step_gradients(
    ctx: distributed.DistContext, cache_folder: Path, constraint: str
) -> list[dict[str, torch.Tensor]]:
    """D's gradients of a critic update and G's of a generator update, both from the seeded initial weights."""
    cfg = TrainConfig(epochs=1, critic_constraint=constraint, **RUN_KW)
    trainer = training.Trainer(preset("tiny"), cfg, ctx)
    cache = training.open_cache(cache_folder)
    grads = []
    for sub, step, net in ((0, trainer.critic_step, trainer.d), (2, trainer.generator_step, trainer.g)):
        step(trainer.draw_batch(cache, 1, 0, sub))
        grads.append({k: p.grad.detach().clone() for k, p in net.named_parameters()})
    return grads


def _grad_worker(rank: int, port: int, cache_folder: Path, constraint: str, result: Path) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    ctx = distributed.init("cpu")
    try:
        grads = step_gradients(ctx, cache_folder, constraint)
        if rank == 0:
            torch.save(grads, result)
    finally:
        distributed.shutdown(ctx)


@pytest.mark.parametrize("constraint", ["clip", "gp"])
def test_ddp_gradients_are_the_global_mean(runs, tmp_path, constraint):
    """DDP's averaged gradients equal the single-process gradients of the whole global batch.

    Adam and RMSprop are invariant to the gradient scale, so a sum instead of a mean across ranks would not show
    in the parameters; it does in the gradients. With the gradient penalty the critic's loss holds a gradient
    itself (double backward through DDP).
    """
    cache_folder = next((runs["out"] / "cache").glob("train-*"))
    args = (free_port(), cache_folder, constraint, tmp_path / "grads.pt")
    mp.spawn(_grad_worker, args=args, nprocs=WORLD, join=True)
    ddp = torch.load(tmp_path / "grads.pt")
    ref = step_gradients(distributed.DistContext(0, 1, torch.device("cpu")), cache_folder, constraint)
    for what, a, b in zip(("critic", "generator"), ref, ddp, strict=True):
        assert a.keys() == b.keys()
        scale = torch.cat([g.flatten() for g in a.values()]).norm().item()
        err = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm().item()
        assert scale > 0, what
        assert err <= 1e-4 * scale, f"{what}: |ddp - single| = {err:.2e}, |single| = {scale:.2e}"


def test_two_processes_match_single_process(runs):
    assert runs["ddp_epoch1"]["epoch"] == 1
    assert_close_weights(runs["ref_epoch1"], runs["ddp_epoch1"], "epoch 1")
    # the logged losses are means over the global batch, reduced across ranks
    ref, ddp = runs["ref_epoch1"]["history"][0], runs["ddp_epoch1"]["history"][0]
    for key in ("loss_d", "loss_g", "loss_param", "train_tre", "val_tre_before", "val_tre_after"):
        assert ddp[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key


def test_resume_under_two_processes(runs):
    last = runs["ddp_epoch2"]
    assert last["epoch"] == 2
    assert [row["epoch"] for row in last["history"]] == [1, 2]
    assert_close_weights(runs["ref_epoch2"], last, "resumed epoch 2")


def test_checkpoint_and_model_load(runs):
    out = runs["out"]
    model = checkpoint.load(out / "model.pt")
    assert "optimizer_g" not in model and model["calibration"] is not None
    registrar = Registrar.from_checkpoint(out / "model.pt", device="cpu")
    assert registrar.config == preset("tiny")
    # exactly the files of one run, no temporary leftovers from concurrent writers
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert names == ["best.pt", "last.pt", "log.csv", "loss_curves.png", "model.pt"]
    with (out / "log.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0.0 <= float(r["data_wait_fraction"]) < 1.0 for r in rows)


def test_only_rank_zero_builds_cache_and_writes(runs):
    spy = runs["spy"]
    events = list(zip(spy[::2], spy[1::2], strict=True))
    assert {rank for _, rank in events} == {"0"}, events
    assert sum(what == "build_cache" for what, _ in events) == 2  # train and validation caches, once each
    assert sum(what == "write_logs" for what, _ in events) == 1
    assert sum(what == "save" for what, _ in events) == 3  # last.pt, best.pt, model.pt
    # the resumed run reused the cache: same files, not rewritten
    cache = runs["out"] / "cache"
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == runs["cache_files"]
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["train", "val"]
    assert runs["logs"].count("model written to") >= 1


@pytest.mark.parametrize("name", ["bogus", "gpu", "", "cpu:0", "cuda:x", "cuda:-1"])
def test_an_unknown_device_is_a_clear_input_error(name):
    with pytest.raises(InputError, match="expected auto, cpu, cuda or cuda:N"):
        distributed.select_device(name)
    for good in ("auto", "cpu", "cuda", "cuda:1"):
        assert distributed.check_device_name(good) == good
