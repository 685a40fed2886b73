"""The input check: its statistic on the training family and on unlike images, its section in the model file,
its verdict in the registration report and the CLI, and its fitting command."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from airreg import checkpoint, input_check, ood_calibration
from airreg.cli import main
from airreg.errors import InputError, ModelError
from airreg.evaluation import evaluate
from airreg.quality import Calibration, assess
from airreg.registration import Registrar
from conftest import make_case, write_synthetic_case

REFERENCE_CASES = 10


def inverted(image: sitk.Image) -> sitk.Image:
    """The same image with its intensities inverted (a contrast never seen in training)."""
    array = sitk.GetArrayFromImage(image)
    out = sitk.GetImageFromArray((array.max() - array).astype(np.float32))
    out.CopyInformation(image)
    return out


def noise_like(image: sitk.Image, seed: int = 0, keep: float = 0.0) -> sitk.Image:
    """Uniform noise on the image's grid, plus ``keep`` times the image."""
    array = sitk.GetArrayFromImage(image)
    noise = np.random.default_rng(seed).uniform(1.0, 100.0, array.shape)
    out = sitk.GetImageFromArray((keep * array + noise).astype(np.float32))
    out.CopyInformation(image)
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Ten cases of the test family (smoothed blobs, conftest) as case folders: the reference."""
    root = tmp_path_factory.mktemp("family")
    for i in range(REFERENCE_CASES):
        write_synthetic_case(root / f"case{i:03d}", make_case(300 + i))
    return root


@pytest.fixture(scope="module")
def unlike(tmp_path_factory):
    """Three cases unlike the family: noise added to the MR, the TRUS inverted, and noise for both. (An
    inverted MR is not among them: the family's MR histogram is nearly symmetric.)"""
    root = tmp_path_factory.mktemp("unlike")
    for i, kind in enumerate(("mr-noisy", "trus-inverted", "noise")):
        case = make_case(400 + i)
        if kind == "mr-noisy":
            case = replace(case, mr=noise_like(case.mr, i, keep=1.0))
        elif kind == "trus-inverted":
            case = replace(case, trus=inverted(case.trus))
        else:
            case = replace(case, mr=noise_like(case.mr, i), trus=noise_like(case.trus, i + 10))
        write_synthetic_case(root / kind, case)
    return root


@pytest.fixture(scope="module")
def checked(tiny_model, family, unlike, tmp_path_factory):
    """The tiny model with an input check fitted on the family; the fit's summary."""
    out = tmp_path_factory.mktemp("ood") / "checked.pt"
    return ood_calibration.calibrate_ood(tiny_model, family, out, unlike, device="cpu", progress=False)


def test_statistic_is_low_on_the_family_and_high_on_unlike_images(checked, tiny_model, unlike):
    check = checked.check
    assert check.reference_cases == REFERENCE_CASES and check.pass_rate >= 0.9
    assert (checked.reference_statistics <= check.threshold).sum() >= 9  # leave-one-out, unseen cases
    assert check.held_out_cases == 3 and check.held_out_flagged == 3
    assert checked.held_out_statistics.min() > check.threshold
    registrar = Registrar.from_checkpoint(checked.path, "cpu")
    new_case = make_case(500)  # of the family, used neither for the reference nor for the threshold
    assert not registrar.inspect(new_case.mr, new_case.trus, new_case.gt)[2].out_of_distribution


def test_out_of_distribution_is_never_ok_and_reported(checked, unlike):
    registrar = Registrar.from_checkpoint(checked.path, "cpu")
    case = make_case(401)
    result = registrar.register(case.mr, inverted(case.trus), case.gt, iterations=1)
    assert result.after.out_of_distribution and result.quality == "warning"
    assert result.warning.startswith("these images are unlike the model's training data (statistic ")
    entry = result.report()["input_check"]
    assert entry["available"] and entry["verdict"] == "out of distribution"
    assert entry["statistic"] > entry["threshold"] == checked.check.threshold
    assert f"threshold {entry['threshold']:.2f}" in result.warning
    good = registrar.register(case.mr, case.trus, case.gt, iterations=1).report()["input_check"]
    assert good["verdict"] == "in distribution" and good["statistic"] <= good["threshold"]


def test_images_unlike_the_training_data_get_one_generator_pass(checked):
    registrar = Registrar.from_checkpoint(checked.path, "cpu", iterations=3)
    registrar.flag_note = None  # as if refined: only the input check stops the iterations
    case = make_case(401)
    unlike = registrar.register(case.mr, inverted(case.trus), case.gt)
    assert unlike.after.out_of_distribution
    assert len(unlike.steps) == 1 and unlike.selected_step == 1
    assert "images are unlike the model's training data" in unlike.report()["single_pass_reason"]
    assert registrar.register(case.mr, case.trus, case.gt).single_pass_reason is None


def test_assess_puts_the_input_check_before_the_critic():
    calibration = Calibration((-2.0, -1.0, 1.0, 2.0), (9.0, 7.0, 1.0, 0.5))
    above, below = input_check.InputVerdict(5.0, 3.0), input_check.InputVerdict(1.0, 3.0)
    assert assess(2.0, calibration, input_check=below).quality == "ok"
    flagged = assess(2.0, calibration, input_check=above)  # a critic that says "well aligned"
    assert flagged.quality == "warning" and "statistic 5.00 > threshold 3.00" in flagged.warning
    assert flagged.out_of_distribution and flagged.input_check == above
    assert not assess(2.0, calibration).out_of_distribution


def test_a_model_without_the_section_reports_the_check_unavailable(tiny_model, tiny_case):
    assert "input_check" not in checkpoint.load(tiny_model)
    result = Registrar.from_checkpoint(tiny_model, "cpu").register(tiny_case.mr, tiny_case.trus)
    entry = result.report()["input_check"]
    assert entry["available"] is False and entry["verdict"] == "unavailable"
    assert result.after.input_check is None and not result.after.out_of_distribution


def test_the_section_round_trips_and_loads_weights_only(checked, tmp_path):
    raw = torch.load(checked.path, weights_only=True)
    assert raw["input_check"] == checked.check.to_dict()
    assert input_check.load(checkpoint.load(checked.path)) == checked.check
    again = checkpoint.save(
        tmp_path / "again.pt", checkpoint.export_for_inference(checkpoint.load(checked.path))
    )
    assert input_check.load(checkpoint.load(again)) == checked.check
    meta = checkpoint.load(checked.path)["metadata"]["input_check"]
    assert meta["from_model_sha256"] and meta["held_out"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update(features="other-v9"), "uses features 'other-v9'"),
        (lambda s: s.update(mean=s["mean"][:3]), "does not have 23 features"),
        (lambda s: s.pop("threshold"), "incomplete or invalid"),
        (lambda s: s.update(threshold=float("nan")), "non-finite"),
    ],
)
def test_a_bad_section_is_refused(checked, change, message):
    state = checkpoint.load(checked.path)
    change(state["input_check"])
    with pytest.raises(ModelError, match=message):
        Registrar(state, "cpu")


def test_features_are_23_finite_statistics_of_the_stacks():
    mr, trus = torch.rand(16, 48, 48), torch.rand(16, 70, 70)
    trus[:, :10] = 0  # outside the fan
    values = input_check.features(mr, trus)
    assert values.shape == (23,) and np.isfinite(values).all()
    assert values[2:10].sum() == pytest.approx(1.0) and values[13:21].sum() == pytest.approx(1.0)
    assert values[-1] == pytest.approx(60 / 70)


def test_fit_sets_the_threshold_at_the_pass_rate_and_refuses_too_few_cases():
    x = np.random.default_rng(0).normal(size=(40, 23)) * 0.05
    check, oof, _ = ood_calibration.fit_check(x, 0.9)
    assert (oof <= check.threshold).mean() == pytest.approx(check.pass_rate) and check.pass_rate >= 0.9
    assert (oof > check.threshold).sum() >= 1
    with pytest.raises(InputError, match="at least 8 reference cases"):
        ood_calibration.fit_check(x[:5], 0.95)
    with pytest.raises(InputError, match="pass rate"):
        ood_calibration.fit_check(x, 1.0)


def test_cli_fits_the_check_and_register_prints_it(tiny_model, family, unlike, tmp_path, capsys):
    out = tmp_path / "m.pt"
    args = ["calibrate-ood", "--model", str(tiny_model), "--data", str(family), "--out", str(out)]
    assert main([*args, "--held-out", str(unlike), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "held-out cases flagged: 3 of 3" in printed and "input check written" in printed
    case = unlike / "noise"
    pair = ["--mr", str(case / "mr.nii.gz"), "--trus", str(case / "trus.nii.gz"), "--model", str(out)]
    report = tmp_path / "r.json"
    register = ["register", *pair, "--out-transform", str(tmp_path / "t.tfm"), "--report", str(report)]
    assert main([*register, "--iterations", "1", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "quality: warning" in printed and "input check: statistic" in printed
    assert "out of distribution" in printed and "WARNING: these images are unlike" in printed
    assert json.loads(report.read_text())["input_check"]["verdict"] == "out of distribution"
    assert "note:" not in printed  # one pass was asked for
    again = ["register", *pair, "--out-transform", str(tmp_path / "t3.tfm"), "--iterations", "3"]
    assert main([*again, "--device", "cpu"]) == 0
    assert "note: one generator pass: the model's flag is not calibrated" in capsys.readouterr().out


def test_cli_refuses_a_bad_pass_rate_and_writes_nothing(tiny_model, family, tmp_path, capsys):
    out = tmp_path / "m.pt"
    args = ["calibrate-ood", "--model", str(tiny_model), "--data", str(family), "--out", str(out)]
    assert main([*args, "--pass-rate", "1.5", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("airreg calibrate-ood: error:") and "pass rate" in err and "\n" not in err
    assert not out.exists()


def test_evaluation_counts_the_pairs_out_of_distribution(checked, unlike, tmp_path):
    summary = evaluate(
        unlike, tmp_path / "eval", checked.path, iterations=1, overlays=0, device="cpu", progress=False
    )
    assert summary["out_of_distribution"] == 1.0
    assert "input check: out of distribution on 100% of the pairs" in summary["markdown"]
    with (tmp_path / "eval" / "cases.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["out_of_distribution"] == "True" and float(r["input_statistic"]) > 0 for r in rows)
    ok_failing = sum(float(r["tre_after"]) > 5.0 and r["flag_after"] == "False" for r in rows)
    assert summary["ok_above_tolerance"] == ok_failing == 0  # out of distribution: never "ok"
    good = sum(float(r["tre_after"]) < 2.0 for r in rows)
    assert summary["good_flagged_out_of_distribution"] == good
