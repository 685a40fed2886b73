"""A cascade (``airreg add-refiner``): G's first pass, then a refiner with its own grid, estimates composed in
the first pass's frame; the model file's schema and the command's checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from airreg import checkpoint, geometry, resampling
from airreg.cli import main
from airreg.config import ModelConfig
from airreg.errors import ModelError
from airreg.registration import Registrar

REFINER_GRID = resampling.GridSpec((8, 24, 24), (4.5, 3.5, 3.5))  # unlike the tiny preset's (6, 24, 24) grid


def _tiny_refiner(data: Path, out: Path, dof: int = 3) -> Path:
    """A refiner trained through the command line: the tiny preset on another grid, on small starts."""
    argv = ["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--dof", str(dof)]
    argv += ["--grid-size", *map(str, REFINER_GRID.size), "--grid-spacing", *map(str, REFINER_GRID.spacing)]
    argv += ["--rotation-deg", "10", "--translation-mm", "4", "--epochs", "1", "--batch-size", "2"]
    assert main([*argv, "--steps-per-epoch", "1", "--device", "cpu"]) == 0
    return out / "model.pt"


@pytest.fixture(scope="module")
def cascade(tiny_dataset, tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cascade")
    stage = _tiny_refiner(tiny_dataset, root / "refiner")
    out = root / "cascade.pt"
    assert main(["add-refiner", "--model", str(tiny_model), "--refiner", str(stage), "--out", str(out)]) == 0
    return out


def test_the_file_keeps_the_model_and_records_the_refiner(cascade, tiny_model):
    base, state = checkpoint.load(tiny_model), checkpoint.load(cascade)
    stage = checkpoint.load(cascade.parent / "refiner" / "model.pt")
    for net in ("generator", "discriminator"):
        assert all(torch.equal(state[net][k], v) for k, v in base[net].items())
    assert state["calibration"] == base["calibration"]
    assert ModelConfig.from_dict(state["refiner"]["model_config"]).grid == REFINER_GRID
    assert all(torch.equal(state["refiner"]["generator"][k], v) for k, v in stage["generator"].items())
    meta = state["metadata"]["refiner"]
    assert (meta["rotation_deg"], meta["translation_mm"]) == (10.0, 4.0)
    assert meta["from_model_sha256"] == stage["sha256"]
    assert meta["seconds"] == pytest.approx(sum(h["seconds"] for h in stage["history"]))


def test_one_pass_is_the_base_models(cascade, tiny_model, tiny_case):
    plain = Registrar.from_checkpoint(tiny_model, "cpu").register(tiny_case.mr, tiny_case.trus, iterations=1)
    cas = Registrar.from_checkpoint(cascade, "cpu").register(tiny_case.mr, tiny_case.trus, iterations=1)
    np.testing.assert_array_equal(cas.mr_to_trus, plain.mr_to_trus)


def _constant(net: torch.nn.Module, params) -> None:
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.as_tensor(params, dtype=torch.float32) / net.scale)


def test_refiner_passes_compose_in_the_first_pass_frame(cascade, tiny_case):
    """G moves by P1, the refiner (on its own grid, resampled around G's result) by P2: the result is the
    start followed by P1 then P2 in the MR grid frame, and the refiner's resampling is timed as resampling."""
    reg = Registrar.from_checkpoint(cascade, "cpu", iterations=2)
    reg.flag_note, reg.input_check = None, None  # let D choose among passes
    p1, p2 = [4.0, 1.5, -1.0], [-2.0, 0.5, 0.8]
    _constant(reg.g, p1)
    _constant(reg.refiner, p2)
    critic = reg._critic
    reg._critic = lambda pair, t: (np.arange(len(t), dtype=float), *critic(pair, t)[1:])  # the last pass wins
    start = tiny_case.gt
    result = reg.register(tiny_case.mr, tiny_case.trus, start)
    m1, m2 = (resampling.rigid_matrices(torch.tensor([p]), 3)[0].double().numpy() for p in (p1, p2))
    expected = start @ geometry.to_world(m1 @ m2, resampling.mr_frame(tiny_case.mr))
    np.testing.assert_allclose(result.mr_to_trus, expected, atol=1e-4)
    assert result.selected_step == 2 and len(result.steps) == 2
    assert result.timings["total"] == pytest.approx(
        sum(result.timings[k] for k in ("resampling", "generator", "discriminator")), rel=1e-6
    )


def test_add_refiner_refuses_another_dof(tiny_dataset, tiny_model, tmp_path, capsys):
    stage = _tiny_refiner(tiny_dataset, tmp_path / "six", dof=6)
    capsys.readouterr()  # the training's progress
    argv = [
        "add-refiner",
        "--model",
        str(tiny_model),
        "--refiner",
        str(stage),
        "--out",
        str(tmp_path / "c.pt"),
    ]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "6 DOF" in err[0] and str(stage) in err[0]
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda r: r["generator"].pop(next(iter(r["generator"]))), "refiner.generator weights"),
        (lambda r: r["model_config"].update(dof=6), "refiner.model_config.dof"),
        (lambda r: r.pop("generator"), "refiner lacks generator"),
    ],
)
def test_schema_checks_the_refiner(cascade, tmp_path, damage, words):
    state = checkpoint.load(cascade)
    damage(state["refiner"])
    bad = checkpoint.save(tmp_path / "bad.pt", checkpoint.export_for_inference(state))
    with pytest.raises(ModelError, match=words):
        checkpoint.load(bad)


def test_a_first_pass_that_leaves_the_refiners_grid_keeps_that_pass(cascade, tiny_case):
    """Resampling for the refiner finds no TRUS (G moved it out of view): the registration keeps G's pass."""
    from airreg.errors import InputError

    reg = Registrar.from_checkpoint(cascade, "cpu", iterations=3)
    reg.flag_note, reg.input_check = None, None

    def no_overlap(*args):
        raise InputError("the TRUS volume does not overlap the MR field of view under the start transform")

    reg._refiner_stage = no_overlap
    result = reg.register(tiny_case.mr, tiny_case.trus)
    one = Registrar.from_checkpoint(cascade, "cpu").register(tiny_case.mr, tiny_case.trus, iterations=1)
    assert len(result.steps) == 1 and result.selected_step == 1
    np.testing.assert_allclose(result.mr_to_trus, one.mr_to_trus, atol=1e-9)
