"""``airreg benchmark --scorecard``: the goals' figures side by side, checked against ``airreg evaluate``'s own
figures on the same starts, and the training time read from a model file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from airreg import benchmark, checkpoint, data, evaluation, scorecard
from airreg.registration import Registrar

SEED = 11


@pytest.fixture(scope="module")
def card_report(tiny_dataset, tiny_model):
    return scorecard.run_scorecard(
        tiny_dataset, [tiny_model], SEED, "cpu", quick=True, progress=False, big_megavoxels=1.0
    )


def test_accuracy_and_flag_agree_with_evaluate(card_report, tiny_dataset, tiny_model):
    """The same starts through `airreg evaluate`'s code give the same TREs and the same flag AUROC."""
    card = card_report["models"][0]
    cases = data.load_dataset(tiny_dataset, progress=False)[:3]
    registrar = Registrar.from_checkpoint(tiny_model, "cpu", benchmark.AIRNET_ITERATIONS)
    starts = evaluation.random_starts(cases, registrar.config.dof, SEED)
    rows, _ = evaluation.evaluate_cases(cases, registrar, starts, progress=False)
    summary = evaluation.summarize(rows, registrar.tolerance_mm)
    np.testing.assert_allclose(card["tre_per_case"]["start"], [r["tre_before"] for r in rows], atol=1e-9)
    np.testing.assert_allclose(card["tre_per_case"]["one_pass"], [r["tre_one_pass"] for r in rows], atol=1e-6)
    np.testing.assert_allclose(card["tre_per_case"]["iterative"], [r["tre_after"] for r in rows], atol=1e-6)
    expected = summary["auroc_flag_tre_above_tolerance"]
    assert (math.isnan(card["flag_auroc"]) and math.isnan(expected)) or card["flag_auroc"] == expected
    assert card["worse_than_start"] == sum(r["tre_after"] > r["tre_before"] for r in rows)


def test_every_goal_has_its_figure_and_verdict(card_report):
    card = card_report["models"][0]
    keys = [g["key"] for g in card["goals"]]
    assert keys == [g.key for g in scorecard.GOALS[card["dof"]]]
    figures = {
        "tre_iterative_mean": card["tre"]["iterative"]["mean"],
        "latency_ms": card["latency"]["total_ms"],
        "latency_big_ms": card["latency_big"]["total_ms"],
        "speedup_vs_mi": card["median_seconds"]["mi"] / card["median_seconds"]["one_pass"],
        "pipeline_minutes": card["pipeline_minutes"]["total"],
    }
    for goal in card["goals"]:
        if goal["key"] in figures:
            assert goal["value"] == pytest.approx(figures[goal["key"]])
        if goal["value"] is not None and np.isfinite(goal["value"]):
            bound = next(g for g in scorecard.GOALS[card["dof"]] if g.key == goal["key"])
            assert goal["met"] == (
                goal["value"] <= bound.bound if bound.lower_is_better else goal["value"] >= bound.bound
            )
    assert card["latency"]["cpu_ms"] > 0 and card["latency_big"]["total_ms"] > 0


def test_large_input_rows_use_the_asked_size(card_report):
    big = card_report["big_trus"]
    assert big["megavoxels"] == pytest.approx(1.0, rel=0.15)
    assert big["pairs"] == 2


def test_pipeline_minutes_read_from_the_model_file(tiny_model):
    state = checkpoint.load(tiny_model)
    minutes = scorecard.pipeline_minutes(state)
    assert minutes["train"] == pytest.approx(sum(h["seconds"] for h in state["history"]) / 60)
    state["metadata"] = {
        "critic_refinement": {"seconds": 120.0},
        "patient_check": {"seconds": 60.0},
        "refiner": {"seconds": 30.0},
    }
    minutes = scorecard.pipeline_minutes(state)
    assert (minutes["critic_refinement"], minutes["patient_check"], minutes["refiner"]) == (2.0, 1.0, 0.5)
    assert minutes["total"] == pytest.approx(minutes["train"] + 3.5)
    state["history"][0].pop("seconds")
    assert scorecard.pipeline_minutes(state) is None


def test_goal_direction_and_undefined_values():
    auroc = next(g for g in scorecard.GOALS[6] if g.key == "flag_auroc")
    latency = next(g for g in scorecard.GOALS[6] if g.key == "latency_ms")
    share = next(g for g in scorecard.GOALS[6] if g.key == "tre_iterative_under_2mm")
    assert auroc.met(0.96) and not auroc.met(0.94)
    assert latency.met(80.0) and not latency.met(80.5)
    assert auroc.met(float("nan")) is None and latency.met(None) is None
    assert share.text() == "≥ 60%" and latency.text() == "≤ 80 ms"
    assert "tre_iterative_under_2mm" not in [g.key for g in scorecard.GOALS[3]]


def test_files_and_markdown(card_report, tmp_path):
    text = scorecard.write_scorecard(card_report, tmp_path, "airreg benchmark --scorecard")
    rows = [line for line in text.splitlines() if line.startswith("| model.pt")]
    assert len(rows) == len(scorecard.GOALS[card_report["models"][0]["dof"]])
    assert (tmp_path / "tre_boxplots.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["command"] == "airreg benchmark --scorecard" and saved["models"][0]["cases"] == 3


def test_cli_refuses_options_the_scorecard_sets_itself(tiny_dataset, tmp_path, capsys):
    from airreg.cli import main

    args = [
        "benchmark",
        "--scorecard",
        "--latency-only",
        "--data",
        str(tiny_dataset),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--latency-only" in lines[0] and "--scorecard" in lines[0]
    assert not (tmp_path / "o").exists()


def test_cli_command_line_of_a_scorecard():
    from airreg.cli import build_parser

    args = build_parser().parse_args(["benchmark", "--data", "d", "--out", "o", "--scorecard"])
    assert benchmark.command_line(args) == "airreg benchmark --data d --out o --seed 4242 --scorecard"
