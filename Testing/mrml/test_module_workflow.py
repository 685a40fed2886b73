"""The module's logic through a user's workflow on real MRML nodes, with an exact registrar instead of AIR-net.

``ExactRegistrar`` answers the true MR->TRUS transform and scores an alignment by its distance from the truth,
so the tests can assert exact geometry (where the result is written, what the export maps) and that a manual
adjustment changes the score; the networks themselves are tested in test_module_logic.py and the core's tests.
Issue 12 items: 4 (stale results), 7 (selection changed or scene closed mid-run), 8 (GPU without CUDA),
9 (the "before" parent as a node reference), 10/11 (output transforms that would move the MR or overwrite the
TRUS's placement), 12 (export frame), 13 (patient IDs out of the scene), and the manual adjustment.
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
from slicer_app_standins import MODULE_DIR, slicer_application  # noqa: E402

from airreg import geometry  # noqa: E402

pytestmark = pytest.mark.slicer


# --- fixtures and helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def air_module() -> Iterator[ModuleType]:
    with slicer_application() as imported:
        yield imported


@pytest.fixture
def scene(air_module: ModuleType) -> slicer.vtkMRMLScene:
    slicer.mrmlScene.Clear()
    return slicer.mrmlScene


def image(size, spacing, origin, angles, seed) -> sitk.Image:
    rng = np.random.default_rng(seed)
    result = sitk.GetImageFromArray(rng.normal(100, 20, size=size[::-1]).astype(np.float32))
    result.SetSpacing(spacing)
    result.SetOrigin(origin)
    result.SetDirection(geometry.rotation_matrix(angles).ravel().tolist())
    return result


def load_volume(scene, path: Path, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


@pytest.fixture
def pair(scene, tmp_path) -> tuple[Any, Any]:
    """An MR and a TRUS volume read from files through storage nodes."""
    sitk.WriteImage(
        image((30, 28, 12), (1.0, 1.0, 3.0), (-20.0, 10.0, 5.0), (0, 0, 8), 1), str(tmp_path / "mr.nrrd")
    )
    sitk.WriteImage(
        image((24, 24, 24), (0.9,) * 3, (40.0, -5.0, 12.0), (10, 0, -5), 2), str(tmp_path / "trus.nrrd")
    )
    return load_volume(scene, tmp_path / "mr.nrrd", "MR"), load_volume(scene, tmp_path / "trus.nrrd", "TRUS")


def add_transform(scene, mr_to_trus_lps: np.ndarray, name: str, parent=None):
    """A linear transform node whose "to parent" is the RAS modeling matrix of an MR->TRUS LPS matrix."""
    from AIRRegistrationLib import mrml_bridge

    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(
        mrml_bridge.vtk_matrix_from_array(geometry.lps_resampling_to_ras_modeling(mr_to_trus_lps))
    )
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def rigid(angles, translation) -> np.ndarray:
    return geometry.RigidTransform(angles, translation).matrix


def to_parent(node) -> np.ndarray:
    return slicer.util.arrayFromTransformMatrix(node).copy()


@pytest.fixture
def exact(air_module: ModuleType, monkeypatch: pytest.MonkeyPatch):
    """Make every logic use an ExactRegistrar with the given truth; returns a setter."""

    def use(truth: np.ndarray, **kwargs) -> ExactRegistrar:
        registrar = ExactRegistrar(truth, **kwargs)
        monkeypatch.setattr(air_module.AIRRegistrationLogic, "getRegistrar", lambda self, *a, **k: registrar)
        return registrar

    return use


TRUTH = rigid((2.0, -3.0, 12.0), (15.0, -8.0, 6.0))  # MR file -> TRUS file


# --- 9: the "before" parent is a node reference ---------------------------------------------------------


def test_before_parent_survives_scene_import(air_module, scene, pair, exact, tmp_path):
    """The transform the TRUS was under is a node reference: after importing the saved scene into a scene
    whose node IDs clash (Slicer renames the imported ones), "before" still finds it."""
    from AIRRegistrationLib import mrml_bridge

    mr, trus = pair
    exact(TRUTH)
    manual = add_transform(scene, rigid((0, 0, 5), (3, 2, 1)), "manual")
    trus.SetAndObserveTransformNodeID(manual.GetID())
    _result, out = air_module.AIRRegistrationLogic().registerVolumes(mr, trus)
    assert out.GetNodeReferenceID(mrml_bridge.PREVIOUS_PARENT_ROLE) == manual.GetID()
    assert not [name for name in out.GetAttributeNames() if manual.GetID() in (out.GetAttribute(name) or "")]

    scene.SetURL(str(tmp_path / "saved.mrml"))
    assert scene.Commit()
    other = slicer.vtkMRMLScene()
    for name in ("clash 1", "clash 2", "clash 3"):  # take the IDs the saved nodes had
        other.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    other.SetURL(str(tmp_path / "saved.mrml"))
    other.Import()
    imported = {other.GetNthNode(i).GetName(): other.GetNthNode(i) for i in range(other.GetNumberOfNodes())}
    out2, trus2, manual2 = imported[out.GetName()], imported["TRUS"], imported["manual"]
    assert manual2.GetID() != manual.GetID()  # renamed on import
    mrml_bridge.show_alignment(trus2, out2, after=False)
    assert trus2.GetTransformNodeID() == manual2.GetID()
    other.Clear(1)


# --- 10, 11: output transforms that would move the MR or overwrite the TRUS's placement -------------------


def test_output_transform_the_mr_is_under_is_refused(air_module, scene, pair, exact):
    mr, trus = pair
    exact(TRUTH)
    grandparent = add_transform(scene, rigid((0, 0, 0), (0, 0, 11)), "MR grandparent")
    parent = add_transform(scene, rigid((0, 0, 3), (2, 0, 0)), "MR parent", parent=grandparent)
    mr.SetAndObserveTransformNodeID(parent.GetID())
    from AIRRegistrationLib import mrml_bridge

    logic = air_module.AIRRegistrationLogic()
    for chosen in (parent, grandparent):
        before = to_parent(chosen)
        reason = mrml_bridge.validate_inputs(mr, trus, chosen)
        assert reason and f"'{chosen.GetName()}' would move the MR volume" in reason
        with pytest.raises(ValueError, match="would move the MR volume"):
            logic.registerVolumes(mr, trus, outputTransformNode=chosen)
        np.testing.assert_array_equal(to_parent(chosen), before)
        assert trus.GetTransformNodeID() is None and mr.GetTransformNodeID() == parent.GetID()


def test_output_transform_holding_the_trus_is_refused_but_an_earlier_result_is_reused(
    air_module, scene, pair, exact
):
    from AIRRegistrationLib import mrml_bridge

    mr, trus = pair
    exact(TRUTH)
    grandparent = add_transform(scene, rigid((0, 0, 0), (5, 0, 0)), "TRUS grandparent")
    parent = add_transform(scene, rigid((0, 0, 4), (0, 3, 0)), "TRUS parent", parent=grandparent)
    trus.SetAndObserveTransformNodeID(parent.GetID())
    logic = air_module.AIRRegistrationLogic()
    for chosen in (parent, grandparent):
        before = to_parent(chosen)
        with pytest.raises(ValueError, match="holds the TRUS volume's current placement"):
            logic.registerVolumes(mr, trus, outputTransformNode=chosen)
        np.testing.assert_array_equal(to_parent(chosen), before)
        assert trus.GetTransformNodeID() == parent.GetID()

    _result, out = logic.registerVolumes(mr, trus)
    assert mrml_bridge.validate_inputs(mr, trus, out) is None  # registering again into the result is fine
    logic.registerVolumes(mr, trus, outputTransformNode=out)
    mrml_bridge.show_alignment(trus, out, after=False)
    assert trus.GetTransformNodeID() == parent.GetID()  # "before" is still the placement before the first run


def test_output_transform_that_is_the_initial_transform_is_refused(air_module, scene, pair, exact):
    """The chosen starting alignment (e.g. from a fusion system) is not overwritten by the result."""
    from AIRRegistrationLib import mrml_bridge

    mr, trus = pair
    exact(TRUTH)
    outer = add_transform(scene, rigid((0, 0, 0), (0, 4, 0)), "fusion frame")
    start = add_transform(scene, rigid((0, 0, 6), (1, 0, 0)), "fusion start", parent=outer)
    logic = air_module.AIRRegistrationLogic()
    for chosen in (start, outer):
        before = to_parent(chosen)
        assert "would overwrite the initial transform" in mrml_bridge.validate_inputs(mr, trus, chosen, start)
        with pytest.raises(ValueError, match="would overwrite the initial transform"):
            logic.registerVolumes(mr, trus, outputTransformNode=chosen, initialTransformNode=start)
        np.testing.assert_array_equal(to_parent(chosen), before)
    _result, out = logic.registerVolumes(mr, trus, initialTransformNode=start)
    assert mrml_bridge.validate_inputs(mr, trus, out, out) is None  # starting again from its own result


# --- 12: the export maps MR file coordinates to TRUS file coordinates -----------------------------------


@pytest.mark.parametrize("suffix", [".h5", ".tfm"])
def test_export_maps_the_mr_file_to_the_trus_file(air_module, scene, pair, exact, tmp_path, suffix):
    """The MR under an 11 mm parent: the written transform still maps MR-file points onto TRUS-file points,
    read back with SimpleITK and with Slicer's vtkMRMLTransformStorageNode; so do the RAS text and the report."""
    from AIRRegistrationLib import mrml_bridge

    mr, trus = pair
    mr_to_world_lps = rigid((0, 0, 0), (0, 0, 11))  # MR file -> world, LPS
    mr_parent = add_transform(scene, np.linalg.inv(mr_to_world_lps), "MR parent")
    mr.SetAndObserveTransformNodeID(mr_parent.GetID())
    exact(TRUTH @ np.linalg.inv(mr_to_world_lps))  # the core sees the MR in world coordinates
    logic = air_module.AIRRegistrationLogic()
    p = logic.getParameterNode()
    p.mrVolume, p.trusVolume, p.outputTransform = mr, trus, None
    logic.registerVolumesUsingParameterNode(p)
    out = p.outputTransform

    path = tmp_path / f"mr_to_trus{suffix}"
    logic.exportTransform(out, str(path))  # the MR comes from the transform's fixed-volume reference
    mr_file_points = np.array([[-20.0, 10.0, 5.0], [0.0, 0.0, 20.0], [10.0, 25.0, 30.0]])
    trus_file_points = geometry.apply(TRUTH, mr_file_points)
    read = sitk.ReadTransform(str(path))
    mapped = np.array([read.TransformPoint(point.tolist()) for point in mr_file_points])
    np.testing.assert_allclose(mapped, trus_file_points, atol=1e-6)

    loaded = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "read back")
    reader = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    reader.SetFileName(str(path))
    assert reader.ReadData(loaded)
    np.testing.assert_allclose(mrml_bridge.mr_to_trus_from_transform_node(loaded), TRUTH, atol=1e-9)

    text = tmp_path / "ras.txt"
    logic.exportMatrix(out, str(text))
    np.testing.assert_allclose(geometry.read_transform(text), TRUTH, atol=1e-8)
    report = json.loads(p.reportJson)
    np.testing.assert_allclose(report["mr_to_trus_lps"], TRUTH, atol=1e-9)
    assert report["transform_frame"].startswith("MR file coordinates -> TRUS file coordinates")
    np.testing.assert_allclose(
        report["mr_world_to_trus_lps"], TRUTH @ np.linalg.inv(mr_to_world_lps), atol=1e-9
    )


# --- 4: stale results ---------------------------------------------------------------------------------


def test_results_are_cleared_when_the_selection_changes(air_module, scene, pair, exact):
    mr, trus = pair
    exact(TRUTH)
    logic = air_module.AIRRegistrationLogic()
    p = logic.getParameterNode()
    p.mrVolume, p.trusVolume, p.outputTransform = mr, trus, None
    logic.registerVolumesUsingParameterNode(p)
    assert logic.resultIsCurrent(p) and not logic.clearStaleResults(p) and p.reportJson

    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "another TRUS")
    for change in ("trusVolume", "mrVolume", "outputTransform"):
        logic.registerVolumesUsingParameterNode(p)
        assert p.reportJson and p.dScoreAfter
        setattr(p, change, other if change != "outputTransform" else None)
        assert logic.clearStaleResults(p), change
        assert not any(getattr(p, name) for name in air_module.RESULT_TEXT_FIELDS), change
        assert p.resultTransform is None and p.resultTrusVolume is None
        p.mrVolume, p.trusVolume = mr, trus


# --- 7: the selection changes or the scene closes while the registration runs ---------------------------


def test_report_names_the_nodes_registered_even_if_the_selection_changes_mid_run(
    air_module, scene, pair, exact
):
    mr, trus = pair
    logic = air_module.AIRRegistrationLogic()
    p = logic.getParameterNode()
    p.mrVolume, p.trusVolume, p.outputTransform = mr, trus, None
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "picked mid-run")

    def user_picks_another_volume() -> None:
        p.trusVolume = other

    exact(TRUTH, on_progress=user_picks_another_volume)
    logic.registerVolumesUsingParameterNode(p)
    report = json.loads(p.reportJson)
    assert report["slicer"]["trus_volume"] == "TRUS" and report["slicer"]["mr_volume"] == "MR"
    assert trus.GetTransformNodeID() == p.outputTransform.GetID() and other.GetTransformNodeID() is None
    assert p.resultTrusVolume.GetID() == trus.GetID()
    assert logic.clearStaleResults(p)  # the panel then shows no result for the volume picked mid-run


def test_scene_closed_mid_run_changes_nothing(air_module, scene, pair, exact):
    mr, trus = pair
    exact(TRUTH, on_progress=lambda: scene.Clear(0))
    logic = air_module.AIRRegistrationLogic()
    with pytest.raises(ValueError, match="removed from the scene during the registration"):
        logic.registerVolumes(mr, trus)
    assert scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 0
    assert trus.GetTransformNodeID() is None


# --- 8: a GPU asked for without CUDA --------------------------------------------------------------------


def test_gpu_without_cuda_is_said_in_the_status(air_module, scene, pair, exact):
    mr, trus = pair
    exact(TRUTH, device="cpu")
    logic = air_module.AIRRegistrationLogic()
    p = logic.getParameterNode()
    p.mrVolume, p.trusVolume, p.outputTransform = mr, trus, None
    p.device = air_module.Device.CUDA
    logic.registerVolumesUsingParameterNode(p)
    assert "The GPU (CUDA) is not available here: the networks ran on the CPU." in p.statusText
    p.device = air_module.Device.AUTO
    logic.registerVolumesUsingParameterNode(p)
    assert "GPU" not in p.statusText
    assert logic.deviceNote(air_module.Device.CUDA, "cuda:0") == ""


# --- 13: PatientIDs stay out of the text saved with the scene --------------------------------------------


def test_patient_ids_are_not_written_into_the_scene(air_module, scene, pair, exact, monkeypatch):
    mr, trus = pair
    monkeypatch.setattr(slicer, "dicomDatabase", None, raising=False)
    hierarchy = scene.GetSubjectHierarchyNode()
    for node, name in ((mr, "PAT-0001"), (trus, "PAT-0002")):
        hierarchy.CreateItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), name), node)
    exact(TRUTH)
    logic = air_module.AIRRegistrationLogic()
    p = logic.getParameterNode()
    p.mrVolume, p.trusVolume, p.outputTransform = mr, trus, None
    logic.registerVolumesUsingParameterNode(p)
    assert p.quality == "warning" and "different patients" in p.statusText
    logic.scoreUsingParameterNode(p)
    saved = [p.parameterNode.GetParameter(name) for name in p.parameterNode.GetParameterNames()]
    assert "different patients" in " ".join(saved)
    assert not [text for text in saved if "PAT-000" in text]


# --- manual adjustment when the flag is red -------------------------------------------------------------


def test_manual_adjustment_is_scored_and_reported(air_module, scene, pair, exact, tmp_path):
    from AIRRegistrationLib import mrml_bridge

    mr, trus = pair
    exact(TRUTH)
    logic = air_module.AIRRegistrationLogic()
    p = logic.getParameterNode()
    p.mrVolume, p.trusVolume, p.outputTransform = mr, trus, None
    logic.registerVolumesUsingParameterNode(p)
    out = p.outputTransform
    registered = json.loads(p.reportJson)
    assert registered["adjusted_manually"] is False

    logic.showTransformHandles(out, True)  # the Transforms module's "Interaction" checkbox
    assert out.GetDisplayNode().GetEditorVisibility() and logic.transformHandlesShown(out)
    # the user drags the handles: the transform moves 6 mm
    moved = geometry.lps_resampling_to_ras_modeling(rigid((0, 0, 0), (6, 0, 0)) @ TRUTH)
    out.SetMatrixTransformToParent(mrml_bridge.vtk_matrix_from_array(moved))
    with pytest.raises(ValueError, match="moved after it was scored"):
        logic.exportReport(p.reportJson, str(tmp_path / "refused.json"), out)
    assert not (tmp_path / "refused.json").exists()

    quality = logic.scoreUsingParameterNode(p)
    assert quality.estimated_tre_mm == pytest.approx(6.0)
    assert p.statusText.startswith("Adjusted alignment: Warning")
    assert p.dScoreCurrent == f"{quality.d_score:.3f}"
    assert p.dScoreAfter == f"{registered['d_score']:.3f}"  # the registration's row is kept
    logic.exportReport(p.reportJson, str(tmp_path / "report.json"), out)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["adjusted_manually"] is True
    assert report["d_score_adjusted"] == pytest.approx(np.exp(-6 / 5))
    assert report["d_score"] == pytest.approx(registered["d_score"])
    assert report["quality_adjusted"] == "warning"
    np.testing.assert_allclose(report["mr_to_trus_lps"], rigid((0, 0, 0), (6, 0, 0)) @ TRUTH, atol=1e-9)
    np.testing.assert_allclose(report["registered_to_parent_ras"], registered["to_parent_ras"])

    # moved back onto the registration's transform: no longer adjusted
    out.SetMatrixTransformToParent(mrml_bridge.vtk_matrix_from_array(np.array(registered["to_parent_ras"])))
    logic.scoreUsingParameterNode(p)
    report = json.loads(p.reportJson)
    assert report["adjusted_manually"] is False and "d_score_adjusted" not in report
    logic.showTransformHandles(out, False)
    assert not logic.transformHandlesShown(out)


# --- 13: volumes pre-selected; the bundled core first on sys.path ---------------------------------------


def test_volumes_are_preselected_by_name(air_module, scene):
    logic = air_module.AIRRegistrationLogic()
    assert logic.defaultVolumes(scene) == (None, None)
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "prostate label")
    us = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "3D TRUS sweep")
    t2 = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T2 axial")
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ADC")
    mr, trus = logic.defaultVolumes(scene)
    assert (mr.GetName(), trus.GetName()) == ("T2 axial", "3D TRUS sweep")
    us.SetName("volume 2")  # no name says ultrasound: the first two volumes
    mr, trus = logic.defaultVolumes(scene)
    assert (mr.GetName(), trus.GetName()) == ("volume 2", "T2 axial") and t2 is trus


def test_bundled_core_is_found_before_a_pip_installed_one(tmp_path, monkeypatch):
    """Slicer appends the module folder to sys.path; a same-named ``airreg`` earlier on the path (a
    pip-installed ``airregistration``) must not shadow the bundled core once the module is imported."""
    from importlib.machinery import PathFinder

    shadow = tmp_path / "airreg"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("")
    # no other copy of the module folder (an editable install of another checkout adds one)
    others = [entry for entry in sys.path if not (Path(entry or ".") / "AIRRegistration.py").exists()]
    monkeypatch.setattr(sys, "path", [str(tmp_path), *others, str(MODULE_DIR)])
    assert Path(PathFinder.find_spec("airreg", sys.path).origin).parent == shadow  # as Slicer starts
    with slicer_application(prepend_module_dir=False):
        found = PathFinder.find_spec("airreg", sys.path)
        assert Path(sys.modules["AIRRegistration"].__file__).parent == MODULE_DIR
    assert Path(found.origin).parent == MODULE_DIR / "airreg"
