"""Tests of airreg.preprocessing: the normalised stacks equal normalising the whole volume, then sampling."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from airreg import preprocessing, resampling
from airreg.intensity import NormalizationSpec
from conftest import make_case


@pytest.mark.parametrize("modality", ["mr", "trus"])
@pytest.mark.parametrize("gather", [False, True])
def test_normalized_stack_equals_normalising_the_whole_volume_first(modality, gather, monkeypatch):
    """Both paths (scaling the footprint, reading 8 neighbours per point) give the whole-volume result."""
    if gather:
        monkeypatch.setattr(preprocessing, "GATHER_RATIO", 0)
    case = make_case(11)
    image = case.mr if modality == "mr" else case.trus
    spec, grid = NormalizationSpec(), resampling.GridSpec((8, 24, 24), (3.0, 1.6, 1.6))
    frame = resampling.mr_frame(case.mr)
    to_volume = np.eye(4) if modality == "mr" else case.gt
    lmat = resampling.grid_to_volume(resampling.index_to_world(image), to_volume, frame)
    whole = torch.from_numpy(spec.apply(sitk.GetArrayViewFromImage(image), modality))[None, None]
    expected = resampling.sample(whole, torch.as_tensor(lmat), grid)[0]
    ours = preprocessing.normalized_stack(image, spec, modality, lmat, grid, "cpu", "image")
    assert ours.dtype == torch.float32 and ours.shape == grid.size
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert expected.std() > 0.05


def test_normalized_stack_of_a_grid_outside_the_volume_is_zero():
    case = make_case(12)
    grid = resampling.GridSpec((4, 8, 8), (3.0, 1.6, 1.6))
    far = resampling.mr_frame(case.mr)
    far[:3, 3] += 1000.0
    lmat = resampling.grid_to_volume(resampling.index_to_world(case.mr), np.eye(4), far)
    out = preprocessing.normalized_stack(case.mr, NormalizationSpec(), "mr", lmat, grid, "cpu", "MR")
    assert out.shape == grid.size and torch.count_nonzero(out) == 0
