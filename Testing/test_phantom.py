"""Synthetic MR/TRUS phantom: geometry consistency (checked with SimpleITK), determinism, files and realism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from airreg import geometry, phantom

TISSUES = phantom.TISSUES
REQUIRED_FILES = (
    "mr.nii.gz",
    "trus.nii.gz",
    "gt.tfm",
    "landmarks.csv",
    "mr_prostate.nii.gz",
    "trus_prostate.nii.gz",
    "case.json",
)


DATASET_SEED = np.random.SeedSequence(7, spawn_key=(0,))  # case0000 of generate_dataset(seed=7)


@pytest.fixture(scope="module")
def cases() -> dict[int | str, phantom.PhantomCase]:
    return {
        0: phantom.generate_case(0),
        3: phantom.generate_case(3),
        "dataset": phantom.generate_case(DATASET_SEED),
    }


@pytest.fixture(scope="module")
def case_folder(cases, tmp_path_factory):
    return phantom.write_case(cases[0], tmp_path_factory.mktemp("phantom") / "case0000")


@pytest.fixture(scope="module")
def deformed() -> phantom.PhantomCase:
    return phantom.generate_case(0, deform=True)


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def _points(case: phantom.PhantomCase, prefix: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [lm for lm in case.landmarks if lm[0].startswith(prefix)]


def _probe_coordinates(case: phantom.PhantomCase, trus_point: np.ndarray) -> np.ndarray:
    """Probe-frame mm of a TRUS LPS point: the TRUS voxel axes are the probe axes (see case.json)."""
    p = case.params["trus"]
    index = np.array(case.trus.TransformPhysicalPointToContinuousIndex([float(v) for v in trus_point]))
    return np.array(p["origin_in_probe_mm"]) + p["spacing_mm"] * index


def _trus_at(case: phantom.PhantomCase, probe_points: np.ndarray) -> np.ndarray:
    """TRUS values (nearest voxel) at probe-frame points (N, 3)."""
    p = case.params["trus"]
    index = np.rint((probe_points - np.array(p["origin_in_probe_mm"])) / p["spacing_mm"]).astype(int)
    return _array(case.trus)[index[:, 2], index[:, 1], index[:, 0]].astype(float)


def _interior(labels: np.ndarray, tissue: str, in_plane_only: bool = True) -> np.ndarray:
    """Voxels of a tissue away from its boundary (eroded in-plane for thick MR slices, else in 3D)."""
    return ndimage.binary_erosion(
        labels == TISSUES[tissue], np.ones((1, 3, 3) if in_plane_only else (3, 3, 3))
    )


# --- geometry ------------------------------------------------------------------------------------------


def test_gt_maps_mr_landmarks_to_trus_landmarks(cases):
    for case in cases.values():
        assert len(case.landmarks) >= 5
        mr = np.array([m for _, m, _ in case.landmarks])
        trus = np.array([t for _, _, t in case.landmarks])
        assert np.abs(geometry.apply(case.gt, mr) - trus).max() < 0.5
        geometry.check_rigid(case.gt)


def test_trus_mask_resampled_with_gt_overlaps_mr_mask(cases):
    for case in cases.values():
        resampled = sitk.Resample(
            case.trus_mask, case.mr_mask, geometry.to_sitk(case.gt), sitk.sitkNearestNeighbor, 0
        )
        a, b = _array(resampled) > 0, _array(case.mr_mask) > 0
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice >= 0.85, dice
        volume_ml = b.sum() * np.prod(case.mr.GetSpacing()) / 1000
        assert 12 < volume_ml < 100


def test_mr_anatomy_at_landmark_matches_trus_anatomy(cases, deformed):
    """A lesion centre lands inside the lesion in both label maps, with and without probe pressure."""
    checked = 0
    for case in [*cases.values(), deformed]:
        for _, mr_point, trus_point in _points(case, "lesion"):
            for image, point in ((case.mr_labels, mr_point), (case.trus_labels, trus_point)):
                labels = _array(image)
                index = np.array(image.TransformPhysicalPointToIndex([float(v) for v in point]))[::-1]
                window = labels[tuple(slice(max(i - 1, 0), i + 2) for i in index)]
                assert (window == TISSUES["lesion"]).any()
            checked += 1
    assert checked >= 2


def test_deform_moves_only_the_trus_side(cases, deformed):
    rigid = cases[0]
    assert np.array_equal(_array(rigid.mr), _array(deformed.mr))
    assert np.allclose(rigid.gt, deformed.gt)
    assert not np.array_equal(_array(rigid.trus_mask), _array(deformed.trus_mask))
    shift = np.array(
        [np.linalg.norm(a[2] - b[2]) for a, b in zip(rigid.landmarks, deformed.landmarks, strict=True)]
    )
    amplitude = deformed.params["probe_push"]["amplitude_mm"]
    assert shift.max() > 0.5
    assert shift.max() <= amplitude + 1e-6
    assert deformed.params["deform"] and not rigid.params["deform"]


# --- determinism ---------------------------------------------------------------------------------------


def test_same_seed_same_case_and_different_seed_different_case(cases):
    again = phantom.generate_case(3)
    for name in ("mr", "trus", "mr_mask", "trus_mask"):
        assert np.array_equal(_array(getattr(again, name)), _array(getattr(cases[3], name)))
        assert getattr(again, name).GetOrigin() == getattr(cases[3], name).GetOrigin()
    assert np.array_equal(again.gt, cases[3].gt)
    assert again.params == cases[3].params
    first, other = _array(cases[0].trus), _array(cases[3].trus)
    assert first.shape != other.shape or not np.array_equal(first, other)
    assert not np.allclose(cases[0].gt, cases[3].gt)


# --- files ---------------------------------------------------------------------------------------------


def test_write_case_files(cases, case_folder):
    case, folder = cases[0], case_folder
    assert sorted(p.name for p in folder.iterdir()) == sorted(REQUIRED_FILES)
    lines = (folder / "landmarks.csv").read_text().splitlines()
    assert lines[0] == "name,mr_x,mr_y,mr_z,trus_x,trus_y,trus_z"
    assert len(lines) - 1 >= 5
    row = lines[1].split(",")
    assert row[0] == case.landmarks[0][0]
    assert np.allclose([float(v) for v in row[1:]], np.concatenate(case.landmarks[0][1:]), atol=1e-5)
    assert np.allclose(geometry.read_transform(folder / "gt.tfm"), case.gt, atol=1e-9)
    params = json.loads((folder / "case.json").read_text())
    assert params["seed"] == {"entropy": 0, "spawn_key": []}
    for name, image in (("trus", case.trus), ("mr_prostate", case.mr_mask)):
        read = sitk.ReadImage(str(folder / f"{name}.nii.gz"))
        assert np.allclose(read.GetDirection(), image.GetDirection(), atol=1e-6)
        assert np.allclose(read.GetOrigin(), image.GetOrigin(), atol=1e-4)
        assert np.array_equal(_array(read), _array(image))


def test_generate_dataset_uses_spawned_seeds(cases, tmp_path):
    folders = phantom.generate_dataset(tmp_path / "out", cases=1, seed=7, progress=False)
    assert [f.name for f in folders] == ["case0000"]
    params = json.loads((folders[0] / "case.json").read_text())
    assert params["seed"] == {"entropy": 7, "spawn_key": [0]}
    mr = sitk.ReadImage(str(folders[0] / "mr.nii.gz"))
    assert np.array_equal(_array(mr), _array(cases["dataset"].mr))


def test_write_preview(case_folder, tmp_path):
    png = phantom.write_preview(case_folder, tmp_path / "preview.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000


# --- image properties and realism ----------------------------------------------------------------------


def test_mr_grid_and_values(cases):
    for case in cases.values():
        sx, sy, sz = case.mr.GetSpacing()
        assert sz > 2 * max(sx, sy) and 0.5 <= sx <= 0.9 and 2.9 <= sz <= 3.7
        assert 20 <= case.mr.GetSize()[2] <= 26 and 128 <= case.mr.GetSize()[0] <= 192
        mr = _array(case.mr)
        assert np.isfinite(mr).all() and mr.min() >= 0 and mr.max() > 0
        assert case.mr_mask.GetSize() == case.mr.GetSize() and case.mr_labels.GetSize() == case.mr.GetSize()


def test_mr_contrast_is_t2_like(cases):
    """Urine brighter than the gland, gland brighter than the rectal wall; PZ brighter than TZ."""
    for case in cases.values():
        mr, labels = _array(case.mr).astype(float), _array(case.mr_labels)
        gland = mr[_array(case.mr_mask) > 0].mean()
        urine, wall = mr[_interior(labels, "urine")].mean(), mr[_interior(labels, "rectal_wall")].mean()
        assert urine > gland > wall
        assert (
            mr[_interior(labels, "peripheral_zone")].mean() > mr[_interior(labels, "transition_zone")].mean()
        )


def test_trus_is_a_fan_with_zero_outside(cases):
    for case in cases.values():
        p = case.params["trus"]
        trus = _array(case.trus)
        assert trus.dtype == np.uint8 and np.allclose(case.trus.GetSpacing(), p["spacing_mm"])
        nx, ny, _ = case.trus.GetSize()
        x = p["origin_in_probe_mm"][0] + p["spacing_mm"] * np.arange(nx)
        y = p["origin_in_probe_mm"][1] + p["spacing_mm"] * np.arange(ny)
        radius = np.hypot(x[None, :], y[:, None])
        angle = np.abs(np.degrees(np.arctan2(x[None, :], y[:, None])))
        eps = 1e-3
        outside = (radius < p["probe_radius_mm"] - eps) | (radius > p["max_depth_mm"] + eps)
        outside |= angle > p["half_angle_deg"] + eps
        inside = (radius > p["probe_radius_mm"] + eps) & (radius < p["max_depth_mm"] - eps)
        inside &= angle < p["half_angle_deg"] - eps
        assert outside.any() and (trus[:, outside] == 0).all()
        assert (trus[:, inside] > 0).all()
        gland = _array(case.trus_mask) > 0
        assert gland[:, inside].sum() > 0.95 * gland.sum()  # the gland is imaged


def test_trus_echo_pattern(cases):
    """Gland hypoechoic against fat; speckle statistics of the linearised envelope near Rayleigh (CV 0.52)."""
    for case in cases.values():
        trus, labels = _array(case.trus).astype(float), _array(case.trus_labels)
        imaged = trus > 0
        gland = ndimage.binary_erosion(_array(case.trus_mask) > 0, iterations=2) & imaged
        fat = _interior(labels, "fat", in_plane_only=False) & imaged
        assert trus[gland].mean() < trus[fat].mean()
        envelope = 10 ** ((trus - 1) / 254 * case.params["trus"]["dynamic_range_db"] / 20)
        pz = ndimage.binary_erosion(labels == TISSUES["peripheral_zone"], np.ones((3, 3, 3)), 2) & imaged
        assert pz.sum() > 500
        cv = envelope[pz].std() / envelope[pz].mean()
        assert 0.3 < cv < 0.7, cv


def test_calcification_casts_an_acoustic_shadow(cases):
    checked = 0
    for case in cases.values():
        radii = {
            f"calcification_{i + 1}": c["radius_mm"]
            for i, c in enumerate(case.params["anatomy"]["calcifications"])
        }
        for name, _, trus_point in _points(case, "calcification"):
            p = _probe_coordinates(case, trus_point)
            r, theta = np.hypot(p[0], p[1]), np.arctan2(p[0], p[1])
            depth = np.arange(r + radii[name] + 2, r + radii[name] + 10, 0.5)

            def ray(offset, depth=depth, theta=theta, z=p[2]):
                return np.stack(
                    [depth * np.sin(theta + offset), depth * np.cos(theta + offset), np.full_like(depth, z)],
                    1,
                )

            beside = (radii[name] + 5) / r
            shadow = _trus_at(case, ray(0.0)).mean()
            assert shadow < 0.7 * np.mean(
                [_trus_at(case, ray(beside)).mean(), _trus_at(case, ray(-beside)).mean()]
            )
            checked += 1
    assert checked >= 2
