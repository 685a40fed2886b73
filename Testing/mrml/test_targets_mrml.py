"""Biopsy targets in the MRML bridge on real MRML nodes (``slicer-core``, no Slicer application): point lists,
segmentations and label maps on the MR mapped into TRUS space, checked against phantom landmarks, and their
exports read by Slicer's own storage node and by SimpleITK.

What the Slicer application adds and this cannot show: the Segmentations module registers the representation
converters at startup (``register_segmentation_converters`` does what it does); the panel's buttons.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):  # the unrelated PyPI package named "slicer"
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

from airreg import geometry, phantom, resampling, targets  # noqa: E402
from airreg.errors import InputError  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parents[2] / "AIRRegistration"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from AIRRegistrationLib import mrml_bridge as bridge  # noqa: E402

pytestmark = pytest.mark.slicer


# --- fixtures and helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def register_segmentation_converters() -> None:
    """What Slicer's Segmentations module does at startup (qSlicerSegmentationsModule::setup): register the
    binary label map <-> closed surface converters, without which a segmentation holds no label maps."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
    ):
        factory.RegisterConverterRule(rule())


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(1)


@pytest.fixture(scope="module")
def case() -> phantom.PhantomCase:
    return phantom.generate_case(3)


def landmarks(case) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    names = tuple(name for name, _, _ in case.landmarks)
    return names, np.array([m for _, m, _ in case.landmarks]), np.array([t for _, _, t in case.landmarks])


def add_points(scene, names, points_lps: np.ndarray, name="MR targets"):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for label, point in zip(names, targets.lps_to_ras(points_lps), strict=True):
        index = node.AddControlPoint([float(v) for v in point], label)
        node.SetNthControlPointDescription(index, f"about {label}")
    return node


def add_transform(scene, to_parent_ras: np.ndarray, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(bridge.vtk_matrix_from_array(to_parent_ras))
    return node


def positions(node, world: bool) -> np.ndarray:
    """LPS positions of a point list's control points (world, or the node's own coordinates)."""
    return bridge.targets_from_markups_node(node, world=world).points_lps


def sphere_labels(image: sitk.Image, centers_lps, radius_mm: float, values) -> sitk.Image:
    """A label map on ``image``'s grid: ``values[i]`` within ``radius_mm`` of ``centers_lps[i]``."""
    size = image.GetSize()
    index = np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij"), -1).reshape(-1, 3)
    world = geometry.apply(resampling.index_to_world(image), index.astype(float))
    array = np.zeros(size, np.int16)
    for center, value in zip(centers_lps, values, strict=True):
        array.reshape(-1)[np.linalg.norm(world - center, axis=1) <= radius_mm] = value
    labels = sitk.GetImageFromArray(array.transpose(2, 1, 0).copy())
    labels.CopyInformation(image)
    return labels


def add_labelmap(scene, labels: sitk.Image, name="MR labels"):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    bridge.update_volume_node_from_image(node, labels)
    return node


def centroid_lps(image: sitk.Image, value: int) -> np.ndarray:
    index = np.argwhere(sitk.GetArrayFromImage(image) == value)[:, ::-1].astype(float)
    return geometry.apply(resampling.index_to_world(image), index).mean(axis=0)


def trus_pair(scene, case, mr_to_trus_parent: np.ndarray | None = None):
    """MR and TRUS volume nodes; the TRUS under a transform holding ``mr_to_trus_parent`` when given."""
    mr = bridge.add_volume_node_from_image(scene, case.mr, "MR")
    trus = bridge.add_volume_node_from_image(scene, case.trus, "TRUS")
    if mr_to_trus_parent is not None:
        parent = add_transform(scene, geometry.lps_resampling_to_ras_modeling(mr_to_trus_parent), "result")
        trus.SetAndObserveTransformNodeID(parent.GetID())
    return mr, trus


# --- point lists -----------------------------------------------------------------------------------------


def test_point_list_mapped_with_the_ground_truth_lands_on_the_trus_landmarks(scene, case):
    names, mr_points, trus_points = landmarks(case)
    _, trus = trus_pair(scene, case, case.gt)
    source = add_points(scene, names, mr_points)
    before = (positions(source, world=False).copy(), source.GetMTime(), source.GetNumberOfControlPoints())
    mapped = bridge.map_markups_to_trus(source, case.gt, trus)
    assert mapped.IsA("vtkMRMLMarkupsFiducialNode") and mapped.GetName() == "MR targets (TRUS)"
    np.testing.assert_allclose(positions(mapped, world=False), trus_points, atol=1e-6)  # TRUS coordinates
    np.testing.assert_allclose(positions(mapped, world=True), mr_points, atol=1e-6)  # shown on the MR targets
    assert mapped.GetTransformNodeID() == trus.GetTransformNodeID()
    assert [mapped.GetNthControlPointLabel(i) for i in range(len(names))] == list(names)
    assert mapped.GetNthControlPointDescription(0) == f"about {names[0]}"
    np.testing.assert_array_equal(positions(source, world=False), before[0])  # input untouched
    assert (source.GetMTime(), source.GetNumberOfControlPoints()) == before[1:]


def test_targets_are_read_where_slicer_shows_them(scene, case):
    """An MR point list under a transform (as the MR volume is) is mapped from its world positions."""
    names, mr_points, trus_points = landmarks(case)
    mr_file_to_world = geometry.RigidTransform((3.0, -5.0, 12.0), (10.0, -4.0, 7.0)).matrix  # LPS
    moved = add_transform(scene, geometry.RAS_TO_LPS @ mr_file_to_world @ geometry.RAS_TO_LPS, "MR placement")
    source = add_points(scene, names, mr_points)
    source.SetAndObserveTransformNodeID(moved.GetID())
    world_to_trus = case.gt @ geometry.invert(mr_file_to_world)  # what registering the moved MR finds
    mapped = bridge.map_markups_to_trus(source, world_to_trus)
    np.testing.assert_allclose(positions(mapped, world=False), trus_points, atol=1e-6)
    assert mapped.GetTransformNodeID() is None  # no TRUS node given: not placed under anything


def test_exports_are_read_by_slicer_and_by_airreg(scene, case, tmp_path):
    names, mr_points, trus_points = landmarks(case)
    _, trus = trus_pair(scene, case, case.gt)
    mapped = bridge.map_markups_to_trus(add_points(scene, names, mr_points), case.gt, trus)
    csv_file = bridge.export_targets(tmp_path / "targets_trus.csv", mapped)
    json_file = bridge.export_targets(tmp_path / "targets_trus.mrk.json", mapped)
    for path in (csv_file, json_file):
        read = targets.read_targets(path, space="TRUS")
        assert read.labels == names
        np.testing.assert_allclose(read.points_lps, trus_points, atol=1e-6)
    loaded = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "loaded")
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(json_file))
    assert storage.ReadData(loaded)  # Slicer's reader takes our file ...
    np.testing.assert_allclose(positions(loaded, world=False), trus_points, atol=1e-6)
    assert [loaded.GetNthControlPointLabel(i) for i in range(len(names))] == list(names)
    storage.SetFileName(str(tmp_path / "slicer.mrk.json"))
    assert storage.WriteData(add_points(scene, names, mr_points))  # ... and we read Slicer's
    np.testing.assert_allclose(
        targets.read_targets(tmp_path / "slicer.mrk.json").points_lps, mr_points, atol=1e-6
    )
    with pytest.raises(FileExistsError):
        bridge.export_targets(csv_file, mapped)
    with pytest.raises(InputError, match="'MR targets' is not in TRUS space"):
        bridge.export_targets(tmp_path / "mr.csv", scene.GetFirstNodeByName("MR targets"))
    bridge.export_targets(csv_file, mapped, overwrite=True)


def test_point_list_after_registration_lands_within_the_registrations_tre(scene, case):
    """The panel's path: register with the bundled model from a start, then map the MR landmarks with the
    output transform node; each lands off its TRUS landmark by the registration's error there."""
    from airreg.registration import Registrar

    names, mr_points, trus_points = landmarks(case)
    offset = geometry.RigidTransform.from_vector([8.0, 3.0, -2.5], 3).matrix
    start = case.gt @ geometry.to_world(offset, resampling.mr_frame(case.mr))
    mr, trus = trus_pair(scene, case, start)
    registrar = Registrar.from_checkpoint(None, "cpu", iterations=3)
    _, output = bridge.register_volume_nodes(registrar, mr, trus)
    mr_to_trus = bridge.mr_to_trus_from_transform_node(output)
    mapped = bridge.map_markups_to_trus(add_points(scene, names, mr_points), mr_to_trus, trus)
    errors = np.linalg.norm(positions(mapped, world=False) - trus_points, axis=1)
    tre = np.linalg.norm(geometry.apply(mr_to_trus, mr_points) - geometry.apply(case.gt, mr_points), axis=1)
    np.testing.assert_allclose(errors, tre, atol=1e-5)
    start_errors = np.linalg.norm(geometry.apply(start, mr_points) - trus_points, axis=1)
    assert errors.mean() < start_errors.mean() and errors.mean() < 2.0
    np.testing.assert_allclose(positions(mapped, world=True), mr_points, atol=1e-5)  # TRUS under the result


def test_bad_point_lists_are_refused(scene, case):
    _, trus = trus_pair(scene, case)
    empty = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "empty")
    with pytest.raises(InputError, match="point list 'empty' has no points"):
        bridge.map_markups_to_trus(empty, case.gt, trus)
    unplaced = add_points(scene, ("a", "b"), np.zeros((2, 3)), name="half")
    unplaced.UnsetNthControlPointPosition(1)
    with pytest.raises(InputError, match=r"point list 'half': point 2 \('b'\) is not placed"):
        bridge.map_markups_to_trus(unplaced, case.gt, trus)
    with pytest.raises(InputError, match="Select a markups point list"):
        bridge.map_markups_to_trus(None, case.gt, trus)
    with pytest.raises(InputError, match="not rigid"):
        bridge.map_markups_to_trus(add_points(scene, ("a",), np.zeros((1, 3))), np.diag([2.0, 1, 1, 1]), trus)
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 3  # nothing added


# --- segmentations and label maps -------------------------------------------------------------------------


def test_segmentation_mapped_with_the_ground_truth_is_centred_on_the_trus_landmarks(scene, case, tmp_path):
    names, mr_points, trus_points = landmarks(case)
    _, trus = trus_pair(scene, case, case.gt)
    picks = [names.index("lesion_1"), names.index("apex")]
    labels = sphere_labels(case.mr, mr_points[picks], 6.0, (1, 2))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MR segmentation")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        add_labelmap(scene, labels), segmentation
    )
    mtime = segmentation.GetMTime()
    mapped = bridge.map_segmentation_to_trus(segmentation, case.gt, trus)
    assert (
        mapped.IsA("vtkMRMLLabelMapVolumeNode") and mapped.GetTransformNodeID() == trus.GetTransformNodeID()
    )
    on_trus = bridge.label_image_from_labelmap_node(mapped, include_parent=False)
    trus_grid = bridge.image_from_volume_node(trus, include_parent=False)
    assert on_trus.GetSize() == trus_grid.GetSize()
    np.testing.assert_allclose(on_trus.GetOrigin(), trus_grid.GetOrigin(), atol=1e-9)
    assert targets.label_values(on_trus) == [1, 2]  # segment i -> label i + 1
    voxel = max(case.trus.GetSpacing())
    for value, pick in zip((1, 2), picks, strict=True):
        assert np.linalg.norm(centroid_lps(on_trus, value) - trus_points[pick]) < voxel
    assert segmentation.GetMTime() == mtime  # input untouched
    colours = scene.GetNodeByID(mapped.GetDisplayNode().GetColorNodeID())
    segment_names = [segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)]
    assert [colours.GetColorName(v) for v in (1, 2)] == segment_names
    assert bridge.segment_labels(segmentation) == dict(zip((1, 2), segment_names, strict=True))
    exported = bridge.export_labelmap(tmp_path / "seg_trus.nrrd", mapped)
    report = bridge.add_targets_to_report({}, segmentation_source=segmentation, segmentation_file=exported)
    assert report["segmentation"]["label_names"] == {"1": segment_names[0], "2": segment_names[1]}
    written = sitk.ReadImage(str(exported))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(on_trus))
    np.testing.assert_allclose(written.GetDirection(), case.trus.GetDirection(), atol=1e-9)


def test_slicers_seg_nrrd_is_read_as_a_label_map(scene, case, tmp_path):
    """A segmentation saved by Slicer (``.seg.nrrd``, one layer, cropped to its segments) keeps its geometry."""
    names, mr_points, trus_points = landmarks(case)
    lesion = names.index("lesion_1")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MR segmentation")
    labels = add_labelmap(scene, sphere_labels(case.mr, mr_points[[lesion]], 6.0, (1,)))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, segmentation)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "lesion.seg.nrrd"))
    assert storage.WriteData(segmentation)
    read = targets.read_label_image(tmp_path / "lesion.seg.nrrd")
    assert read.GetSize() != case.mr.GetSize()  # cropped: its origin has to be right
    on_trus = targets.map_label_image(read, case.gt, case.trus)
    assert np.linalg.norm(centroid_lps(on_trus, 1) - trus_points[lesion]) < max(case.trus.GetSpacing())
    segment = segmentation.GetSegmentation().GetNthSegment(0).GetName()
    assert targets.label_names(read) == {1: segment}
    report = targets.segmentation_report("lesion.seg.nrrd", "out.nrrd", read, on_trus)
    assert report["label_names"] == {"1": segment}


@pytest.mark.parametrize("kind", ["labelmap", "segmentation"])
def test_inputs_under_a_transform_are_mapped_from_where_slicer_shows_them(scene, case, kind):
    names, mr_points, trus_points = landmarks(case)
    _, trus = trus_pair(scene, case, case.gt)
    mr_file_to_world = geometry.RigidTransform((0.0, 4.0, -9.0), (-6.0, 3.0, 5.0)).matrix
    lesion = names.index("lesion_1")
    source = add_labelmap(scene, sphere_labels(case.mr, mr_points[[lesion]], 6.0, (250,)))
    if kind == "segmentation":
        labelmap, source = source, scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MR segmentation")
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, source)
    placement = add_transform(
        scene, geometry.RAS_TO_LPS @ mr_file_to_world @ geometry.RAS_TO_LPS, "MR placement"
    )
    source.SetAndObserveTransformNodeID(placement.GetID())
    mtime = source.GetMTime()
    mapped = bridge.map_segmentation_to_trus(source, case.gt @ geometry.invert(mr_file_to_world), trus)
    on_trus = bridge.label_image_from_labelmap_node(mapped, include_parent=False)
    value = 250 if kind == "labelmap" else 1  # a label map keeps its values; segment 1 becomes label 1
    assert targets.label_values(on_trus) == [value]
    if kind == "labelmap":
        assert on_trus.GetPixelID() == sitk.sitkInt16
    assert np.linalg.norm(centroid_lps(on_trus, value) - trus_points[lesion]) < max(case.trus.GetSpacing())
    assert source.GetMTime() == mtime  # input untouched


def test_bad_segmentation_inputs_are_refused(scene, case):
    mr, trus = trus_pair(scene, case)
    with pytest.raises(InputError, match="select a label map volume or a segmentation"):
        bridge.map_segmentation_to_trus(mr, case.gt, trus)  # an intensity volume
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    with pytest.raises(InputError, match="segmentation 'nothing' has no segments"):
        bridge.map_segmentation_to_trus(empty, case.gt, trus)
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0


def test_report_records_the_exported_files(scene, case, tmp_path):
    names, mr_points, _ = landmarks(case)
    _, trus = trus_pair(scene, case, case.gt)
    source = add_points(scene, names, mr_points)
    labels = add_labelmap(scene, sphere_labels(case.mr, mr_points[:1], 5.0, (4,)))
    points_file = bridge.export_targets(tmp_path / "t.csv", bridge.map_markups_to_trus(source, case.gt, trus))
    labels_file = bridge.export_labelmap(
        tmp_path / "s.nrrd", bridge.map_segmentation_to_trus(labels, case.gt, trus)
    )
    report = bridge.add_targets_to_report(
        {"model_sha256": "ab" * 32}, source, points_file, labels, labels_file
    )
    assert report["model_sha256"] == "ab" * 32
    assert report["targets"] == {"file": "MR targets", "output_file": str(points_file), "count": len(names)}
    assert report["segmentation"] == {"file": "MR labels", "output_file": str(labels_file), "labels": [4]}
    json.dumps(report)  # JSON-ready
