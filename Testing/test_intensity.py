"""Tests of airreg.intensity: percentile normalisation and its checkpoint-stored specification."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from airreg import intensity
from airreg.errors import InputError, ModelError
from airreg.intensity import NormalizationSpec, normalize, percentiles, scale


def test_percentiles_map_to_zero_and_one() -> None:
    array = np.arange(1, 1001, dtype=np.int16).reshape(10, 10, 10)
    out = normalize(array, 1.0, 99.0)
    assert out.dtype == np.float32 and out.shape == array.shape
    low, high = np.percentile(array, [1, 99])
    np.testing.assert_allclose(out.ravel()[[0, 500, 999]], [0.0, (501 - low) / (high - low), 1.0], rtol=1e-6)
    assert np.mean(out == 0) == pytest.approx(0.01, abs=0.002) and np.mean(out == 1) == pytest.approx(
        0.01, abs=0.002
    )


def test_float32_input_is_left_alone_and_scaled_like_float64() -> None:
    array = np.random.default_rng(1).gamma(2.0, 50.0, size=(8, 30, 30)).astype(np.float32)
    before = array.copy()
    out = normalize(array)
    np.testing.assert_array_equal(array, before)
    low, high = np.percentile(array[array != 0], [1, 99])
    reference = np.clip((array.astype(np.float64) - low) / (high - low), 0, 1)
    np.testing.assert_allclose(out, reference, rtol=0, atol=1e-6)


def test_outliers_do_not_change_the_scale() -> None:
    rng = np.random.default_rng(0)
    array = rng.normal(100, 10, size=(20, 20, 20))
    spiked = array.copy()
    spiked.flat[:5] = 1e6
    np.testing.assert_allclose(normalize(array).ravel()[5:], normalize(spiked).ravel()[5:], atol=1e-2)


def test_zeros_are_ignored_by_default_and_mask_selects_voxels() -> None:
    array = np.zeros((10, 10, 10))
    array[:, :, 5:] = np.linspace(50, 150, 500).reshape(10, 10, 5)
    out = normalize(array, 0.0, 100.0)
    assert out[:, :, 5:].min() == 0.0 and out[:, :, 5:].max() == 1.0
    all_voxels = normalize(array, 0.0, 100.0, mask=np.ones(array.shape, bool))
    np.testing.assert_allclose(all_voxels[:, :, 5:], array[:, :, 5:] / 150, rtol=1e-6)


@settings(max_examples=50, deadline=None)
@given(
    hnp.arrays(np.float64, (4, 5, 6), elements=st.floats(-1e4, 1e4)),
    st.floats(0, 40),
    st.floats(60, 100),
)
def test_output_is_in_unit_range_and_monotonic(array: np.ndarray, low: float, high: float) -> None:
    if not np.any(array) or np.ptp(array[array != 0]) == 0:
        with pytest.raises(InputError):
            normalize(array, low, high)
        return
    out = normalize(array, low, high)
    assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
    order = np.argsort(array, axis=None, kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= 0)


def test_a_range_near_the_smallest_floats_is_scaled_without_nan() -> None:
    """Found by hypothesis: values of 1e-187 underflow to 0 in float32 while the scale overflows to inf."""
    array = np.full((4, 5, 6), 4.16941524e-187)
    array[0, 0, :3] = (1e-187, 2e-187, 8e-187)
    out = normalize(array, 0.0, 60.0)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    expected = (array - 1e-187) / (np.percentile(array, 60.0) - 1e-187)
    np.testing.assert_allclose(out, np.clip(expected, 0.0, 1.0), rtol=1e-6)


def test_mostly_uniform_image_falls_back_to_min_max() -> None:
    array = np.full((10, 10, 10), 7.0)
    array[0, 0, 0] = 9.0
    out = normalize(array)
    assert out[0, 0, 0] == 1.0 and out[1, 1, 1] == 0.0


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((3, 4, 5), 5.0), "constant"),
        (np.zeros((3, 4, 5)), "no voxels"),
        (np.where(np.eye(5)[None, :4] > 0, np.nan, 1.0), "NaN"),
    ],
)
def test_bad_images(array: np.ndarray, message: str) -> None:
    with pytest.raises(InputError, match=f"TRUS image.*{message}"):
        normalize(array, what="TRUS image")


def test_mask_shape_must_match() -> None:
    with pytest.raises(InputError, match="mask shape"):
        normalize(np.arange(10.0), mask=np.ones(9, bool))


def test_bad_percentiles() -> None:
    with pytest.raises(InputError, match="percentiles"):
        normalize(np.arange(10.0), 50, 50)
    with pytest.raises(InputError):
        NormalizationSpec(low_pct=-1)


def test_spec_modalities() -> None:
    """MR percentiles use all voxels; TRUS percentiles ignore the zero outside the fan."""
    array = np.zeros((10, 10, 10))
    array[:, :, 5:] = np.linspace(50, 150, 500).reshape(10, 10, 5)
    spec = NormalizationSpec(low_pct=0.0, high_pct=100.0)
    trus = spec.apply(array, "trus")
    mr = spec.apply(array, "mr")
    assert trus[:, :, 5:].min() == 0.0 and trus[0, 0, 5] == 0.0
    assert mr[0, 0, 5] == pytest.approx(50 / 150) and mr[:, :, :5].max() == 0.0
    with pytest.raises(InputError, match="modality"):
        spec.apply(array, "ct")
    with pytest.raises(InputError, match="MR image.*constant"):
        spec.apply(np.ones((3, 3, 3)), "mr")


def test_spec_dict_round_trip() -> None:
    spec = NormalizationSpec(low_pct=0.5, high_pct=99.5, mr_positive_only=True, trus_positive_only=False)
    stored = json.loads(json.dumps(spec.to_dict()))
    assert NormalizationSpec.from_dict(stored) == spec
    assert NormalizationSpec.from_dict({}) == NormalizationSpec()
    assert NormalizationSpec.from_dict({"low_pct": 2}).low_pct == 2.0


@pytest.mark.parametrize(
    "bad",
    [{"low_pct": "1"}, {"trus_positive_only": 1}, {"high_pct": True}, {"gamma": 2.0}, {"low_pct": 99.5}, [1]],
)
def test_spec_from_bad_dict(bad) -> None:
    with pytest.raises(ModelError, match="normalisation"):
        NormalizationSpec.from_dict(bad)


@settings(max_examples=60, deadline=None)
@given(
    values=hnp.arrays(
        st.sampled_from([np.float32, np.float64, np.int16]),
        st.integers(1, 400),
        elements=st.integers(-1000, 1000),
    ),
    q=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=3),
)
def test_percentiles_equal_numpy_to_the_bit(values, q) -> None:
    np.testing.assert_array_equal(percentiles(values, q), np.percentile(values, q))


def test_statistics_use_every_voxel_up_to_the_limit_then_a_regular_subsample(monkeypatch) -> None:
    array = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    monkeypatch.setattr(intensity, "STATISTICS_VOXELS", 1000)
    assert intensity.statistics_sample(array).size == 1000
    monkeypatch.setattr(intensity, "STATISTICS_VOXELS", 999)
    monkeypatch.setattr(intensity, "SUBSAMPLE_VOXELS", 300)
    sample = intensity.statistics_sample(array)
    assert 250 <= sample.size <= 300 and np.array_equal(
        sample // 4, np.arange(sample.size)
    )  # one per 4 voxels
    assert np.array_equal(intensity.statistics_sample(array), sample) and len(set(sample % 4)) > 1
    spec = NormalizationSpec()
    low, high = spec.intensity_range(array, "mr")
    assert (low, high) == tuple(np.percentile(sample, [1, 99]))
    assert abs(low - np.percentile(array, 1)) < 4 and abs(high - np.percentile(array, 99)) < 4  # one step


def test_apply_is_scale_of_the_intensity_range() -> None:
    rng = np.random.default_rng(3)
    array = rng.gamma(2.0, 30.0, size=(6, 7, 8)) * (rng.random((6, 7, 8)) > 0.3)
    spec = NormalizationSpec()
    for modality in ("mr", "trus"):
        low, high = spec.intensity_range(array, modality)
        np.testing.assert_array_equal(spec.apply(array, modality), scale(array, low, high))
    assert spec.intensity_range(array, "trus")[0] > 0 == spec.intensity_range(array, "mr")[0]
