"""The module logic's biopsy targets (Map to TRUS, Save targets and report) on real MRML nodes.

The real module file is imported with the application stand-ins (slicer_app_standins.py); the first test
registers a phantom pair with the bundled model, as the panel does, and checks that the MR landmarks mapped with
the result land on the TRUS landmarks within the registration's error there. The others use ``ExactRegistrar``
(the true transform), so they can assert exact geometry, updates in place and refusals that change nothing.
The bridge functions underneath are tested in test_targets_mrml.py.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):  # the unrelated PyPI package named "slicer"
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from exact_registrar import ExactRegistrar  # noqa: E402
from slicer_app_standins import slicer_application  # noqa: E402

from airreg import geometry, phantom, resampling, targets  # noqa: E402

pytestmark = pytest.mark.slicer


# --- fixtures and helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def air_module() -> Iterator[ModuleType]:
    with slicer_application() as imported:
        yield imported


@pytest.fixture(scope="module", autouse=True)
def register_segmentation_converters() -> None:
    """What Slicer's Segmentations module does at startup (see test_targets_mrml.py)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
    ):
        factory.RegisterConverterRule(rule())


@pytest.fixture
def scene(air_module: ModuleType) -> slicer.vtkMRMLScene:
    slicer.mrmlScene.Clear()
    return slicer.mrmlScene


@pytest.fixture(scope="module")
def case() -> phantom.PhantomCase:
    return phantom.generate_case(3)


def landmarks(case) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    names = tuple(name for name, _, _ in case.landmarks)
    return names, np.array([m for _, m, _ in case.landmarks]), np.array([t for _, _, t in case.landmarks])


def add_points(scene, names, points_lps: np.ndarray, name: str = "MR targets"):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for label, point in zip(names, targets.lps_to_ras(points_lps), strict=True):
        node.AddControlPoint([float(v) for v in point], label)
    return node


def positions(node, world: bool) -> np.ndarray:
    from AIRRegistrationLib import mrml_bridge

    return mrml_bridge.targets_from_markups_node(node, world=world).points_lps


def add_segmentation(scene, case, centers_lps: np.ndarray, radius_mm: float = 6.0):
    """A segmentation on the MR with one sphere segment per centre (through a label map, as users import)."""
    from AIRRegistrationLib import mrml_bridge

    image = case.mr
    size = image.GetSize()
    index = np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij"), -1).reshape(-1, 3)
    world = geometry.apply(resampling.index_to_world(image), index.astype(float))
    array = np.zeros(size, np.int16)
    for value, center in enumerate(centers_lps, start=1):
        array.reshape(-1)[np.linalg.norm(world - center, axis=1) <= radius_mm] = value
    labels = sitk.GetImageFromArray(array.transpose(2, 1, 0).copy())
    labels.CopyInformation(image)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "MR labels")
    mrml_bridge.update_volume_node_from_image(labelmap, labels)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MR lesions")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    return segmentation


def centroid_lps(image: sitk.Image, value: int) -> np.ndarray:
    index = np.argwhere(sitk.GetArrayFromImage(image) == value)[:, ::-1].astype(float)
    return geometry.apply(resampling.index_to_world(image), index).mean(axis=0)


def node_state(scene) -> dict[str, tuple]:
    """Per node ID: node MTime, image data MTime and parent transform (all nodes of the scene)."""
    state = {}
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        image = node.GetImageData() if node.IsA("vtkMRMLVolumeNode") else None
        parent = node.GetTransformNodeID() if node.IsA("vtkMRMLTransformableNode") else None
        state[node.GetID()] = (node.GetMTime(), image.GetMTime() if image else None, parent)
    return state


def registered(air_module, scene, case, registrar=None) -> tuple[Any, Any]:
    """The logic and its parameter node after registering the phantom pair (with ``registrar`` if given)."""
    from AIRRegistrationLib import mrml_bridge

    logic = air_module.AIRRegistrationLogic()
    if registrar is not None:
        logic.getRegistrar = lambda *args, **kwargs: registrar
    p = logic.getParameterNode()
    p.mrVolume = mrml_bridge.add_volume_node_from_image(scene, case.mr, "MR")
    p.trusVolume = mrml_bridge.add_volume_node_from_image(scene, case.trus, "TRUS")
    p.outputTransform = None
    logic.registerVolumesUsingParameterNode(p)
    return logic, p


# --- after a real registration ------------------------------------------------------------------------------


def test_targets_mapped_after_registration_land_within_the_registrations_error(
    air_module, scene, case, tmp_path
):
    """Register from a perturbed start with the bundled model, map the MR landmarks and a segmentation, export."""
    from airreg.errors import ModelError
    from AIRRegistrationLib import mrml_bridge

    names, mr_points, trus_points = landmarks(case)
    logic = air_module.AIRRegistrationLogic()
    try:
        registrar = logic.getRegistrar(device="cpu")
    except (ModelError, FileNotFoundError) as exc:
        pytest.skip(f"no bundled model: {exc}")
    offset = geometry.RigidTransform.from_vector([8.0, 3.0, -2.5], 3).matrix
    start = case.gt @ geometry.to_world(offset, resampling.mr_frame(case.mr))
    p = logic.getParameterNode()
    p.mrVolume = mrml_bridge.add_volume_node_from_image(scene, case.mr, "MR")
    p.trusVolume = mrml_bridge.add_volume_node_from_image(scene, case.trus, "TRUS")
    placement = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "start")
    placement.SetMatrixTransformToParent(
        mrml_bridge.vtk_matrix_from_array(geometry.lps_resampling_to_ras_modeling(start))
    )
    p.trusVolume.SetAndObserveTransformNodeID(placement.GetID())
    p.outputTransform, p.device = None, air_module.Device.CPU
    logic.registerVolumesUsingParameterNode(p)
    lesion, apex = names.index("lesion_1"), names.index("apex")
    p.targetPoints = add_points(scene, names, mr_points)
    p.targetSegmentation = add_segmentation(scene, case, mr_points[[lesion, apex]])

    points, labelmap = logic.mapTargetsUsingParameterNode(p)
    assert (p.mappedTargets.GetID(), p.mappedSegmentation.GetID()) == (points.GetID(), labelmap.GetID())
    mr_to_trus = mrml_bridge.mr_to_trus_from_transform_node(p.outputTransform)
    errors = np.linalg.norm(positions(points, world=False) - trus_points, axis=1)
    tre = np.linalg.norm(geometry.apply(mr_to_trus, mr_points) - geometry.apply(case.gt, mr_points), axis=1)
    np.testing.assert_allclose(errors, tre, atol=1e-5)  # each lands off by the registration's error there
    start_errors = np.linalg.norm(geometry.apply(start, mr_points) - trus_points, axis=1)
    assert errors.mean() < start_errors.mean() and errors.mean() < 2.0
    np.testing.assert_allclose(positions(points, world=True), mr_points, atol=1e-5)  # shown on the MR targets
    on_trus = mrml_bridge.label_image_from_labelmap_node(labelmap, include_parent=False)
    voxel = max(case.trus.GetSpacing())
    for value, pick in ((1, lesion), (2, apex)):
        assert np.linalg.norm(centroid_lps(on_trus, value) - trus_points[pick]) < tre[pick] + voxel

    written = logic.exportTargetsUsingParameterNode(p, str(tmp_path / "plan.json"))
    assert [path.name for path in written] == ["plan_targets.mrk.json", "plan_labels.nrrd", "plan.json"]
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["model_sha256"] == registrar.model_sha256 and len(report["model_sha256"]) == 64
    assert report["adjusted_manually"] is False
    assert report["targets"] == {
        "file": "MR targets",
        "output_file": str(tmp_path / "plan_targets.mrk.json"),
        "count": len(names),
    }
    assert report["segmentation"]["file"] == "MR lesions" and report["segmentation"]["labels"] == [1, 2]
    read = targets.read_targets(tmp_path / "plan_targets.mrk.json", space="TRUS")
    np.testing.assert_allclose(read.points_lps, positions(points, world=False), atol=1e-6)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plan_labels.nrrd"))),
        sitk.GetArrayFromImage(on_trus),
    )


# --- exact geometry, updates and refusals ---------------------------------------------------------------------


def test_mapping_again_updates_the_mapped_nodes_in_place(air_module, scene, case):
    from AIRRegistrationLib import mrml_bridge

    names, mr_points, trus_points = landmarks(case)
    logic, p = registered(air_module, scene, case, ExactRegistrar(case.gt))
    p.targetPoints = add_points(scene, names, mr_points)
    p.targetSegmentation = add_segmentation(scene, case, mr_points[:1])
    points, labelmap = logic.mapTargetsUsingParameterNode(p)
    np.testing.assert_allclose(positions(points, world=False), trus_points, atol=1e-6)
    counts = {
        c: scene.GetNumberOfNodesByClass(c) for c in ("vtkMRMLMarkupsFiducialNode", "vtkMRMLColorTableNode")
    }

    p.targetPoints.SetNthControlPointPosition(0, 1.0, 2.0, 3.0)  # the user moves a target on the MR
    again = logic.mapTargetsUsingParameterNode(p)
    assert [node.GetID() for node in again] == [points.GetID(), labelmap.GetID()]  # updated, not added
    assert {c: scene.GetNumberOfNodesByClass(c) for c in counts} == counts  # no colour table added either
    expected = geometry.apply(case.gt, targets.ras_to_lps(np.array([1.0, 2.0, 3.0])))
    np.testing.assert_allclose(positions(points, world=False)[0], expected, atol=1e-6)
    assert points.GetNumberOfControlPoints() == len(names)
    assert mrml_bridge.is_mapped_with(points, p.targetPoints, p.outputTransform)

    other = add_points(scene, names[:2], mr_points[:2], name="second plan")
    p.targetPoints = other  # another source gets its own mapped node; the first one is kept
    third, _ = logic.mapTargetsUsingParameterNode(p)
    assert third.GetID() != points.GetID() and points.GetNumberOfControlPoints() == len(names)


def test_bad_targets_are_refused_and_change_nothing(air_module, scene, case):
    names, mr_points, _ = landmarks(case)
    logic, p = registered(air_module, scene, case, ExactRegistrar(case.gt))
    p.targetPoints = add_points(scene, names, mr_points)
    mapped, _ = logic.mapTargetsUsingParameterNode(p)
    lesions = add_segmentation(scene, case, mr_points[:1])  # valid, not mapped yet
    before = node_state(scene)
    matrix = slicer.util.arrayFromTransformMatrix(p.outputTransform).copy()

    p.targetSegmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    with pytest.raises(ValueError, match="segmentation 'nothing' has no segments"):
        logic.mapTargetsUsingParameterNode(p)  # the valid point list is not re-mapped either
    half = add_points(scene, ("a", "b"), mr_points[:2], name="half")
    half.UnsetNthControlPointPosition(1)
    p.targetPoints, p.targetSegmentation = half, lesions  # a bad point list: the valid segmentation waits
    expected = {**before, **{k: v for k, v in node_state(scene).items() if k not in before}}
    with pytest.raises(ValueError, match=r"point list 'half': point 2 \('b'\) is not placed"):
        logic.mapTargetsUsingParameterNode(p)
    p.targetPoints, p.targetSegmentation = mapped, None
    with pytest.raises(ValueError, match=r"'MR targets \(TRUS\)' is already in TRUS coordinates"):
        logic.mapTargetsUsingParameterNode(p)  # mapping the mapped list again would map it twice
    p.targetPoints = None
    with pytest.raises(ValueError, match="Select MR targets"):
        logic.mapTargetsUsingParameterNode(p)
    state = node_state(scene)
    state.pop(p.parameterNode.GetID())
    expected.pop(p.parameterNode.GetID())
    assert state == expected  # no node added, modified or moved
    np.testing.assert_array_equal(slicer.util.arrayFromTransformMatrix(p.outputTransform), matrix)

    with pytest.raises(ValueError, match="Register first"):
        logic.mapTargets(half, None, None, p.trusVolume)


def test_export_is_refused_unless_the_targets_match_the_scored_alignment(air_module, scene, case, tmp_path):
    from AIRRegistrationLib import mrml_bridge

    names, mr_points, _ = landmarks(case)
    logic, p = registered(air_module, scene, case, ExactRegistrar(case.gt))
    p.targetPoints = add_points(scene, names, mr_points)
    report = str(tmp_path / "report.json")
    with pytest.raises(ValueError, match="'MR targets' is not mapped with the current result"):
        logic.exportTargetsUsingParameterNode(p, report)
    logic.mapTargetsUsingParameterNode(p)

    moved = geometry.RigidTransform((0, 0, 0), (0, 4, 0)).matrix @ case.gt  # adjusted by hand
    p.outputTransform.SetMatrixTransformToParent(
        mrml_bridge.vtk_matrix_from_array(geometry.lps_resampling_to_ras_modeling(moved))
    )
    with pytest.raises(ValueError, match="moved after it was scored"):
        logic.exportTargetsUsingParameterNode(p, report)
    logic.scoreUsingParameterNode(p)  # Check current alignment: the report now describes the adjusted one
    with pytest.raises(ValueError, match="not mapped with the current result"):
        logic.exportTargetsUsingParameterNode(p, report)  # mapped with the registration's, not the adjusted
    logic.mapTargetsUsingParameterNode(p)
    p.targetsFormat = air_module.TargetsFormat.CSV
    logic.exportTargetsUsingParameterNode(p, report)
    written = json.loads(Path(report).read_text())
    assert written["adjusted_manually"] is True and written["targets"]["output_file"].endswith(
        "report_targets.csv"
    )
    read = targets.read_targets(tmp_path / "report_targets.csv", space="TRUS")
    np.testing.assert_allclose(read.points_lps, geometry.apply(moved, mr_points), atol=1e-6)
    assert not list(tmp_path.glob("*labels*"))  # no segmentation selected: no label map written

    logic.exportTargetsUsingParameterNode(p, report)  # the same export again: its own files are replaced
    (tmp_path / "other_targets.csv").write_text("not ours\n")
    with pytest.raises(ValueError, match="other_targets.csv exists; choose another report name"):
        logic.exportTargetsUsingParameterNode(p, str(tmp_path / "other.json"))
    assert (tmp_path / "other_targets.csv").read_text() == "not ours\n" and not (
        tmp_path / "other.json"
    ).exists()
