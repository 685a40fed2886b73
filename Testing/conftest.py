"""Shared fixtures: a small synthetic MR/TRUS case maker, a tiny dataset and a tiny trained model.

The case maker does not depend on ``airreg.phantom``: MR is smoothed random blobs on a 96x96x24 grid at
1 x 1 x 3 mm with a non-zero origin and an oblique direction; TRUS is the MR resampled through ``inv(gt)`` onto an
80^3 grid at 0.9 mm (so that ``gt`` maps MR points to TRUS points, the project's convention) with a different,
non-linear intensity map. Training runs once per test session (session-scoped fixtures).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from airreg import data, geometry, resampling

MR_SIZE = (96, 96, 24)  # x, y, z
MR_SPACING = (1.0, 1.0, 3.0)
TRUS_SIZE = (80, 80, 80)
TRUS_SPACING = (0.9, 0.9, 0.9)
LANDMARK_NAMES = ("apex", "base", "left", "right", "anterior", "posterior")

#: Run on their own in a Slicer-like environment without torch (.ci/run; Testing/slicer_python/pytest.ini).
collect_ignore = ["slicer_python"]


@dataclass
class SyntheticCase:
    mr: sitk.Image
    trus: sitk.Image
    gt: np.ndarray
    names: tuple[str, ...]
    mr_points: np.ndarray
    trus_points: np.ndarray


#: Keys every registration report must hold (issue 3).
REPORT_KEYS = frozenset(
    {"d_score_before", "d_score", "estimated_tre_mm", "quality", "transform_file", "model", "seconds"}
)


def smooth_blobs(shape_zyx, seed: int, sigma=(1.0, 3.0, 3.0)) -> np.ndarray:
    """Smoothed random blobs in [0, 1] (float32), shape (z, y, x)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape_zyx), sigma=sigma)
    field = (field - field.min()) / (field.max() - field.min())
    return field.astype(np.float32)


def make_mr(seed: int, oblique: bool = True) -> sitk.Image:
    """MR: smoothed blobs, 96x96x24 at 1x1x3 mm, non-zero origin, slightly oblique direction."""
    array = 10.0 + 90.0 * smooth_blobs(MR_SIZE[::-1], seed)
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(MR_SPACING)
    direction = geometry.rotation_matrix((0.0, 0.0, 4.0)) if oblique else np.eye(3)
    image.SetDirection(direction.ravel().tolist())
    # origin chosen so that the volume is off the world origin but its centre is known
    center = np.array([12.0, -30.0, 45.0])
    half = direction @ ((np.array(MR_SIZE) - 1) * np.array(MR_SPACING) / 2)
    image.SetOrigin((center - half).tolist())
    return image


def random_gt(rng: np.random.Generator, center: np.ndarray) -> np.ndarray:
    """A rigid MR->TRUS matrix: a few degrees about the MR centre plus a shift of a few mm."""
    angles = rng.uniform(-6, 6, size=3)
    shift = rng.uniform(-4, 4, size=3) + np.array([-20.0, 15.0, -10.0])  # TRUS lives in its own place
    return geometry.RigidTransform(angles, shift, center).matrix


def make_trus(mr: sitk.Image, gt: np.ndarray, seed: int = 0) -> sitk.Image:
    """TRUS: the MR through ``inv(gt)`` onto an 80^3 0.9 mm grid centred on gt(MR centre), other intensities."""
    ref = sitk.Image(TRUS_SIZE, sitk.sitkFloat32)
    ref.SetSpacing(TRUS_SPACING)
    direction = geometry.rotation_matrix((0.0, 0.0, -7.0))
    ref.SetDirection(direction.ravel().tolist())
    center = geometry.apply(gt, resampling.physical_center(mr))
    half = direction @ ((np.array(TRUS_SIZE) - 1) * np.array(TRUS_SPACING) / 2)
    ref.SetOrigin((center - half).tolist())
    moved = sitk.Resample(
        mr, ref, geometry.to_sitk(geometry.invert(gt)), sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )
    array = sitk.GetArrayFromImage(moved)
    inside = array > 0
    rng = np.random.default_rng(seed + 999)
    mapped = np.where(
        inside, 5.0 + 200.0 * ((array - 10.0) / 90.0) ** 2 + rng.uniform(0, 2, array.shape), 0.0
    )
    out = sitk.GetImageFromArray(mapped.astype(np.float32))
    out.CopyInformation(ref)
    return out


def make_case(seed: int) -> SyntheticCase:
    rng = np.random.default_rng(seed)
    mr = make_mr(seed)
    center = resampling.physical_center(mr)
    gt = random_gt(rng, center)
    trus = make_trus(mr, gt, seed)
    offsets = np.array([[0, 0, -18], [0, 0, 18], [-15, 0, 0], [15, 0, 0], [0, -12, 3], [0, 12, -3]], float)
    mr_points = center + offsets
    return SyntheticCase(mr, trus, gt, LANDMARK_NAMES, mr_points, geometry.apply(gt, mr_points))


def write_synthetic_case(folder: Path, case: SyntheticCase) -> Path:
    return data.write_case(
        folder, case.mr, case.trus, gt=case.gt, landmarks=(case.names, case.mr_points, case.trus_points)
    )


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Six synthetic cases in the case-folder format (read-only for tests)."""
    root = tmp_path_factory.mktemp("tiny-dataset")
    for i in range(6):
        write_synthetic_case(root / f"case{i:03d}", make_case(100 + i))
    return root


@pytest.fixture(scope="session")
def tiny_case(tiny_dataset) -> data.Case:
    return data.read_case(tiny_dataset / "case000", require_gt=True)


TINY_EPOCHS = 2
TINY_TRAIN_KW = dict(epochs=TINY_EPOCHS, batch_size=4, steps_per_epoch=2)


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tmp_path_factory) -> Path:
    """A run folder of a 2-epoch training on the tiny dataset (tiny preset, CPU): model.pt, last.pt, logs."""
    from airreg.config import TrainConfig, preset
    from airreg.training import train

    out = tmp_path_factory.mktemp("tiny-run")
    model = train(
        tiny_dataset, out, preset("tiny"), TrainConfig(**TINY_TRAIN_KW), device="cpu", progress=False
    )
    assert model == out / "model.pt"
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_run) -> Path:
    return tiny_run / "model.pt"
