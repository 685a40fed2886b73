"""The real module file AIRRegistration/AIRRegistration.py on real MRML nodes: its logic and its self-test.

MRML comes from the ``slicer-core`` package; ``slicer_app_standins`` stands in for the rest of the Slicer
application (see its docstring for what that cannot verify: the Qt widget, real loading in Slicer, ...).
The bridge functions themselves are tested in test_mrml_bridge.py; here it is the module's code on top of them,
with the bundled model (skipped without it).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):  # the unrelated PyPI package named "slicer"
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

# the helper module sits next to this file (pytest's prepend mode adds the folder too, but later)
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from slicer_app_standins import SLICE_VIEWS, slicer_application  # noqa: E402

from airreg import geometry  # noqa: E402

if TYPE_CHECKING:
    from airreg.phantom import PhantomCase

pytestmark = pytest.mark.slicer

SELF_TESTS = ("test_InputValidation", "test_RegisterPhantom", "test_PoorAlignmentWarning")


# --- fixtures and helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def air_module() -> Iterator[ModuleType]:
    """The real AIRRegistration module, imported with the application stand-ins (undone afterwards)."""
    with slicer_application() as imported:
        yield imported


@pytest.fixture(scope="module")
def bundled_model(air_module: ModuleType) -> None:
    """Skip unless the bundled model loads (the self-test and the logic default to it)."""
    from airreg.errors import ModelError

    try:
        air_module.AIRRegistrationLogic().getRegistrar()
    except (ModelError, FileNotFoundError) as exc:
        pytest.skip(f"no bundled model: {exc}")


@pytest.fixture(scope="module")
def logic(air_module: ModuleType, bundled_model: None) -> Any:
    """One logic for the module's tests, so the model is loaded once."""
    return air_module.AIRRegistrationLogic()


@pytest.fixture
def scene(air_module: ModuleType) -> slicer.vtkMRMLScene:
    """``slicer.mrmlScene``, cleared as Slicer's test ``setUp`` does (singletons are kept)."""
    slicer.mrmlScene.Clear()
    return slicer.mrmlScene


@pytest.fixture(scope="module")
def phantom_case() -> PhantomCase:
    """Phantom pair 0 (the one the self-test registers), made once."""
    from airreg import phantom

    return phantom.generate_case(0)


def add_pair(scene: slicer.vtkMRMLScene, case: PhantomCase) -> tuple[Any, Any]:
    """The phantom MR and TRUS as volume nodes (no parent transforms)."""
    from AIRRegistrationLib import mrml_bridge

    mr = mrml_bridge.add_volume_node_from_image(scene, case.mr, "Phantom MR")
    trus = mrml_bridge.add_volume_node_from_image(scene, case.trus, "Phantom TRUS")
    return mr, trus


def put_under_transform(scene: slicer.vtkMRMLScene, volume: Any, mr_to_trus: np.ndarray, name: str) -> Any:
    """Put a volume under a new linear transform node holding the MR->TRUS LPS matrix ``mr_to_trus``."""
    from AIRRegistrationLib import mrml_bridge

    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(
        mrml_bridge.vtk_matrix_from_array(geometry.lps_resampling_to_ras_modeling(mr_to_trus))
    )
    volume.SetAndObserveTransformNodeID(node.GetID())
    return node


def scene_state(scene: slicer.vtkMRMLScene) -> dict[str, tuple]:
    """Per node ID: node MTime, image data MTime (volumes) and parent transform ID."""
    state = {}
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        image = node.GetImageData() if node.IsA("vtkMRMLVolumeNode") else None
        parent = node.GetTransformNodeID() if node.IsA("vtkMRMLTransformableNode") else None
        state[node.GetID()] = (node.GetMTime(), image.GetMTime() if image else None, parent)
    return state


def transform_nodes(scene: slicer.vtkMRMLScene) -> list[str]:
    """Names of the transform nodes in the scene."""
    return [
        scene.GetNthNodeByClass(i, "vtkMRMLTransformNode").GetName()
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLTransformNode"))
    ]


# --- the stand-ins themselves ----------------------------------------------------------------------------


def test_standins_are_undone() -> None:
    """Leaving the stand-in context restores sys.modules, sys.path and the slicer package as they were."""
    modules = ("qt", "ctk", "AIRRegistration", *(f"slicer.{n}" for n in ("i18n", "ScriptedLoadableModule")))
    attributes = ("mrmlScene", "i18n", "ScriptedLoadableModule", "parameterNodeWrapper", "selfTests")
    before = (
        {name: sys.modules.get(name) for name in modules},
        {name: getattr(slicer, name, None) for name in attributes},
        list(sys.path),
        slicer.util.resetSliceViews,
    )
    with slicer_application() as imported:
        assert imported.slicer.mrmlScene.IsA("vtkMRMLScene")
        assert imported.AIRRegistrationLogic().getParameterNode().parameterNode.GetScene() is slicer.mrmlScene
    after = (
        {name: sys.modules.get(name) for name in modules},
        {name: getattr(slicer, name, None) for name in attributes},
        list(sys.path),
        slicer.util.resetSliceViews,
    )
    assert after == before


# --- module metadata and the in-Slicer self-test --------------------------------------------------------


def test_module_metadata_registers_the_self_test(air_module: ModuleType) -> None:
    """Constructing the module class (as Slicer's module factory does) fills the metadata and the test hook."""
    parent = type("Parent", (), {})()
    instance = air_module.AIRRegistration(parent)
    assert parent.title == "AIR Registration"
    assert parent.categories == ["Registration"]
    assert air_module.DISCLAIMER in parent.helpText
    assert slicer.selfTests["AIRRegistration"] == instance.runTest


@pytest.mark.parametrize("method", SELF_TESTS)
def test_self_test(air_module: ModuleType, bundled_model: None, method: str) -> None:
    """Each method of AIRRegistrationTest passes after ``setUp`` (which clears the scene)."""
    leftover = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "left over")
    resets = slicer.util.resetSliceViews.calls
    case = air_module.AIRRegistrationTest(method)
    case.setUp()
    assert slicer.mrmlScene.GetNodeByID(leftover.GetID()) is None
    getattr(case, method)()

    scene = slicer.mrmlScene
    mr = slicer.util.getFirstNodeByName("Phantom MR")
    trus = slicer.util.getFirstNodeByName("Phantom TRUS")
    assert mr is not None and trus is not None
    if method == "test_RegisterPhantom":  # ended with showFusion: every slice view shows MR under TRUS
        for view in SLICE_VIEWS:
            composite = scene.GetSingletonNode(view, "vtkMRMLSliceCompositeNode")
            assert composite.GetBackgroundVolumeID() == mr.GetID()
            assert composite.GetForegroundVolumeID() == trus.GetID()
        assert slicer.util.resetSliceViews.calls == resets + 1
    elif method == "test_InputValidation":
        assert transform_nodes(scene) == ["MR placement"]  # the refused output transform, left unchanged


# --- logic ----------------------------------------------------------------------------------------------


def test_exports_after_registration(
    logic: Any, scene: slicer.vtkMRMLScene, phantom_case: PhantomCase, tmp_path: Path
) -> None:
    """ITK transform, RAS matrix text and JSON report written by the logic match the registration result."""
    mr, trus = add_pair(scene, phantom_case)
    result, out = logic.registerVolumes(mr, trus)
    assert trus.GetTransformNodeID() == out.GetID()

    h5 = tmp_path / "mr_to_trus.h5"
    h5.write_text("an older file the user chose to replace")
    logic.exportTransform(out, str(h5))
    read = geometry.from_sitk(sitk.ReadTransform(str(h5)))
    np.testing.assert_allclose(read, result.mr_to_trus, atol=1e-9)
    # ITK's convention: the file's transform maps an MR (fixed) point onto the TRUS (moving) point, in LPS
    mr_point = np.array(mr.GetOrigin()) * [-1, -1, 1]  # the MR origin, RAS -> LPS
    np.testing.assert_allclose(
        sitk.ReadTransform(str(h5)).TransformPoint(mr_point.tolist()),
        geometry.apply(result.mr_to_trus, mr_point),
        atol=1e-6,
    )

    txt = tmp_path / "trus_to_mr_ras.txt"
    logic.exportMatrix(out, str(txt))
    rows = np.loadtxt(txt, comments="#")
    np.testing.assert_allclose(rows, slicer.util.arrayFromTransformMatrix(out), atol=1e-8)
    np.testing.assert_allclose(rows, result.to_parent_ras, atol=1e-8)

    report_path = tmp_path / "report.json"
    with pytest.raises(ValueError, match="No registration result"):
        logic.exportReport("", str(report_path))
    assert not report_path.exists()
    logic.exportReport(json.dumps(result.report(str(h5)), default=str), str(report_path))
    report = json.loads(report_path.read_text())
    assert report["d_score"] == pytest.approx(result.d_score)
    assert report["transform_file"] == str(h5)
    np.testing.assert_allclose(report["mr_to_trus_lps"], result.mr_to_trus)


def test_register_using_parameter_node(
    logic: Any, air_module: ModuleType, scene: slicer.vtkMRMLScene, phantom_case: PhantomCase
) -> None:
    """Inputs and options are read from the parameter node; results are written back to it in one update."""
    mr, trus = add_pair(scene, phantom_case)
    p = logic.getParameterNode()
    assert p.parameterNode.GetSingletonTag() == "AIRRegistration"
    p.mrVolume, p.trusVolume, p.outputTransform = mr, trus, None
    p.iterations, p.toleranceMm, p.device = 1, 4.0, air_module.Device.CPU
    modified = []
    tag = p.parameterNode.AddObserver("ModifiedEvent", lambda caller, event: modified.append(event))
    try:
        result = logic.registerVolumesUsingParameterNode(p)
    finally:
        p.parameterNode.RemoveObserver(tag)
    assert len(modified) == 1  # NodeModify: one GUI update for all the result fields

    out = p.outputTransform
    assert out is not None and trus.GetTransformNodeID() == out.GetID()
    assert p.parameterNode.GetNodeReferenceID("outputTransform") == out.GetID()
    assert p.dScoreBefore == f"{result.d_score_before:.3f}"
    assert p.dScoreAfter == f"{result.d_score:.3f}"
    assert p.estimatedErrorMm == f"{result.estimated_tre_mm:.1f} mm"
    assert p.samePatient == logic.samePatientText(result.after) and p.samePatient
    assert p.inputCheck == logic.inputCheckText(result.after) and p.inputCheck
    assert p.quality == result.quality and p.quality in ("ok", "warning")
    assert p.statusText == logic.statusText(result.quality, result.warning, result.flag_note)

    report = json.loads(p.reportJson)
    assert report["d_score"] == pytest.approx(result.d_score)
    assert report["quality"] == p.quality
    assert report["tolerance_mm"] == 4.0 and len(report["iterations"]) == 1  # options came from the node
    assert report["device"] == "cpu"
    assert report["slicer"] == {
        "mr_volume": "Phantom MR",
        "trus_volume": "Phantom TRUS",
        "output_transform": out.GetName(),
    }
    # stored on the MRML node, not only on the wrapper object
    again = logic.getParameterNode()
    assert again.reportJson == p.reportJson and again.outputTransform.GetID() == out.GetID()
    assert p.parameterNode.GetParameter("quality") == result.quality


def test_score_flags_gross_misalignment_and_changes_nothing(
    logic: Any, scene: slicer.vtkMRMLScene, phantom_case: PhantomCase
) -> None:
    """The alignment check on a grossly wrong placement warns and leaves the TRUS placement alone."""
    mr, trus = add_pair(scene, phantom_case)
    bad = geometry.RigidTransform((0.0, 0.0, 30.0), (20.0, -15.0, 10.0)).matrix @ np.asarray(phantom_case.gt)
    manual = put_under_transform(scene, trus, bad, "manual")
    p = logic.getParameterNode()
    p.mrVolume, p.trusVolume, p.outputTransform = mr, trus, None
    p.dScoreAfter = "0.999"  # a stale value from an earlier registration
    before = scene_state(scene)
    to_parent = slicer.util.arrayFromTransformMatrix(manual).copy()

    quality = logic.scoreUsingParameterNode(p)

    assert quality.quality == "warning" and quality.warning
    assert p.quality == "warning"
    assert p.statusText.startswith("Current alignment: Warning")
    # its own row: the registration's "before" and "after" rows are not overwritten (here a stale value of
    # no known pair, cleared)
    assert p.dScoreCurrent == f"{quality.d_score:.3f}" and p.dScoreBefore == "" and p.dScoreAfter == ""
    assert p.outputTransform is None
    assert trus.GetTransformNodeID() == manual.GetID()
    np.testing.assert_array_equal(slicer.util.arrayFromTransformMatrix(manual), to_parent)
    after = scene_state(scene)
    parameter_node_id = p.parameterNode.GetID()
    assert {k: v for k, v in after.items() if k != parameter_node_id} == {
        k: v for k, v in before.items() if k != parameter_node_id
    }


def test_same_volume_twice_is_refused_without_changes(
    logic: Any, scene: slicer.vtkMRMLScene, phantom_case: PhantomCase
) -> None:
    """MR and TRUS being one node raises ValueError, and no node is touched."""
    mr, _trus = add_pair(scene, phantom_case)
    manual = put_under_transform(scene, mr, np.asarray(phantom_case.gt), "manual")
    out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "chosen output")
    before = scene_state(scene)
    matrices = {n: slicer.util.arrayFromTransformMatrix(n).copy() for n in (manual, out)}

    with pytest.raises(ValueError, match="must differ"):
        logic.registerVolumes(mr, mr, outputTransformNode=out, initialTransformNode=manual)

    assert scene_state(scene) == before
    for node, matrix in matrices.items():
        np.testing.assert_array_equal(slicer.util.arrayFromTransformMatrix(node), matrix)
    assert out.GetNodeReferenceID(out.GetMovingNodeReferenceRole()) is None
    assert mr.GetTransformNodeID() == manual.GetID()


class DicomDatabaseStandin:
    """Stands in for ``slicer.dicomDatabase`` (a ctkDICOMDatabase): ``isOpen`` and ``instanceValue``."""

    isOpen = True

    def __init__(self, patients: dict[str, str]) -> None:
        self.patients = patients
        self.asked: list[tuple[str, str]] = []

    def instanceValue(self, uid: str, tag: str) -> str:
        self.asked.append((uid, tag))
        return self.patients.get(uid, "")


def test_registration_of_two_patients_from_dicom_warns(
    logic: Any, scene: slicer.vtkMRMLScene, phantom_case: PhantomCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Volumes loaded from DICOM with different PatientIDs in Slicer's DICOM database: the module warns."""
    mr, trus = add_pair(scene, phantom_case)
    mr.SetAttribute("DICOM.instanceUIDs", "1.2.3.1")
    trus.SetAttribute("DICOM.instanceUIDs", "1.2.4.1")
    database = DicomDatabaseStandin({"1.2.3.1": "PAT-001", "1.2.4.1": "PAT-002"})
    monkeypatch.setattr(slicer, "dicomDatabase", database, raising=False)
    put_under_transform(scene, trus, np.asarray(phantom_case.gt), "manual")

    quality = logic.scoreAlignment(mr, trus)  # the true alignment, but the IDs say two patients

    assert quality.quality == "warning" and "different patients" in quality.warning
    assert ("1.2.4.1", "0010,0020") in database.asked
    status = logic.statusText(quality.quality, quality.warning)
    assert status.startswith("Warning: the MR and the TRUS belong to different patients")
    result, _out = logic.registerVolumes(mr, trus)
    assert result.quality == "warning" and "PAT-002" in result.warning
    database.patients["1.2.4.1"] = "PAT-001"  # same patient: the D-score decides again
    assert "different patients" not in (logic.scoreAlignment(mr, trus).warning or "")


def test_registration_of_volumes_filed_under_two_patients_warns(
    logic: Any, scene: slicer.vtkMRMLScene, phantom_case: PhantomCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Volumes loaded from files but filed under different patients in the subject hierarchy, no DICOM
    database: the module warns, naming both."""
    monkeypatch.setattr(slicer, "dicomDatabase", None, raising=False)
    mr, trus = add_pair(scene, phantom_case)
    hierarchy = scene.GetSubjectHierarchyNode()
    for node, name in ((mr, "Patient 1"), (trus, "Patient 2")):
        patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), name)
        hierarchy.CreateItem(patient, node)
    put_under_transform(scene, trus, np.asarray(phantom_case.gt), "manual")

    quality = logic.scoreAlignment(mr, trus)

    assert quality.quality == "warning"
    assert "different patients ('Patient 1' and 'Patient 2')" in quality.warning


def test_same_patient_field_shows_the_check_or_why_there_is_none(logic: Any) -> None:
    from airreg.quality import QualityResult

    def verdict(score, flagged=False):
        return QualityResult(0.0, 0.5, 2.0, 0.1, 5.0, None, score, flagged)

    assert logic.samePatientText(verdict(None)) == "not checked (the model has no patient check)"
    assert logic.samePatientText(verdict(0.834)) == "0.83"
    assert logic.samePatientText(verdict(0.07, flagged=True)) == "0.07 (another patient?)"


def test_status_line_says_when_the_flag_is_not_calibrated(logic: Any) -> None:
    from airreg.checkpoint import FLAG_NOT_CALIBRATED

    assert logic.statusText("ok", None) == "Alignment looks good."
    text = logic.statusText("ok", None, FLAG_NOT_CALIBRATED)
    assert text == f"Alignment looks good. Warning: {FLAG_NOT_CALIBRATED}."


def test_input_check_field_shows_the_statistic_or_why_there_is_none(logic: Any) -> None:
    from airreg.quality import InputVerdict, QualityResult

    def verdict(check):
        return QualityResult(0.0, 0.5, 2.0, 0.1, 5.0, None, input_check=check)

    assert logic.inputCheckText(verdict(None)) == "not checked (the model has no input check)"
    assert logic.inputCheckText(verdict(InputVerdict(3.214, 5.7))) == "3.21 ≤ 5.70: like the training data"
    assert logic.inputCheckText(verdict(InputVerdict(9.5, 5.7))) == "9.50 > 5.70: unlike the training data"
