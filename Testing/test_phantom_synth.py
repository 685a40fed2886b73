"""The ``synth`` phantom family: geometry checked through its files with SimpleITK alone, seeds, knobs, format."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from airreg import cli, data, phantom, phantom_synth

SEEDS = (0, 7)  # seed 7 draws a narrow fan (the gland must still fit) and 1.6 mm slices


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    made = {f"seed{s}": phantom.write_case(phantom_synth.generate_case(s), root / f"seed{s}") for s in SEEDS}
    made["deformed"] = phantom.write_case(phantom_synth.generate_case(0, deform=True), root / "deformed")
    return made


def _read(folder: Path, name: str) -> sitk.Image:
    return sitk.ReadImage(str(folder / f"{name}.nii.gz"))


def _landmarks(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with (folder / "landmarks.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {
        r["name"]: (
            np.array([float(r[f"mr_{a}"]) for a in "xyz"]),
            np.array([float(r[f"trus_{a}"]) for a in "xyz"]),
        )
        for r in rows
    }


def _centroid(mask: sitk.Image) -> np.ndarray:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    return np.array(stats.GetCentroid(1))


def _dice_after_resampling(folder: Path) -> float:
    """Dice of the MR gland mask and the TRUS gland mask resampled onto the MR grid with gt.tfm (SimpleITK only)."""
    mr_mask = _read(folder, "mr_prostate")
    transform = sitk.ReadTransform(str(folder / "gt.tfm"))
    moved = sitk.Resample(_read(folder, "trus_prostate"), mr_mask, transform, sitk.sitkNearestNeighbor, 0)
    a, b = sitk.GetArrayFromImage(moved) > 0, sitk.GetArrayFromImage(mr_mask) > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("seed", SEEDS)
def test_trus_mask_resampled_with_gt_overlaps_mr_mask(folders, seed):
    assert _dice_after_resampling(folders[f"seed{seed}"]) > 0.93


@pytest.mark.parametrize("seed", SEEDS)
def test_landmarks_map_through_gt_and_sit_on_the_gland(folders, seed):
    """gt.tfm maps every MR landmark onto its TRUS landmark, and the gland centroid landmark lies within a voxel
    of the centroid of each image's gland mask."""
    folder = folders[f"seed{seed}"]
    transform = sitk.ReadTransform(str(folder / "gt.tfm"))
    points = _landmarks(folder)
    for mr_point, trus_point in points.values():
        assert np.linalg.norm(np.array(transform.TransformPoint(mr_point.tolist())) - trus_point) < 1e-4
    for side, name in ((0, "mr_prostate"), (1, "trus_prostate")):
        mask = _read(folder, name)
        error = np.linalg.norm(_centroid(mask) - points["gland_centroid"][side])
        assert error < max(mask.GetSpacing())


def test_landmarks_lie_in_the_gland_on_both_sides(folders):
    folder = folders["seed0"]
    for side, name in ((0, "mr_prostate"), (1, "trus_prostate")):
        mask = _read(folder, name)
        array = sitk.GetArrayViewFromImage(mask)
        for landmark, pair in _landmarks(folder).items():
            if landmark.startswith(("lobe", "gland", "lesion")):
                i, j, k = mask.TransformPhysicalPointToIndex(pair[side].tolist())
                assert array[k, j, i] == 1, (landmark, name)


def test_deform_moves_only_the_trus_side(folders):
    rigid, deformed = folders["seed0"], folders["deformed"]
    for name in ("mr", "mr_prostate"):
        assert np.array_equal(
            sitk.GetArrayFromImage(_read(rigid, name)), sitk.GetArrayFromImage(_read(deformed, name))
        )
    assert (rigid / "gt.tfm").read_text() == (deformed / "gt.tfm").read_text()
    before, after = _landmarks(rigid), _landmarks(deformed)
    push = json.loads((deformed / "case.json").read_text())["probe_push"]["amplitude_mm"]
    moved = [np.linalg.norm(after[n][1] - before[n][1]) for n in before]
    assert max(moved) > 0.2 and max(moved) <= push + 1e-6
    assert 0.8 < _dice_after_resampling(deformed) < _dice_after_resampling(rigid)


def test_radial_push_forward_inverts_backward():
    rng = np.random.default_rng(0)
    probe = np.eye(4)
    push = phantom_synth._RadialPush(probe, 10.0, 3.0, 12.0, 20.0, 0.0)
    points = rng.uniform(-30, 30, (3, 50))
    for p in points.T:
        assert np.allclose(push.backward(push.forward(p).reshape(3, 1))[:, 0], p, atol=1e-6)


def test_same_seed_same_case_and_different_seed_different_case(folders):
    again = phantom_synth.generate_case(0)
    first = folders["seed0"]
    assert np.array_equal(sitk.GetArrayFromImage(again.mr), sitk.GetArrayFromImage(_read(first, "mr")))
    assert np.array_equal(sitk.GetArrayFromImage(again.trus), sitk.GetArrayFromImage(_read(first, "trus")))
    assert json.loads((first / "case.json").read_text()) == json.loads(json.dumps(again.params))
    other = json.loads((folders["seed7"] / "case.json").read_text())
    assert other["gt"] != again.params["gt"] and other["mr"]["spacing_mm"] != again.params["mr"]["spacing_mm"]


@pytest.mark.parametrize("seed", SEEDS)
def test_drawn_values_lie_within_the_knobs(folders, seed):
    params = json.loads((folders[f"seed{seed}"] / "case.json").read_text())
    knobs = phantom_synth.KNOBS
    assert params["family"] == "synth" and params["knobs"] == json.loads(json.dumps(vars(knobs)))
    mr, trus = params["mr"], params["trus"]

    def inside(value, bounds) -> bool:
        return bounds[0] - 1e-6 <= value <= bounds[1] + 1e-6

    assert inside(mr["spacing_mm"][0], knobs.mr_inplane_mm) and mr["spacing_mm"][0] == mr["spacing_mm"][1]
    assert inside(mr["spacing_mm"][2], knobs.mr_slice_mm)
    assert inside(mr["fov_drawn_mm"], knobs.mr_fov_mm)
    assert mr["size"][0] * mr["spacing_mm"][0] >= min(mr["fov_drawn_mm"], 320 * mr["spacing_mm"][0]) - 1
    assert inside(mr["spacing_mm"][0], (max(knobs.mr_inplane_mm[0], 0.75 - 0.15 * mr["spacing_mm"][2]), 0.9))
    assert inside(abs(mr["oblique_deg"][0]), (0, knobs.mr_oblique_deg[1]))
    assert inside(trus["half_angle_deg"], knobs.fan_half_angle_deg)
    assert inside(trus["frequency_mhz"], knobs.frequency_mhz)
    assert inside(trus["speckle_scale"], knobs.speckle_scale)
    assert inside(params["probe_push"]["amplitude_mm"], knobs.push_mm)
    assert np.all(np.abs(params["gt"]["angles_deg"]) <= knobs.gt_rotation_deg)
    assert inside(
        params["anatomy"]["gland_volume_ml"], (0.5 * knobs.gland_volume_ml[0], 1.5 * knobs.gland_volume_ml[1])
    )


def test_knobs_drive_the_draws():
    knobs = replace(
        phantom_synth.KNOBS, mr_slice_mm=(2.5, 2.5), mr_inplane_mm=(0.8, 0.8), frequency_mhz=(6.0, 6.0)
    )
    case = phantom_synth.generate_case(3, knobs=knobs)
    assert np.allclose(case.mr.GetSpacing(), (0.8, 0.8, 2.5))
    assert case.params["trus"]["frequency_mhz"] == 6.0


def test_images_are_valid_cases_with_contrast(folders):
    case = data.read_case(folders["seed0"], require_gt=True)
    mr, trus = sitk.GetArrayFromImage(case.mr), sitk.GetArrayFromImage(case.trus)
    trus_mask = sitk.GetArrayFromImage(case.trus_mask) > 0
    assert case.landmark_names[:2] == ("gland_centroid", "apex")
    assert mr.std() > 0.05 * mr.max() and 0 < trus.max() <= 255
    assert trus[~trus_mask].mean() != pytest.approx(trus[trus_mask].mean(), rel=0.02)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixture")
    phantom.generate_dataset(root, 2, seed=5, family="mixture", progress=False)
    return root


def test_mixture_folder_reads_as_one_dataset(mixture):
    families = [
        json.loads((f / "case.json").read_text()).get("family", "classic") for f in sorted(mixture.iterdir())
    ]
    assert families == ["classic", "synth"]
    cases = data.load_dataset(mixture, progress=False)
    assert [c.case_id for c in cases] == ["case0000", "case0001"] and all(c.gt is not None for c in cases)


def test_train_and_evaluate_on_a_mixed_folder(mixture, tmp_path, capsys):
    run, options = tmp_path / "run", ["--device", "cpu"]
    train = ["train", "--data", str(mixture), "--out", str(run), "--preset", "tiny", "--epochs", "1"]
    assert cli.main([*train, "--steps-per-epoch", "1", "--batch-size", "2", "--augment", *options]) == 0
    evaluate = [
        "evaluate",
        "--data",
        str(mixture),
        "--model",
        str(run / "model.pt"),
        "--out",
        str(tmp_path / "e"),
    ]
    assert cli.main([*evaluate, "--overlays", "0", "--iterations", "1", *options]) == 0
    rows = (tmp_path / "e" / "cases.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("case0000") and rows[2].startswith("case0001")


def test_cli_phantom_family(tmp_path, capsys):
    assert (
        cli.main(["phantom", "--out", str(tmp_path / "s"), "--cases", "1", "--family", "synth", "--preview"])
        == 0
    )
    params = json.loads((tmp_path / "s" / "case0000" / "case.json").read_text())
    assert (
        params["family"] == "synth" and (tmp_path / "s" / "case0000" / "preview.png").stat().st_size > 10_000
    )
    with pytest.raises(SystemExit):
        cli.main(["phantom", "--out", str(tmp_path / "x"), "--family", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_unknown_family_is_an_input_error():
    with pytest.raises(phantom.InputError, match="unknown phantom family 'x'"):
        phantom.case_generator("x")


def test_write_gallery_of_both_families(folders, tmp_path):
    classic = phantom.write_case(phantom.generate_case(1), tmp_path / "classic")
    png = phantom.write_gallery([classic, folders["seed7"]], tmp_path / "gallery.png")
    image = sitk.ReadImage(str(png))
    assert image.GetSize() == (2 * 208, 432)  # 2.6 x 5.4 inches per column at 80 dpi
    assert np.asarray(sitk.GetArrayViewFromImage(image)).std() > 20
