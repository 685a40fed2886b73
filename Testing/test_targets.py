"""Biopsy targets (airreg.targets and ``airreg register --targets/--segmentation``): file formats, frames, bad
input, and mapped phantom landmarks and label maps checked against the phantoms' ground truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from airreg import geometry, phantom, resampling, targets
from airreg.cli import main
from airreg.errors import InputError

LABELS = ("lesion_1", "apex, left", "base")
POINTS_LPS = np.array([[12.5, -30.25, 41.0], [-3.0, 7.125, -88.5], [100.0, 200.0, 300.0]])


@pytest.fixture(scope="module")
def case() -> phantom.PhantomCase:
    return phantom.generate_case(3)


def landmark_targets(case: phantom.PhantomCase) -> tuple[targets.Targets, np.ndarray]:
    """The phantom's MR landmarks as targets, and its TRUS landmarks (N, 3) in the same order."""
    names = tuple(name for name, _, _ in case.landmarks)
    mr = np.array([m for _, m, _ in case.landmarks])
    return targets.Targets(names, mr), np.array([t for _, _, t in case.landmarks])


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_targets_need_only_numpy_and_simpleitk():
    """Slicer's Python has no torch, tqdm or matplotlib: the targets module must import without them."""
    code = (
        "import sys\n"
        "for name in ('torch', 'tqdm', 'matplotlib', 'scipy'): sys.modules[name] = None\n"
        "import airreg.targets\n"
        "print(sorted(m for m in sys.modules if m.startswith('airreg')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (
        done.stdout.strip()
        == "['airreg', 'airreg.errors', 'airreg.fileio', 'airreg.geometry', 'airreg.targets', 'airreg.transform_files']"
    )


# --- frames and formats --------------------------------------------------------------------------------


def test_lps_ras_flip_and_round_trip():
    rng = np.random.default_rng(0)
    points = rng.normal(scale=100.0, size=(20, 3))
    np.testing.assert_array_equal(targets.lps_to_ras(np.array([1.0, 2.0, 3.0])), [-1.0, -2.0, 3.0])
    np.testing.assert_array_equal(targets.ras_to_lps(targets.lps_to_ras(points)), points)
    np.testing.assert_array_equal(targets.Targets(("a",) * 20, points).points_ras, targets.lps_to_ras(points))


@pytest.mark.parametrize("suffix", [".csv", ".mrk.json"])
def test_written_targets_read_back(tmp_path, suffix):
    written = targets.write_targets(
        tmp_path / f"t{suffix}", targets.Targets(LABELS, POINTS_LPS), space="TRUS"
    )
    back = targets.read_targets(written, space="TRUS")
    assert back.labels == LABELS
    np.testing.assert_allclose(back.points_lps, POINTS_LPS, atol=1e-9)
    assert [p.name for p in tmp_path.iterdir()] == [f"t{suffix}"]  # no temporary files left


def test_csv_has_both_frames_and_says_which(tmp_path):
    path = targets.write_targets(tmp_path / "t.csv", targets.Targets(LABELS, POINTS_LPS), space="TRUS")
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#") and "space=TRUS" in lines[0] and "LPS" in lines[0] and "RAS" in lines[0]
    assert lines[1] == "label,x_lps,y_lps,z_lps,x_ras,y_ras,z_ras"
    first = lines[2].split(",")
    assert first[0] == "lesion_1"
    np.testing.assert_allclose([float(v) for v in first[1:]], [12.5, -30.25, 41.0, -12.5, 30.25, 41.0])
    assert lines[3].startswith('"apex, left",')  # a label with a comma is quoted


def test_csv_frame_declared_in_a_comment_or_by_column_names(tmp_path):
    ras = targets.lps_to_ras(POINTS_LPS)
    rows_lps = "".join(f"{n},{x},{y},{z}\n" for n, (x, y, z) in zip("abc", POINTS_LPS, strict=True))
    rows_ras = "".join(f"{n},{x},{y},{z}\n" for n, (x, y, z) in zip("abc", ras, strict=True))
    files = {
        "lps": write(tmp_path / "lps.csv", "# frame=LPS\nlabel,x,y,z\n" + rows_lps),
        "ras": write(tmp_path / "ras.csv", "# my targets; frame=RAS; units=mm\nlabel,x,y,z\n" + rows_ras),
        "ras_columns": write(tmp_path / "rc.csv", "name,x_ras,y_ras,z_ras\n" + rows_ras),
    }
    for path in files.values():
        read = targets.read_targets(path)
        assert read.labels == ("a", "b", "c")
        np.testing.assert_allclose(read.points_lps, POINTS_LPS, atol=1e-12)


def test_markups_in_ras_and_micrometres(tmp_path):
    markup = {
        "type": "Fiducial",
        "coordinateSystem": "RAS",
        "coordinateUnits": "um",
        "controlPoints": [
            {"label": "L1", "position": [-1000.0, 2000.0, 3000.0], "positionStatus": "defined"}
        ],
    }
    path = write(
        tmp_path / "t.mrk.json", json.dumps({"@schema": targets.MARKUPS_SCHEMA, "markups": [markup]})
    )
    read = targets.read_targets(path)
    assert read.labels == ("L1",)
    np.testing.assert_allclose(read.points_lps, [[1.0, -2.0, 3.0]])


def test_markups_file_follows_slicers_schema(tmp_path):
    path = targets.write_targets(tmp_path / "t.mrk.json", targets.Targets(LABELS, POINTS_LPS), name="Targets")
    document = json.loads(path.read_text())
    assert document["@schema"].endswith("markups-schema-v1.0.3.json#")
    (markup,) = document["markups"]
    assert (markup["type"], markup["coordinateSystem"], markup["coordinateUnits"]) == (
        "Fiducial",
        "LPS",
        "mm",
    )
    assert markup["name"] == "Targets"
    assert [p["label"] for p in markup["controlPoints"]] == list(LABELS)
    np.testing.assert_allclose([p["position"] for p in markup["controlPoints"]], POINTS_LPS)


# --- bad input -----------------------------------------------------------------------------------------

BAD_CSV = {
    "no frame": ("label,x,y,z\na,1,2,3\n", "line 1: columns x,y,z need a frame"),
    "unknown frame": ("# frame=XYZ\nlabel,x,y,z\na,1,2,3\n", "line 1: frame=XYZ is not one of LPS, RAS"),
    "no label column": ("# frame=LPS\nx,y,z\n1,2,3\n", "line 2: the header has no 'label'"),
    "no coordinates": ("# frame=LPS\nlabel,u,v\na,1,2\n", "line 2: no coordinate columns"),
    "not a number": (
        "# frame=LPS\nlabel,x,y,z\na,1,2,3\nb,1,two,3\n",
        "line 4: a coordinate is not a number",
    ),
    "missing values": ("# frame=LPS\nlabel,x,y,z\na,1,2\n", "line 3: missing values"),
    "nan": ("# frame=RAS\nlabel,x,y,z\na,1,nan,3\n", "line 3: a coordinate is NaN or Inf"),
    "frames disagree": (
        "label,x_lps,y_lps,z_lps,x_ras,y_ras,z_ras\na,1,2,3,1,2,3\n",
        "line 2: the LPS and RAS",
    ),
    "header only": ("# frame=LPS\nlabel,x,y,z\n", "no targets (the file has a header only)"),
    "empty": ("# frame=LPS\n", "empty targets file"),
    "TRUS space": ("# space=TRUS frame=LPS\nlabel,x,y,z\na,1,2,3\n", "declares space=TRUS"),
}


@pytest.mark.parametrize("name", BAD_CSV)
def test_bad_csv_is_refused_naming_file_and_line(tmp_path, name):
    text, message = BAD_CSV[name]
    path = write(tmp_path / "targets.csv", text)
    with pytest.raises(InputError) as raised:
        targets.read_targets(path)
    assert str(path) in str(raised.value) and message in str(raised.value)
    assert "\n" not in str(raised.value)


def _markups(**changes) -> str:
    point = {"label": "T1", "position": [1.0, 2.0, 3.0], "positionStatus": "defined"}
    markup = {"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": [point]}
    for key, value in changes.items():
        (point if key in point else markup)[key] = value
    return json.dumps({"@schema": targets.MARKUPS_SCHEMA, "markups": [markup]}, indent=2)


BAD_MARKUPS = {
    "invalid JSON": ('{\n  "markups": [\n    {"type": "Fiducial",,}\n  ]\n}', "line 3: not valid JSON"),
    "no markups": ('{"@schema": "x"}', "not a Slicer markups file"),
    "a curve": (_markups(type="Curve"), "markups[0] is a 'Curve' markup; expected a point list"),
    "bad frame": (_markups(coordinateSystem="XYZ"), "markups[0]: coordinateSystem 'XYZ'"),
    "bad units": (_markups(coordinateUnits="cm"), "coordinateUnits 'cm'"),
    "undefined": (_markups(positionStatus="undefined"), "controlPoints[0] ('T1') has no position"),
    "two numbers": (_markups(position=[1.0, 2.0]), "controlPoints[0] ('T1'): position must be 3 finite"),
    "no points": (_markups(controlPoints=[]), "the point list has no control points"),
}


@pytest.mark.parametrize("name", BAD_MARKUPS)
def test_bad_markups_are_refused_naming_file_and_element(tmp_path, name):
    text, message = BAD_MARKUPS[name]
    path = write(tmp_path / "targets.mrk.json", text)
    with pytest.raises(InputError) as raised:
        targets.read_targets(path)
    assert str(path) in str(raised.value) and message in str(raised.value)


def test_unknown_or_missing_files_are_refused(tmp_path):
    with pytest.raises(InputError, match="targets file not found"):
        targets.read_targets(tmp_path / "none.csv")
    with pytest.raises(InputError, match="unknown targets file type"):
        targets.read_targets(write(tmp_path / "t.txt", "label,x,y,z\n"))
    with pytest.raises(InputError, match="unknown targets file type"):
        targets.write_targets(tmp_path / "out.txt", targets.Targets(LABELS, POINTS_LPS))
    with pytest.raises(InputError, match="unknown label-map file type"):
        targets.write_label_image(tmp_path / "seg.png", sitk.Image(4, 4, 4, sitk.sitkUInt8))
    assert list(tmp_path.iterdir()) == [tmp_path / "t.txt"]


def label_file(tmp_path: Path, array: np.ndarray, name: str = "seg.nrrd", vector: bool = False) -> Path:
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path))
    return path


def test_bad_label_maps_are_refused(tmp_path):
    labels = np.zeros((4, 5, 6), np.uint8)
    with pytest.raises(InputError, match="non-integer voxel values"):
        targets.read_label_image(label_file(tmp_path, labels + np.float32(0.5), "f.nrrd"))
    with pytest.raises(InputError, match="holds no labels"):
        targets.read_label_image(label_file(tmp_path, labels, "zero.nrrd"))
    with pytest.raises(InputError, match="2D"):
        targets.read_label_image(label_file(tmp_path, np.ones((5, 6), np.uint8), "flat.nrrd"))
    with pytest.raises(InputError, match="4D"):
        targets.read_label_image(label_file(tmp_path, np.ones((2, 4, 5, 6), np.uint8), "layers.nrrd"))
    with pytest.raises(InputError, match="2 components per voxel"):
        targets.read_label_image(
            label_file(tmp_path, np.ones((4, 5, 6, 2), np.uint8), "vec.nrrd", vector=True)
        )
    with pytest.raises(InputError, match="segmentation file not found"):
        targets.read_label_image(tmp_path / "none.nrrd")
    whole = labels.astype(np.float32)
    whole[1, 2, 3] = 4.0
    read = targets.read_label_image(
        label_file(tmp_path, whole, "whole.nrrd")
    )  # whole-numbered floats: labels
    assert read.GetPixelID() == sitk.sitkInt32 and targets.label_values(read) == [4]


# --- against the phantoms' ground truth ----------------------------------------------------------------


def test_landmarks_mapped_with_the_ground_truth_land_on_the_trus_landmarks(case, tmp_path):
    mr_targets, trus_points = landmark_targets(case)
    mapped = mr_targets.mapped(case.gt)
    np.testing.assert_allclose(mapped.points_lps, trus_points, atol=1e-6)
    for suffix in (".csv", ".mrk.json"):  # and through the files
        back = targets.read_targets(targets.write_targets(tmp_path / f"t{suffix}", mapped), space="TRUS")
        assert back.labels == mr_targets.labels
        np.testing.assert_allclose(back.points_lps, trus_points, atol=1e-6)


def sphere_labels(image: sitk.Image, center_lps: np.ndarray, radius_mm: float, value: int) -> sitk.Image:
    """A label map on ``image``'s grid: ``value`` within ``radius_mm`` of ``center_lps``, 0 elsewhere."""
    size = image.GetSize()
    index = np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij"), -1).reshape(-1, 3)
    world = geometry.apply(resampling.index_to_world(image), index.astype(float))
    inside = np.linalg.norm(world - center_lps, axis=1) <= radius_mm
    array = np.zeros(size, np.uint16)
    array.reshape(-1)[inside] = value
    labels = sitk.GetImageFromArray(array.transpose(2, 1, 0).copy())  # (x, y, z) -> sitk's (z, y, x)
    labels.CopyInformation(image)
    return labels


def centroid_lps(labels: sitk.Image, value: int) -> np.ndarray:
    index = np.argwhere(sitk.GetArrayFromImage(labels) == value)[:, ::-1].astype(float)  # (i, j, k)
    return geometry.apply(resampling.index_to_world(labels), index).mean(axis=0)


def test_label_sphere_mapped_with_the_ground_truth_is_centred_on_the_trus_landmark(case, tmp_path):
    names = [name for name, _, _ in case.landmarks]
    _, mr_point, trus_point = case.landmarks[names.index("lesion_1")]
    labels = sphere_labels(case.mr, mr_point, 6.0, value=7)
    on_trus = targets.map_label_image(labels, case.gt, case.trus)
    assert on_trus.GetPixelID() == sitk.sitkUInt16 and targets.label_values(on_trus) == [7]
    for key in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
        assert getattr(on_trus, key)() == getattr(case.trus, key)()
    voxel = max(case.trus.GetSpacing())
    assert np.linalg.norm(centroid_lps(on_trus, 7) - trus_point) < voxel
    read = sitk.ReadImage(str(targets.write_label_image(tmp_path / "seg.nii.gz", on_trus)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(on_trus))


def test_segmentation_mapping_keeps_label_values_and_volume(case):
    mr_targets, _ = landmark_targets(case)
    labels = sphere_labels(case.mr, mr_targets.points_lps[mr_targets.labels.index("lesion_1")], 8.0, 3)
    other = sphere_labels(case.mr, mr_targets.points_lps[mr_targets.labels.index("apex")], 5.0, 250)
    both = sitk.Maximum(labels, other)
    on_trus = targets.map_label_image(both, case.gt, case.trus)
    assert targets.label_values(on_trus) == [3, 250]
    for value in (3, 250):  # a rigid map keeps volumes (up to the two grids' sampling)
        mr_volume = np.count_nonzero(sitk.GetArrayViewFromImage(both) == value) * np.prod(
            case.mr.GetSpacing()
        )
        trus_volume = np.count_nonzero(sitk.GetArrayViewFromImage(on_trus) == value) * np.prod(
            case.trus.GetSpacing()
        )
        assert trus_volume == pytest.approx(mr_volume, rel=0.15)


# --- the command line ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registered(case, tmp_path_factory) -> dict:
    """``airreg register`` with the bundled model on the phantom pair from a 3-DOF start off the ground truth,
    with the MR landmarks as targets (CSV in RAS) and a label sphere as the segmentation."""
    folder = tmp_path_factory.mktemp("targets-cli")
    for name, image in (("mr", case.mr), ("trus", case.trus)):
        sitk.WriteImage(image, str(folder / f"{name}.nrrd"))
    offset = geometry.RigidTransform.from_vector([8.0, 3.0, -2.5], 3).matrix
    start = case.gt @ geometry.to_world(offset, resampling.mr_frame(case.mr))
    geometry.write_transform(folder / "start.tfm", start)
    mr_targets, trus_points = landmark_targets(case)
    ras = mr_targets.points_ras
    rows = "".join(f"{n},{x},{y},{z}\n" for n, (x, y, z) in zip(mr_targets.labels, ras.tolist(), strict=True))
    write(folder / "targets.csv", "# MR targets; frame=RAS\nlabel,x,y,z\n" + rows)
    lesion = mr_targets.points_lps[mr_targets.labels.index("lesion_1")]
    sitk.WriteImage(sphere_labels(case.mr, lesion, 6.0, 5), str(folder / "seg.nrrd"))
    out = folder / "out"
    args = ["register", "--mr", str(folder / "mr.nrrd"), "--trus", str(folder / "trus.nrrd")]
    args += ["--init", str(folder / "start.tfm"), "--device", "cpu", "--out-transform", str(out / "t.tfm")]
    args += ["--report", str(out / "report.json"), "--targets", str(folder / "targets.csv")]
    args += ["--out-targets", str(out / "targets_trus.csv"), "--segmentation", str(folder / "seg.nrrd")]
    args += ["--out-segmentation", str(out / "seg_trus.nrrd")]
    assert main(args) == 0
    return {"folder": folder, "out": out, "start": start, "trus_points": trus_points, "mr": mr_targets}


def test_register_maps_the_targets_onto_the_trus_landmarks_within_the_registrations_tre(case, registered):
    out, mr_targets = registered["out"], registered["mr"]
    mapped = targets.read_targets(out / "targets_trus.csv", space="TRUS")
    assert mapped.labels == mr_targets.labels
    result = geometry.read_transform(out / "t.tfm")
    errors = np.linalg.norm(mapped.points_lps - registered["trus_points"], axis=1)
    # each target is off by exactly the registration's error at that landmark (its TRE there) ...
    tre = np.linalg.norm(
        geometry.apply(result, mr_targets.points_lps) - geometry.apply(case.gt, mr_targets.points_lps), axis=1
    )
    np.testing.assert_allclose(errors, tre, atol=1e-5)
    # ... and the registration did its job: closer than the start, and within the model's measured accuracy
    start_tre = np.linalg.norm(
        geometry.apply(registered["start"], mr_targets.points_lps) - registered["trus_points"], axis=1
    )
    assert errors.mean() < start_tre.mean()
    assert errors.mean() < 2.0  # measured: 3.6 mm at the start, 1.0 mm after


def test_register_report_keeps_the_file_names_and_model_hash_together(registered):
    folder, out = registered["folder"], registered["out"]
    report = json.loads((out / "report.json").read_text())
    assert len(report["model_sha256"]) == 64
    assert report["targets"]["file"] == str(folder / "targets.csv")
    assert report["targets"]["output_file"] == str(out / "targets_trus.csv")
    assert report["targets"]["count"] == len(registered["mr"])
    assert report["segmentation"]["file"] == str(folder / "seg.nrrd")
    assert report["segmentation"]["output_file"] == str(out / "seg_trus.nrrd")
    assert report["segmentation"]["labels"] == [5]
    assert report["segmentation"]["labels_outside_trus_volume"] == []
    assert sorted(p.name for p in out.iterdir()) == [
        "report.json",
        "seg_trus.nrrd",
        "t.tfm",
        "targets_trus.csv",
    ]


def test_register_segmentation_lands_on_the_trus_grid(case, registered):
    on_trus = sitk.ReadImage(str(registered["out"] / "seg_trus.nrrd"))
    assert on_trus.GetSize() == case.trus.GetSize()
    np.testing.assert_allclose(on_trus.GetOrigin(), case.trus.GetOrigin(), atol=1e-9)
    assert targets.label_values(on_trus) == [5]
    index = registered["mr"].labels.index("lesion_1")
    lesion_mr, lesion_trus = registered["mr"].points_lps[index], registered["trus_points"][index]
    tre = np.linalg.norm(
        geometry.apply(geometry.read_transform(registered["out"] / "t.tfm"), lesion_mr) - lesion_trus
    )
    # the sphere's centre is off by the registration's error there, plus the grids' sampling (a TRUS voxel)
    assert np.linalg.norm(centroid_lps(on_trus, 5) - lesion_trus) < tre + max(case.trus.GetSpacing())


def test_register_refuses_bad_targets_before_any_work(registered, tmp_path, capsys):
    folder = registered["folder"]
    pair = [
        "register",
        "--mr",
        str(folder / "mr.nrrd"),
        "--trus",
        str(folder / "trus.nrrd"),
        "--device",
        "cpu",
    ]
    bad = write(tmp_path / "bad.csv", "label,x,y,z\na,1,2,3\n")
    cases = {
        "no frame": (
            ["--targets", str(bad), "--out-targets", str(tmp_path / "o.csv")],
            "line 1: columns x,y,z",
        ),
        "unpaired": (["--targets", str(folder / "targets.csv")], "--targets and --out-targets go together"),
        "replaces an input": (
            ["--segmentation", str(folder / "seg.nrrd"), "--out-segmentation", str(folder / "trus.nrrd")],
            "--out-segmentation would overwrite the input --trus",
        ),
        "replaces its input": (
            ["--targets", str(folder / "targets.csv"), "--out-targets", str(folder / "targets.csv")],
            "--out-targets would overwrite the input --targets",
        ),
        "bad output": (
            ["--segmentation", str(folder / "seg.nrrd"), "--out-segmentation", str(tmp_path / "s.png")],
            "unknown label-map file type",
        ),
    }
    inputs = {p: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    for extra, message in cases.values():
        assert main([*pair, "--out-transform", str(tmp_path / "t.tfm"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]  # nothing written
    assert {p: p.read_bytes() for p in folder.iterdir() if p.is_file()} == inputs  # no input replaced


def test_targets_and_labels_outside_the_trus_volume_are_reported(case, tmp_path):
    mr_targets, _ = landmark_targets(case)
    far = mr_targets.points_lps[0] + [0.0, 0.0, 300.0]  # 30 cm up the body: no TRUS covers it
    rows = [("lesion", mr_targets.points_lps[0]), ("far", far)]
    lines = ["# frame=LPS", "label,x,y,z", *(",".join([n, *map(str, p.tolist())]) for n, p in rows)]
    write(tmp_path / "t.csv", "\n".join(lines) + "\n")
    labels = sphere_labels(case.mr, mr_targets.points_lps[0], 5.0, 1)
    labels_array = sitk.GetArrayFromImage(labels)
    labels_array[0, 0, 0] = 2  # a corner of the MR, outside the TRUS fan's box
    corner = sitk.GetImageFromArray(labels_array)
    corner.CopyInformation(labels)
    sitk.WriteImage(corner, str(tmp_path / "s.nrrd"))
    files = targets.TargetFiles.read(
        tmp_path / "t.csv", tmp_path / "o.mrk.json", tmp_path / "s.nrrd", tmp_path / "o.nii.gz"
    )
    report = files.write(case.gt, case.trus)
    assert report["targets"]["outside_trus_volume"] == ["far"]
    assert report["segmentation"]["labels"] == [1, 2]
    assert report["segmentation"]["labels_outside_trus_volume"] == [2]
    assert targets.coverage_warnings(report) == [
        "targets outside the TRUS volume: far",
        "labels outside the TRUS volume: 2",
    ]
    assert targets.read_targets(tmp_path / "o.mrk.json", space="TRUS").labels == ("lesion", "far")
    assert targets.label_values(sitk.ReadImage(str(tmp_path / "o.nii.gz"))) == [1]
