"""Tests of airreg.registration with the tiny trained model and with generators whose output is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from airreg import checkpoint, data, geometry, resampling
from airreg.errors import InputError
from airreg.registration import Registrar, centers_aligned
from conftest import REPORT_KEYS


@pytest.fixture(scope="module")
def state(tiny_model) -> dict:
    return checkpoint.load(tiny_model)


@pytest.fixture(scope="module")
def registrar(state) -> Registrar:
    return Registrar(state, device="cpu")


def constant_generator(state: dict, params, iterations: int = 1, calibrated: bool = True) -> Registrar:
    """A registrar whose G always outputs ``params`` (zero head weights, bias = params / scale); ``calibrated``
    treats its flag as calibrated (as after refine-critic and train-patient-check), so that D chooses passes."""
    reg = Registrar(state, device="cpu", iterations=iterations)
    if calibrated:
        reg.flag_note = None
    with torch.no_grad():
        reg.g.head.weight.zero_()
        reg.g.head.bias.copy_(torch.as_tensor(params, dtype=torch.float32) / reg.g.scale)
    return reg


def perturbed_start(case, params) -> np.ndarray:
    """The ground truth perturbed in the grid frame by 3-DOF ``params`` (as evaluation.random_start does)."""
    perturb = geometry.RigidTransform.from_vector(params, 3).matrix
    return case.gt @ geometry.to_world(perturb, resampling.mr_frame(case.mr))


def test_register_returns_a_rigid_transform_and_a_full_report(registrar, tiny_case, tiny_model):
    result = registrar.register(tiny_case.mr, tiny_case.trus)
    m = geometry.check_rigid(result.mr_to_trus)
    assert np.linalg.det(m[:3, :3]) == pytest.approx(1.0, abs=1e-6)
    report = result.report("out.tfm")
    assert set(report) >= REPORT_KEYS
    assert report["quality"] in {"ok", "warning"}
    assert report["transform_file"] == "out.tfm"
    assert report["model"] == tiny_model.name
    assert report["model_sha256"] == checkpoint.load(tiny_model)["sha256"]
    assert report["seconds"] > 0 and report["seconds"] == pytest.approx(
        sum(result.timings[k] for k in ("resampling", "generator", "discriminator")), rel=1e-6
    )
    for key in ("d_score_before", "d_score"):
        assert 0.0 < report[key] < 1.0
    assert report["estimated_tre_mm"] >= 0
    assert (report["quality"] == "warning") == (report["warning"] is not None)
    json.dumps(report)  # JSON-ready
    np.testing.assert_allclose(report["mr_to_trus_lps"], result.mr_to_trus)


def test_to_parent_ras(registrar, tiny_case):
    result = registrar.register(tiny_case.mr, tiny_case.trus, tiny_case.gt)
    np.testing.assert_allclose(
        result.to_parent_ras, geometry.lps_resampling_to_ras_modeling(result.mr_to_trus)
    )
    np.testing.assert_allclose(result.report()["slicer_to_parent_ras"], result.to_parent_ras)


def test_identity_generator_returns_the_start(state, tiny_case):
    reg = constant_generator(state, [0.0, 0.0, 0.0], iterations=3)
    start = perturbed_start(tiny_case, [12.0, 3.0, -2.0])
    result = reg.register(tiny_case.mr, tiny_case.trus, start)
    np.testing.assert_allclose(result.mr_to_trus, start, atol=1e-5)
    np.testing.assert_array_equal(result.initial, start)
    assert len(result.steps) == 1  # converged at once: an update of 0 mm
    assert result.d_score == pytest.approx(result.d_score_before, abs=1e-6)
    # no initial transform: the volume centres are aligned
    result = reg.register(tiny_case.mr, tiny_case.trus)
    np.testing.assert_allclose(result.mr_to_trus, centers_aligned(tiny_case.mr, tiny_case.trus), atol=1e-5)
    np.testing.assert_allclose(
        geometry.apply(result.mr_to_trus, resampling.physical_center(tiny_case.mr)),
        resampling.physical_center(tiny_case.trus),
        atol=1e-4,
    )


def test_untrained_generator_checkpoint_returns_the_start(state, tiny_case):
    zeroed = {**state, "generator": {**state["generator"]}}
    zeroed["generator"]["head.weight"] = torch.zeros_like(state["generator"]["head.weight"])
    zeroed["generator"]["head.bias"] = torch.zeros_like(state["generator"]["head.bias"])
    start = perturbed_start(tiny_case, [-8.0, -1.0, 4.0])
    result = Registrar(zeroed, device="cpu").register(tiny_case.mr, tiny_case.trus, start)
    np.testing.assert_allclose(result.mr_to_trus, start, atol=1e-5)


@pytest.mark.parametrize("perturbation", [[15.0, 3.0, -4.0], [-22.0, -4.5, 2.0]])
def test_an_exact_generator_recovers_the_ground_truth(state, tiny_case, perturbation):
    """G's estimate is composed in the grid frame exactly as in training: its target undoes the perturbation."""
    start = perturbed_start(tiny_case, perturbation)
    p = resampling.rigid_matrices(torch.tensor([perturbation], dtype=torch.float64), 3)
    target = resampling.matrix_params(resampling.invert_rigid(p), 3)[0]
    result = constant_generator(state, target).register(tiny_case.mr, tiny_case.trus, start)
    np.testing.assert_allclose(result.mr_to_trus, tiny_case.gt, atol=1e-3)
    residual = tiny_case.landmarks_trus - geometry.apply(result.mr_to_trus, tiny_case.landmarks_mr)
    assert np.abs(residual).max() < 1e-3


def test_iterations_compose_and_the_best_scored_step_is_kept(state, tiny_case):
    update = [3.0, 1.0, -0.5]
    reg = constant_generator(state, update, iterations=1)
    start = perturbed_start(tiny_case, [5.0, 1.0, 1.0])
    one = reg.register(tiny_case.mr, tiny_case.trus, start)
    assert len(one.steps) == 1 and one.selected_step == 1
    three = reg.register(tiny_case.mr, tiny_case.trus, start, iterations=3)  # per-call override
    assert [s["step"] for s in three.steps] == [1, 2, 3]
    assert all(0 < s["d_score"] < 1 for s in three.steps)
    assert three.selected_step in (1, 2, 3)
    k = three.selected_step
    assert three.steps[k - 1]["d_score"] == pytest.approx(max(s["d_score"] for s in three.steps))
    u = geometry.RigidTransform.from_vector(update, 3).matrix
    expected = start @ geometry.to_world(np.linalg.matrix_power(u, k), resampling.mr_frame(tiny_case.mr))
    np.testing.assert_allclose(three.mr_to_trus, expected, atol=1e-3)
    np.testing.assert_allclose(
        one.mr_to_trus, start @ geometry.to_world(u, resampling.mr_frame(tiny_case.mr)), atol=1e-3
    )
    assert len(reg.register(tiny_case.mr, tiny_case.trus, start).steps) == 1  # the override did not stick


def test_an_uncalibrated_flag_keeps_one_generator_pass(state, tiny_case):
    assert not checkpoint.flag_calibrated(state)
    reg = constant_generator(state, [3.0, 1.0, -0.5], iterations=3, calibrated=False)
    start = perturbed_start(tiny_case, [5.0, 1.0, 1.0])
    result = reg.register(tiny_case.mr, tiny_case.trus, start)
    assert len(result.steps) == 1 and result.selected_step == 1
    assert "flag is not calibrated" in result.single_pass_reason
    assert result.report()["single_pass_reason"] == result.single_pass_reason
    calibrated = constant_generator(state, [3.0, 1.0, -0.5], iterations=3)
    assert calibrated.register(tiny_case.mr, tiny_case.trus, start).single_pass_reason is None
    np.testing.assert_allclose(
        result.mr_to_trus, calibrated.register(tiny_case.mr, tiny_case.trus, start, iterations=1).mr_to_trus
    )


def test_zero_iterations_override_is_an_input_error(registrar, tiny_case):
    with pytest.raises(InputError):
        registrar.register(tiny_case.mr, tiny_case.trus, iterations=0)


def test_invalid_registrar_settings(state):
    with pytest.raises(InputError):
        Registrar(state, device="cpu", iterations=0)
    with pytest.raises(InputError):
        Registrar(state, device="cpu", tolerance_mm=0.0)


def test_progress_is_reported_in_order(registrar, tiny_case):
    seen = []
    registrar.register(tiny_case.mr, tiny_case.trus, progress=lambda f, msg: seen.append((f, msg)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(seen) >= 3


def test_score_agrees_with_register(registrar, tiny_case):
    start = perturbed_start(tiny_case, [10.0, 2.0, 2.0])
    result = registrar.register(tiny_case.mr, tiny_case.trus, start)
    verdict = registrar.score(tiny_case.mr, tiny_case.trus, start)
    assert verdict.critic == pytest.approx(result.before.critic, abs=1e-5)
    assert verdict.quality in {"ok", "warning"} and 0 < verdict.d_score < 1
    at_result = registrar.score(tiny_case.mr, tiny_case.trus, result.mr_to_trus)
    assert at_result.critic == pytest.approx(result.after.critic, abs=2e-3)


def with_array(image: sitk.Image, array: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(array.astype(np.float32))
    out.CopyInformation(image)
    return out


def test_blank_trus_is_an_input_error(registrar, tiny_case):
    blank = with_array(tiny_case.trus, np.zeros(sitk.GetArrayViewFromImage(tiny_case.trus).shape))
    with pytest.raises(InputError, match="TRUS"):
        registrar.score(tiny_case.mr, blank, tiny_case.gt)


def test_trus_covering_a_tiny_region_gives_a_warning(registrar, tiny_case):
    array = sitk.GetArrayFromImage(tiny_case.trus)
    keep = np.zeros_like(array, dtype=bool)
    c = np.array(array.shape) // 2
    keep[c[0] - 3 : c[0] + 3, c[1] - 3 : c[1] + 3, c[2] - 3 : c[2] + 3] = True
    patch = with_array(tiny_case.trus, np.where(keep, array, 0.0))
    verdict = registrar.score(tiny_case.mr, patch, tiny_case.gt)
    assert verdict.quality == "warning"
    assert "covers only" in verdict.warning
    result = registrar.register(tiny_case.mr, patch, tiny_case.gt)
    assert result.quality == "warning" and result.before.quality == "warning"


def test_non_overlapping_volumes_are_an_input_error(registrar, tiny_case):
    far = sitk.Image(tiny_case.trus)
    far.SetOrigin((np.array(tiny_case.trus.GetOrigin()) + 1000.0).tolist())
    with pytest.raises(InputError, match="overlap"):
        registrar.register(tiny_case.mr, far, tiny_case.gt)
    with pytest.raises(InputError, match="overlap"):
        registrar.score(tiny_case.mr, far, tiny_case.gt)


@pytest.mark.parametrize("bad", ["nan", "scale", "shape"])
def test_bad_initial_transform_is_an_input_error(registrar, tiny_case, bad):
    m = tiny_case.gt.copy()
    if bad == "nan":
        m[0, 3] = np.nan
        match = "NaN"
    elif bad == "scale":
        m[:3, :3] *= 1.1
        match = "rigid"
    else:
        m = m[:3]
        match = "4x4"
    with pytest.raises(InputError, match=match):
        registrar.register(tiny_case.mr, tiny_case.trus, m)
    with pytest.raises(InputError, match=match):
        registrar.score(tiny_case.mr, tiny_case.trus, m)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the fallback on a machine without CUDA")
def test_cuda_request_falls_back_to_cpu_with_a_message(state, tiny_case, capsys):
    reg = Registrar(state, device="cuda")
    out = capsys.readouterr().out
    assert "CUDA" in out and "CPU" in out
    assert reg.device == torch.device("cpu")
    result = reg.register(tiny_case.mr, tiny_case.trus)
    assert result.device == "cpu"


def test_images_of_different_patients_give_a_warning(registrar, tiny_case):
    mr, trus = sitk.Image(tiny_case.mr), sitk.Image(tiny_case.trus)
    data.set_patient_id(mr, "PAT-001")
    data.set_patient_id(trus, "PAT-001")
    assert "different patients" not in (registrar.score(mr, trus, tiny_case.gt).warning or "")
    data.set_patient_id(trus, "PAT-002")
    verdict = registrar.score(mr, trus, tiny_case.gt)
    assert (
        verdict.quality == "warning"
        and "different patients" in verdict.warning
        and "PAT-002" in verdict.warning
    )
    result = registrar.register(mr, trus, tiny_case.gt)
    assert result.quality == "warning" and "different patients" in result.warning
    assert result.report()["quality"] == "warning"
