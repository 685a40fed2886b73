"""``airreg benchmark --quick``: the report's structure, on three small synthetic cases with gland masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from airreg import benchmark, data, geometry, resampling
from conftest import make_case

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GLAND_RADIUS_MM = 15.0


def _sphere_mask(image: sitk.Image, to_mr: np.ndarray, center: np.ndarray) -> sitk.Image:
    """1 where ``to_mr`` maps the voxel within GLAND_RADIUS_MM of ``center`` (an MR point)."""
    size = image.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1).reshape(-1, 3)
    world = geometry.apply(to_mr @ resampling.index_to_world(image), idx.astype(float))
    inside = np.linalg.norm(world - center, axis=1) < GLAND_RADIUS_MM
    mask = sitk.GetImageFromArray(inside.reshape(size).transpose(2, 1, 0).astype(np.uint8))
    mask.CopyInformation(image)
    return mask


@pytest.fixture(scope="module")
def masked_dataset(tmp_path_factory) -> Path:
    """Three conftest-style cases with MR and TRUS gland masks (a sphere about the MR centre)."""
    root = tmp_path_factory.mktemp("bench-data")
    for i in range(3):
        case = make_case(300 + i)
        center = resampling.physical_center(case.mr)
        data.write_case(
            root / f"case{i:03d}",
            case.mr,
            case.trus,
            gt=case.gt,
            landmarks=(case.names, case.mr_points, case.trus_points),
            mr_mask=_sphere_mask(case.mr, np.eye(4), center),
            trus_mask=_sphere_mask(case.trus, geometry.invert(case.gt), center),
        )
    return root


@pytest.fixture(scope="module")
def quick_report(masked_dataset, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    report = benchmark.run_benchmark(
        masked_dataset,
        out,
        tiny_model,
        dofs=(3, 6),
        quick=True,
        seed=7,
        progress=False,
        device="cpu",
        elastix=False,
    )  # elastix's module takes ~40 s to load: covered by the slow test below and the CLI run
    return report, out


def test_every_method_has_finite_figures_for_each_protocol(quick_report):
    report, out = quick_report
    expected = [benchmark.START, benchmark.CENTRES, benchmark.MI, benchmark.MI_MASKS]
    expected += [benchmark.AIR_ONE, benchmark.AIR_ITER]
    assert report["methods"] == expected
    assert benchmark.ELASTIX in report["skipped_methods"]
    assert set(report["protocols"]) == {"3-DOF", "6-DOF"}
    for proto in report["protocols"].values():
        assert proto["cases"] == benchmark.QUICK_CASES
        assert list(proto["methods"]) == expected
        for s in proto["methods"].values():
            for key in ("mean", "median", "p90", "under_2mm", "under_5mm", "median_seconds"):
                assert np.isfinite(s[key]), key
            assert s["median_seconds"] > 0
            assert 0 <= s["failures"] <= proto["cases"]
            assert s["peak_python_mb"] >= 0 and s["peak_rss_increase_mb"] >= 0
        assert proto["methods"][benchmark.START]["failures"] == 0
        assert proto["methods"][benchmark.AIR_ONE]["time_ratio_to_airnet_one_pass"] == pytest.approx(1.0)
        rows = proto["per_case"]
        assert len(rows) == len(expected) * proto["cases"]
        assert all(np.isfinite(r["tre_mm"]) and r["seconds"] > 0 for r in rows)
        # identical starts for every method: the start's TRE of a case is the same in every row
        for case in {r["case"] for r in rows}:
            assert len({round(r["tre_start_mm"], 9) for r in rows if r["case"] == case}) == 1


def test_mutual_information_improves_on_the_start(quick_report):
    """Blob images with a monotone intensity map: MI must beat the ±25°/±5 mm start even with few iterations."""
    report, _ = quick_report
    s = report["protocols"]["3-DOF"]["methods"]
    assert s[benchmark.MI]["mean"] < s[benchmark.START]["mean"]


def test_latency_throughput_and_machine(quick_report):
    report, _ = quick_report
    lat = report["latency"]
    assert {(r["threads"], r["batch"]) for r in lat} >= {(1, 1), (1, 16), (2, 1), (2, 16)}
    for r in lat:
        for key in ("resampling_ms", "generator_ms", "discriminator_ms", "total_ms"):
            assert r[key] > 0, key
    assert [r["preset"] for r in report["throughput"]] == ["tiny", "default"]
    assert all(r["pairs_per_second"] > 0 and r["peak_rss_mb"] > 0 for r in report["throughput"])
    assert "paper" in report["throughput_skipped"]
    assert report["machine"]["cpu"] and report["machine"]["torch"]


def test_files_written(quick_report):
    report, out = quick_report
    saved = json.loads((out / "benchmark.json").read_text())
    assert saved["protocols"].keys() == report["protocols"].keys()
    md = (out / "benchmark.md").read_text()
    for heading in ("## 3-DOF starts", "## 6-DOF starts", "## AIR-net latency", "## Training throughput"):
        assert heading in md
    assert "## Machine" in md and "Command: `run_benchmark(" in md
    assert md.count("| MI+masks |") == 2
    for name in ("tre_boxplots.png", "dscore_vs_tre.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE


def test_cli_builds_the_command_line():
    from airreg.cli import build_parser

    args = build_parser().parse_args(["benchmark", "--data", "d", "--out", "o", "--dof", "3", "--quick"])
    assert benchmark.command_line(args) == "airreg benchmark --data d --out o --dof 3 --seed 4242 --quick"


def test_mi_failure_is_counted_not_raised(masked_dataset):
    """A start that puts TRUS outside the MR field makes ITK raise; the case keeps its start."""
    case = data.read_case(masked_dataset / "case000", require_gt=True)
    far = case.gt.copy()
    far[:3, 3] += 500.0
    transform, seconds, error = benchmark._run_one(benchmark.mi_registration(iterations=2), case, far)
    assert error is not None and np.array_equal(transform, far) and seconds > 0


@pytest.mark.slow
def test_elastix_recovers_a_start(masked_dataset):
    pytest.importorskip("itk")
    ok, why = benchmark.elastix_status()
    if not ok:
        pytest.skip(why)
    case = data.read_case(masked_dataset / "case000", require_gt=True)
    start = benchmark.random_starts([case], 3, seed=3)[0]
    points = benchmark.tre_points(case)
    result = benchmark.elastix_registration(iterations=60)(case, start)
    assert benchmark.tre_mm(result, points) < benchmark.tre_mm(start, points)


def test_latency_only_with_upsampled_trus(masked_dataset, tiny_model, tmp_path):
    report = benchmark.run_benchmark(
        masked_dataset,
        tmp_path,
        tiny_model,
        quick=True,
        progress=False,
        device="cpu",
        latency_only=True,
        threads=(1,),
        batch=4,
        bf16=True,
        trus_spacing_mm=0.6,
    )
    assert report["protocols"] == {} and report["throughput"] == [] and report["methods"] == []
    rows = {(r["threads"], r["batch"], r["autocast"]): r for r in report["latency"]}
    assert set(rows) == {(1, 1, "off"), (1, 4, "off"), (1, 4, "bf16")}
    assert rows[(1, 1, "off")]["cpu_ms"] > 0 and np.isfinite(rows[(1, 1, "off")]["mean_tre_mm"])
    original = np.prod(data.read_case(masked_dataset / "case000").trus.GetSize()) / 1e6
    assert report["inputs"]["trus_megavoxels"] == pytest.approx(original * (0.9 / 0.6) ** 3, rel=0.1)
    md = (tmp_path / "benchmark.md").read_text()
    assert "upsampled: TRUS to 0.6 mm" in md and "## Methods" not in md and "## Training" not in md
    assert not (tmp_path / "tre_boxplots.png").exists()


def test_upsampled_keeps_the_physical_box_and_the_values():
    image = make_case(5).trus
    fine = benchmark.upsampled(image, [0.45] * 3)
    assert fine.GetSize() == tuple(2 * (n - 1) + 1 for n in image.GetSize())
    assert fine.GetOrigin() == image.GetOrigin() and fine.GetDirection() == image.GetDirection()
    np.testing.assert_allclose(  # every other fine voxel is an original voxel
        sitk.GetArrayViewFromImage(fine)[::2, ::2, ::2], sitk.GetArrayViewFromImage(image), atol=1e-3
    )


def test_cli_builds_the_latency_command_line():
    from airreg.cli import build_parser

    argv = [
        "benchmark",
        "--data",
        "d",
        "--out",
        "o",
        "--latency-only",
        "--threads",
        "1",
        "--trus-spacing",
        "0.21",
    ]
    args = build_parser().parse_args(argv)
    assert benchmark.command_line(args) == (
        "airreg benchmark --data d --out o --dof both --seed 4242 --latency-only --threads 1 --trus-spacing 0.21"
    )
