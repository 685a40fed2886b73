"""The patient check: its training pairs, threshold, training command, and its verdict at registration."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from airreg import checkpoint, distributed, patient_check_training, training
from airreg.cli import main
from airreg.errors import InputError, ModelError
from airreg.evaluation import evaluate
from airreg.quality import PatientCheckCalibration, same_patient_score
from airreg.registration import Registrar


@pytest.fixture(scope="module")
def two_val_model(tiny_model, tmp_path_factory):
    """The tiny model with a split of 2 validation cases (of 6): the check needs another patient to compare."""
    state = checkpoint.load(tiny_model)
    state["train_config"] = {**state["train_config"], "val_fraction": 1 / 3}
    return checkpoint.save(
        tmp_path_factory.mktemp("two-val") / "model.pt", checkpoint.export_for_inference(state)
    )


@pytest.fixture(scope="module")
def checked_model(tiny_dataset, two_val_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("patient-check") / "checked.pt"
    patient_check_training.train_patient_check(
        two_val_model, tiny_dataset, out, steps=4, batch_size=4, check_every=2, device="cpu", progress=False
    )
    return out


def test_pairs_are_own_and_another_cases_registration_without_repeated_cases(tiny_model, tiny_run):
    state = checkpoint.load(tiny_model)
    trainer = training.trainer_from_state(state, distributed.DistContext(0, 1, torch.device("cpu")))
    cache = training.open_cache(next((tiny_run / "cache").glob("train-*")))
    b = trainer.draw_batch(cache, 1, 0, 0)
    b = replace(b, case=torch.tensor([0, 0, 1, 2])[: len(b.case)])  # items 0 and 1 are the same case
    mr, trus, labels = patient_check_training.check_pairs(trainer, b)
    n = len(b.case)
    assert labels.tolist() == [1.0] * n + [0.0] * (n - 1)  # item 1's "other" TRUS is its own case: left out
    assert mr.shape[0] == trus.shape[0] == 2 * n - 1
    assert torch.equal(mr[n:], b.mr[[0, *range(2, n)]])
    own = b.perturb @ trainer.estimate(b.mr, b.trus, b.perturb, trainer.g)
    assert torch.allclose(trus[:n], trainer.sample(b.trus, own), atol=1e-5)


def test_threshold_flags_the_chosen_share_of_same_patient_pairs():
    same = np.arange(101.0)  # 0, 1, ..., 100
    other = np.array([-10.0, 2.5, 4.5, 50.0])
    fitted = PatientCheckCalibration.fit(same, other, false_alarm=0.05)
    assert fitted.threshold == pytest.approx(5.0)
    assert fitted.false_alarm_rate == pytest.approx(5 / 101)
    assert fitted.detection_rate == pytest.approx(3 / 4)
    assert fitted.auroc == pytest.approx((101 + 98 + 96 + 50.5) / 404)  # the tie at 50 counts half
    assert (fitted.same_pairs, fitted.other_pairs) == (101, 4)
    assert fitted.flags(4.0) and not fitted.flags(6.0)
    assert PatientCheckCalibration.from_dict(fitted.to_dict()) == fitted
    assert fitted.threshold_score == pytest.approx(same_patient_score(5.0)) and same_patient_score(0.0) == 0.5
    with pytest.raises(ModelError, match="patient-check calibration"):
        PatientCheckCalibration.from_dict({"threshold": 0.5})


def test_training_adds_a_calibrated_check_and_changes_nothing_else(checked_model, two_val_model):
    before, after = checkpoint.load(two_val_model), checkpoint.load(checked_model)
    for key in ("generator", "discriminator"):
        for name, value in before[key].items():
            assert torch.equal(value, after[key][name]), (key, name)
    assert after["calibration"] == before["calibration"]
    calibration = PatientCheckCalibration.from_dict(after["patient_check_calibration"])
    assert 0.0 <= calibration.detection_rate <= 1.0 and 0.0 <= calibration.auroc <= 1.0
    assert calibration.false_alarm_rate <= 0.25 and calibration.same_pairs > 0 and calibration.other_pairs > 0
    info = after["metadata"]["patient_check"]
    assert (
        info["steps"] == 4 and info["false_alarm"] == 0.05 and info["from_model_sha256"] == before["sha256"]
    )
    rows = list(csv.DictReader((checked_model.parent / "checked-patient-check-log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert [r["val_auroc"] != "" for r in rows] == [False, True, False, True]
    assert (checked_model.parent / "checked-patient-check-curves.png").read_bytes()[:4] == b"\x89PNG"


def with_threshold(path, threshold: float) -> dict:
    state = checkpoint.load(path)
    state["patient_check_calibration"] = {**state["patient_check_calibration"], "threshold": threshold}
    return state


def test_registration_warns_when_the_check_flags(checked_model, tiny_case):
    never, always = (Registrar(with_threshold(checked_model, t), "cpu") for t in (-np.inf, np.inf))
    ok = never.register(tiny_case.mr, tiny_case.trus)
    flagged = always.register(tiny_case.mr, tiny_case.trus)
    np.testing.assert_array_equal(ok.mr_to_trus, flagged.mr_to_trus)  # the check judges, never moves
    assert ok.after.same_patient_score == pytest.approx(flagged.after.same_patient_score)
    assert 0.0 <= ok.after.same_patient_score <= 1.0 and ok.before.same_patient_score is None
    assert "another patient" not in (ok.warning or "")
    assert flagged.quality == "warning"
    assert (
        "another patient" in flagged.warning or flagged.after.p_failure >= 0.5
    )  # poor alignment: named first
    assert flagged.report()["same_patient_score"] == flagged.after.same_patient_score
    verdict = always.score(tiny_case.mr, tiny_case.trus, tiny_case.gt)
    assert verdict.quality == "warning" and verdict.same_patient_score is not None


def test_a_model_without_check_reports_none(tiny_model, tiny_case):
    result = Registrar.from_checkpoint(tiny_model, "cpu").register(tiny_case.mr, tiny_case.trus)
    assert result.after.same_patient_score is None and result.report()["same_patient_score"] is None


def test_a_check_without_calibration_or_with_wrong_weights_is_refused(checked_model):
    state = checkpoint.load(checked_model)
    del state["patient_check_calibration"]
    with pytest.raises(ModelError, match="patient check has no calibration"):
        Registrar(state, "cpu")
    state = checkpoint.load(checked_model)
    state["patient_check"] = {"nonsense": torch.zeros(1)}
    with pytest.raises(ModelError, match="patient-check weights do not match"):
        Registrar(state, "cpu")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--steps", "0", "at least 1 step"), ("--false-alarm", "0.7", "false-alarm rate")],
)
def test_cli_refuses_bad_settings_and_writes_nothing(
    tiny_dataset, tiny_model, tmp_path, capsys, option, value, message
):
    out = tmp_path / "m.pt"
    args = ["train-patient-check", "--model", str(tiny_model), "--data", str(tiny_dataset), "--out", str(out)]
    assert main([*args, option, value, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("airreg train-patient-check: error:") and message in err and "\n" not in err
    assert not out.exists()


def test_cli_trains_the_check(tiny_dataset, two_val_model, tmp_path, capsys):
    out = tmp_path / "cli.pt"
    args = [
        "train-patient-check",
        "--model",
        str(two_val_model),
        "--data",
        str(tiny_dataset),
        "--out",
        str(out),
    ]
    assert main([*args, "--steps", "2", "--batch-size", "4", "--false-alarm", "0.1", "--device", "cpu"]) == 0
    assert "patient check written" in capsys.readouterr().out
    assert checkpoint.load(out)["metadata"]["patient_check"]["false_alarm"] == 0.1
    with pytest.raises(InputError, match="false-alarm"):
        patient_check_training.train_patient_check(two_val_model, tiny_dataset, out, steps=1, false_alarm=0.0)


def test_evaluation_reports_the_checks_false_alarms_and_catches(checked_model, tiny_dataset, tmp_path):
    state = checkpoint.export_for_inference(with_threshold(checked_model, np.inf))  # flags everything
    model = checkpoint.save(tmp_path / "always.pt", state)
    summary = evaluate(
        tiny_dataset, tmp_path / "eval", model, iterations=1, overlays=0, device="cpu", progress=False
    )
    assert summary["patient_check_false_alarms"] == 1.0
    assert summary["gross_failures"]["other_patient"]["patient_check"] == 6
    assert "patient check: another patient flagged on 100% of the registrations" in summary["markdown"]
    with (tmp_path / "eval" / "cases.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(
        0.0 <= float(r["same_patient_after"]) <= 1.0 and r["patient_flag_after"] == "True" for r in rows
    )


def test_cli_register_and_score_print_the_same_patient_score(checked_model, tiny_dataset, tmp_path, capsys):
    case = tiny_dataset / "case000"
    model = ["--model", str(checked_model)]
    pair = ["--mr", str(case / "mr.nii.gz"), "--trus", str(case / "trus.nii.gz"), *model]
    report = tmp_path / "report.json"
    args = ["register", *pair, "--out-transform", str(tmp_path / "t.tfm"), "--report", str(report)]
    assert main([*args, "--device", "cpu"]) == 0
    score = json.loads(report.read_text())["same_patient_score"]
    assert f"same-patient score {score:.2f}; quality:" in capsys.readouterr().out
    assert main(["score", *pair, "--transform", str(tmp_path / "t.tfm"), "--device", "cpu"]) == 0
    assert "same-patient score" in capsys.readouterr().out
