"""Tests of airreg.quality: isotonic and logistic fits, AUROC, the calibration and the verdict."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import isotonic_regression

from airreg import quality
from airreg.quality import Calibration, assess

# --- isotonic fit ---------------------------------------------------------------------------------------


def test_isotonic_known_example():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([5.0, 3.0, 4.0, 1.0, 2.0])
    xs, fitted = quality.isotonic_decreasing(x, y)
    np.testing.assert_array_equal(xs, x)
    np.testing.assert_allclose(fitted, [5.0, 3.5, 3.5, 1.5, 1.5])


def test_isotonic_sorts_by_x():
    x = np.array([3.0, 1.0, 2.0])
    y = np.array([1.0, 3.0, 2.0])  # already non-increasing once sorted by x
    xs, fitted = quality.isotonic_decreasing(x, y)
    np.testing.assert_array_equal(xs, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(fitted, [3.0, 2.0, 1.0])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=2, max_size=25))
def test_isotonic_is_non_increasing_and_least_squares_optimal(values):
    y = np.array(values)
    x = np.arange(len(y), dtype=float)
    _, fitted = quality.isotonic_decreasing(x, y)
    assert np.all(np.diff(fitted) <= 1e-9)
    best = isotonic_regression(y, increasing=False).x
    np.testing.assert_allclose(((fitted - y) ** 2).sum(), ((best - y) ** 2).sum(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fitted, best, atol=1e-8)


# --- logistic fit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("slope", [2.0, -1.5])
def test_logistic_fit_recovers_a_known_model(slope):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=4000)
    p = 1.0 / (1.0 + np.exp(-(0.5 + slope * x)))
    labels = rng.random(x.size) < p
    a, b = quality.logistic_fit(x, labels)
    assert np.sign(b) == np.sign(slope)
    assert b == pytest.approx(slope, rel=0.15)
    assert a == pytest.approx(0.5, abs=0.3)


def test_logistic_fit_separable_data_stays_finite():
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    a, b = quality.logistic_fit(x, x > 2.5)
    assert np.isfinite(a) and np.isfinite(b) and b > 0
    assert 1.0 / (1.0 + np.exp(-(a + b * 2.5))) == pytest.approx(0.5, abs=0.05)


# --- AUROC ------------------------------------------------------------------------------------------------


def test_auroc_known_values():
    s = np.array([0.1, 0.2, 0.3, 0.4])
    assert quality.auroc(s, [False, False, True, True]) == 1.0
    assert quality.auroc(s, [True, True, False, False]) == 0.0
    assert quality.auroc(np.ones(4), [True, False, True, False]) == 0.5
    # the classic example: scores 0.1, 0.4, 0.35, 0.8 for labels 0, 0, 1, 1 -> 0.75
    assert quality.auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    # one tie across the classes counts half: pairs (pos, neg) = (2,1) win, (2,2) tie, (3,1) win, (3,2) win
    assert quality.auroc([1.0, 2.0, 2.0, 3.0], [False, False, True, True]) == pytest.approx(3.5 / 4)
    assert np.isnan(quality.auroc(s, [True] * 4))


# --- calibration ------------------------------------------------------------------------------------------


def make_calibration(n: int = 200, seed: int = 0) -> Calibration:
    """Critic values that go down as TRE goes up, with noise: TRE in [0, 15] mm."""
    rng = np.random.default_rng(seed)
    tre = rng.uniform(0.0, 15.0, size=n)
    critic = -0.2 * tre + rng.normal(0.0, 0.4, size=n)
    return Calibration(tuple(critic.tolist()), tuple(tre.tolist()))


def test_expected_tre_is_monotone_and_in_range():
    cal = make_calibration()
    grid = np.linspace(min(cal.critic) - 1, max(cal.critic) + 1, 200)
    tre = np.array([cal.expected_tre_mm(c) for c in grid])
    assert np.all(np.diff(tre) <= 1e-12)
    assert tre[0] > 10.0 and tre[-1] < 3.0
    assert tre.min() >= min(cal.tre_mm) and tre.max() <= max(cal.tre_mm)


def test_p_failure_grows_as_the_tolerance_shrinks():
    cal = make_calibration()
    for critic in (-2.5, -1.5, -0.5):
        p = [cal.p_failure(critic, tol) for tol in (10.0, 5.0, 2.0)]
        assert p[0] < p[1] < p[2], p
    # and decreases with a better critic value
    assert cal.p_failure(-3.0) > cal.p_failure(-1.0) > cal.p_failure(0.5)


def test_p_failure_degenerate_labels():
    cal = Calibration((0.0, 1.0, 2.0, 3.0), (1.0, 1.0, 1.0, 1.0))
    assert cal.p_failure(0.0, 5.0) == 0.0
    assert cal.p_failure(0.0, 0.5) == 1.0


def test_d_score_is_increasing_in_0_1():
    cal = make_calibration()
    scores = [cal.d_score(c) for c in np.linspace(-10, 10, 50)]
    assert all(0.0 < s < 1.0 for s in scores)
    assert np.all(np.diff(scores) > 0)
    assert cal.d_score(float(np.median(cal.critic))) == pytest.approx(0.5)


def test_calibration_round_trip_and_validation():
    cal = make_calibration(10)
    again = Calibration.from_dict(cal.to_dict())
    assert again == cal
    with pytest.raises(ValueError):
        Calibration((0.0, 1.0, 2.0), (1.0, 2.0, 3.0))
    with pytest.raises(ValueError):
        Calibration((0.0, 1.0, 2.0, 3.0), (1.0, 2.0, 3.0))


# --- verdict ----------------------------------------------------------------------------------------------


def test_assess_good_score_is_ok():
    cal = make_calibration()
    verdict = assess(1.0, cal, 5.0, overlap=1.0)
    assert verdict.warning is None and verdict.quality == "ok"
    assert verdict.p_failure < 0.5 and verdict.estimated_tre_mm < 5.0
    assert verdict.tolerance_mm == 5.0


def test_assess_warns_on_high_failure_probability():
    cal = make_calibration()
    verdict = assess(-3.0, cal, 5.0, overlap=1.0)
    assert verdict.quality == "warning"
    assert verdict.p_failure >= 0.5
    assert "5 mm" in verdict.warning


def test_assess_warns_on_low_coverage_even_with_a_good_score():
    cal = make_calibration()
    verdict = assess(1.0, cal, 5.0, overlap=0.05)
    assert verdict.quality == "warning"
    assert "covers only 5%" in verdict.warning


def test_assess_threshold_follows_the_tolerance():
    cal = make_calibration()
    critic = -1.2  # expected TRE around 6 mm
    assert assess(critic, cal, 12.0).quality == "ok"
    assert assess(critic, cal, 2.0).quality == "warning"


def test_assess_warns_when_the_patient_check_flags_a_good_alignment():
    cal = make_calibration()
    check = quality.PatientCheckCalibration(0.0, 0.05, 0.6, 0.9, 100, 100)  # logits below 0 are flagged
    same = assess(1.0, cal, 5.0, patient_logit=2.0, patient_check=check)
    assert same.quality == "ok" and same.same_patient_score == pytest.approx(1 / (1 + np.exp(-2.0)))
    other = assess(1.0, cal, 5.0, patient_logit=-1.5, patient_check=check)
    assert other.warning == (
        "the TRUS may belong to another patient (same-patient score 0.18, below 0.50): check the inputs"
    )
    poor = assess(-3.0, cal, 5.0, patient_logit=-1.5, patient_check=check)  # a poor alignment is named first
    assert poor.warning.startswith("alignment looks poor") and poor.same_patient_score < 0.5
    assert assess(1.0, cal, 5.0).same_patient_score is None  # a model without the check
