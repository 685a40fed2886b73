"""The real AIRRegistrationWidget on a real Qt (PySide6, offscreen), driven as a user clicks.

The module file is imported with the MRML stand-ins (Testing/mrml/slicer_app_standins.py) and the PythonQt
shim (pythonqt_shim.py, which says what it cannot show); the registrar is ``ExactRegistrar`` (no networks).
Issue 12 items: 2 (initial-transform selector), 4 (stale results), 7 (panel locked during a run, scene closed
mid-run, status on first use, no install prompt under the wait cursor), 8 (GPU without CUDA), the button
states, and the manual adjustment.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("PySide6", reason="needs PySide6 (pip install PySide6-Essentials)")
slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):  # the unrelated PyPI package named "slicer"
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

TESTING = Path(__file__).resolve().parents[1]
for folder in (TESTING / "widget", TESTING / "mrml"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from exact_registrar import ExactRegistrar  # noqa: E402
from pythonqt_shim import Recorder, module_panel, pythonqt_application  # noqa: E402
from slicer_app_standins import slicer_application  # noqa: E402

from airreg import geometry  # noqa: E402

pytestmark = pytest.mark.slicer

TRUTH = geometry.RigidTransform((2.0, -3.0, 12.0), (15.0, -8.0, 6.0)).matrix


@pytest.fixture(scope="module")
def air_module() -> Iterator[ModuleType]:
    with slicer_application() as imported:
        yield imported


@dataclass
class Panel:
    """The open module panel: the widget, its ``ui`` (PythonQt view), what it asked the application for."""

    widget: Any
    recorder: Recorder
    registrar: ExactRegistrar
    core_calls: list[dict]

    @property
    def ui(self) -> SimpleNamespace:
        return self.widget.ui

    @property
    def p(self) -> Any:
        return self.widget._parameterNode

    def select(self, selector: str, name: str) -> None:
        """The user picks a node by its name in a selector."""
        combo = getattr(self.ui, selector).qobject
        index = combo.findText(name)
        assert index >= 0, f"{name!r} is not listed in {selector}: {self.items(selector)}"
        combo.setCurrentIndex(index)

    def items(self, selector: str) -> list[str]:
        combo = getattr(self.ui, selector).qobject
        return [combo.itemText(i) for i in range(combo.count())]

    def shown(self, name: str) -> bool:
        return not getattr(self.ui, name).qobject.isHidden()

    def click(self, button: str) -> None:
        getattr(self.ui, button).qobject.click()


@pytest.fixture
def panel(air_module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Iterator[Panel]:
    slicer.mrmlScene.Clear(0)
    registrar = ExactRegistrar(TRUTH)
    monkeypatch.setattr(air_module.AIRRegistrationLogic, "getRegistrar", lambda self, *a, **k: registrar)
    with pythonqt_application(monkeypatch, air_module) as recorder:
        core_calls: list[dict] = []

        def ensure_core(self, askConfirmation: bool = True) -> None:
            widget = opened[0]
            core_calls.append({"status": widget.ui.statusLabel.text, "wait_cursor": recorder.wait_cursor})

        opened: list[Any] = []
        monkeypatch.setattr(air_module.AIRRegistrationLogic, "ensureCore", ensure_core)
        widget = air_module.AIRRegistrationWidget(module_panel())
        opened.append(widget)
        widget.setup()
        yield Panel(widget, recorder, registrar, core_calls)
        widget.exit()
        widget.cleanup()
        widget.parent.setMRMLScene(None)


def add_volume(name: str, seed: int, origin=(0.0, 0.0, 0.0)):
    from AIRRegistrationLib import mrml_bridge

    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.normal(100, 20, size=(10, 24, 24)).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 2.0))
    image.SetOrigin(origin)
    return mrml_bridge.add_volume_node_from_image(slicer.mrmlScene, image, name)


def open_with_pair(panel: Panel) -> tuple[Any, Any]:
    """Two volumes loaded, then the module entered again (as after loading data): both pre-selected."""
    mr, trus = add_volume("T2 MR", 1), add_volume("TRUS sweep", 2, origin=(5.0, 0.0, 0.0))
    panel.widget.enter()
    return mr, trus


# --- item 2 and the button states ------------------------------------------------------------------------


def test_initial_transform_selector_lists_linear_transforms(panel: Panel) -> None:
    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "fusion start")
    assert "fusion start" in panel.items("initialTransformSelector")
    assert "fusion start" in panel.items("outputTransformSelector")
    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "gland label")
    assert "gland label" not in panel.items("mrVolumeSelector")


def test_register_is_enabled_only_for_valid_inputs(panel: Panel) -> None:
    ui = panel.ui
    assert not ui.applyButton.enabled and ui.applyButton.text == "Register"
    assert panel.shown("inputHintLabel") and ui.inputHintLabel.text == "Select MR and TRUS volumes"
    assert not ui.checkAlignmentButton.enabled
    for name in (
        "exportTransformButton",
        "exportMatrixButton",
        "exportReportButton",
        "showRegisteredCheckBox",
    ):
        assert not getattr(ui, name).enabled, name

    mr, trus = open_with_pair(panel)
    assert (panel.p.mrVolume.GetName(), panel.p.trusVolume.GetName()) == ("T2 MR", "TRUS sweep")
    assert ui.applyButton.enabled and ui.checkAlignmentButton.enabled and not panel.shown("inputHintLabel")

    panel.select("trusVolumeSelector", "T2 MR")
    assert not ui.applyButton.enabled and ui.inputHintLabel.text == "MR and TRUS must differ"
    assert ui.applyButton.text == "Register"  # the reason is under the button, not in it
    panel.select("trusVolumeSelector", "TRUS sweep")
    assert ui.applyButton.enabled

    parent = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "MR placement")
    mr.SetAndObserveTransformNodeID(parent.GetID())
    panel.select("outputTransformSelector", "MR placement")
    assert not ui.applyButton.enabled and "would move the MR volume" in ui.inputHintLabel.text
    assert ui.checkAlignmentButton.enabled  # the check writes no transform
    panel.select("outputTransformSelector", "Create new transform")
    assert ui.applyButton.enabled

    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "fusion start")
    panel.select("initialTransformSelector", "fusion start")
    panel.select("outputTransformSelector", "fusion start")
    assert not ui.applyButton.enabled and "would overwrite the initial transform" in ui.inputHintLabel.text


# --- item 4: stale results --------------------------------------------------------------------------------


def test_results_are_cleared_when_another_trus_is_selected(panel: Panel) -> None:
    ui = panel.ui
    _mr, trus = open_with_pair(panel)
    other = add_volume("second TRUS", 3)
    panel.click("applyButton")
    out = panel.p.outputTransform
    assert ui.dScoreAfterValueLabel.text != "-" and ui.statusLabel.text == "Alignment looks good."
    assert ui.showRegisteredCheckBox.enabled and ui.exportReportButton.enabled
    assert trus.GetTransformNodeID() == out.GetID()

    panel.select("trusVolumeSelector", "second TRUS")
    assert ui.dScoreBeforeValueLabel.text == ui.dScoreAfterValueLabel.text == "-"
    assert ui.statusLabel.text == "No result yet." and not panel.p.reportJson
    assert not ui.showRegisteredCheckBox.enabled and not ui.exportReportButton.enabled
    ui.showRegisteredCheckBox.qobject.setChecked(False)  # even if toggled (e.g. from Python) ...
    assert other.GetTransformNodeID() is None  # ... the newly selected volume does not move
    assert trus.GetTransformNodeID() == out.GetID()


# --- item 7: a run locks the panel; closing the scene cancels it -----------------------------------------


def test_panel_is_locked_while_registering(panel: Panel) -> None:
    ui = panel.ui
    open_with_pair(panel)
    states: list[dict] = []
    calls: list[int] = []

    def during_run() -> None:
        calls.append(1)
        states.append({name: getattr(ui, name).enabled for name in (
            "mrVolumeSelector", "trusVolumeSelector", "initialTransformSelector", "outputTransformSelector",
            "advancedCollapsibleButton", "applyButton", "checkAlignmentButton", "exportTransformButton",
            "exportMatrixButton", "exportReportButton", "showRegisteredCheckBox", "adjustCheckBox")})  # fmt: skip
        panel.widget.onApplyButton()  # a second click (e.g. a queued event) is ignored

    panel.registrar.on_progress = during_run
    panel.click("applyButton")
    assert len(calls) == 1 and states and not any(states[0].values()), states
    assert ui.applyButton.enabled and ui.mrVolumeSelector.enabled  # usable again afterwards
    # the first use says why it is slow, and any install prompt comes without the wait cursor
    assert panel.core_calls[0]["status"].startswith("Registration: working... The first use loads PyTorch")
    assert panel.core_calls[0]["wait_cursor"] == 0


def test_closing_the_scene_mid_run_cancels_cleanly(panel: Panel) -> None:
    ui = panel.ui
    open_with_pair(panel)
    panel.registrar.on_progress = lambda: slicer.mrmlScene.Clear(0)
    panel.click("applyButton")
    assert panel.recorder.errors == []  # no traceback dialog
    assert ui.statusLabel.text == "Registration cancelled: the scene was closed; nothing was changed."
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 0
    assert not panel.widget._busy and ui.mrVolumeSelector.enabled
    assert not ui.applyButton.enabled and ui.inputHintLabel.text == "Select MR and TRUS volumes"


# --- item 8: a GPU asked for without CUDA ------------------------------------------------------------------


def test_gpu_without_cuda_is_said_in_the_panel(panel: Panel, air_module: ModuleType) -> None:
    open_with_pair(panel)
    assert panel.items("deviceComboBox") == ["Auto", "CPU", "GPU (CUDA)"]
    panel.ui.deviceComboBox.qobject.setCurrentIndex(2)
    assert panel.p.device == air_module.Device.CUDA
    panel.click("applyButton")
    assert "The GPU (CUDA) is not available here: the networks ran on the CPU." in panel.ui.statusLabel.text


# --- manual adjustment --------------------------------------------------------------------------------------


def test_manual_adjustment_from_the_panel(panel: Panel, tmp_path: Path) -> None:
    from AIRRegistrationLib import mrml_bridge

    ui = panel.ui
    _mr, trus = open_with_pair(panel)
    assert not ui.adjustCheckBox.enabled
    panel.click("applyButton")
    out = panel.p.outputTransform
    assert ui.adjustCheckBox.enabled and not ui.adjustCheckBox.checked
    panel.click("adjustCheckBox")
    assert out.GetDisplayNode().GetEditorVisibility() and ui.adjustCheckBox.checked

    moved = geometry.RigidTransform((0, 0, 0), (0, 7, 0)).matrix @ TRUTH  # the user drags the handles 7 mm
    out.SetMatrixTransformToParent(
        mrml_bridge.vtk_matrix_from_array(geometry.lps_resampling_to_ras_modeling(moved))
    )
    panel.recorder.save_paths.append(str(tmp_path / "too early.json"))
    panel.click("exportReportButton")
    assert "moved after it was scored" in ui.statusLabel.text and not (tmp_path / "too early.json").exists()

    panel.click("checkAlignmentButton")
    assert ui.dScoreCurrentValueLabel.text == f"{np.exp(-7 / 5):.3f}"
    assert ui.statusLabel.text.startswith("Adjusted alignment: Warning")
    assert ui.dScoreAfterValueLabel.text == "1.000"  # the registration's row is kept
    panel.recorder.save_paths.append(str(tmp_path / "report.json"))
    panel.click("exportReportButton")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["adjusted_manually"] is True and report["d_score_adjusted"] == pytest.approx(np.exp(-7 / 5))
    assert trus.GetTransformNodeID() == out.GetID()


# --- biopsy targets -----------------------------------------------------------------------------------------


def add_targets(name: str, points_lps, labels=None):
    """An MR point list as a user places it (RAS control points)."""
    from airreg import targets

    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for i, point in enumerate(targets.lps_to_ras(np.asarray(points_lps, dtype=float))):
        node.AddControlPoint([float(v) for v in point], labels[i] if labels else f"T{i + 1}")
    return node


def add_block_labelmap(name: str, value: int):
    """A label map on the MR grid of ``add_volume`` with a block of ``value`` (voxels i 8-12, j 10-14, k 3-6)."""
    from AIRRegistrationLib import mrml_bridge

    array = np.zeros((10, 24, 24), np.int16)
    array[3:7, 10:15, 8:13] = value
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.0))
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    mrml_bridge.update_volume_node_from_image(node, image)
    return node


def node_states() -> dict[str, tuple]:
    """Per node ID: node MTime, image MTime (volumes), parent transform; the module's parameter node left out."""
    scene, state = slicer.mrmlScene, {}
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.IsA("vtkMRMLScriptedModuleNode"):
            continue
        image = node.GetImageData() if node.IsA("vtkMRMLVolumeNode") else None
        parent = node.GetTransformNodeID() if node.IsA("vtkMRMLTransformableNode") else None
        state[node.GetID()] = (node.GetMTime(), image.GetMTime() if image else None, parent)
    return state


MR_TARGETS_LPS = np.array([[10.0, 12.0, 8.0], [14.0, 6.0, 10.0], [6.0, 16.0, 12.0]])


def test_targets_mapped_and_exported_from_the_panel(panel: Panel, tmp_path: Path) -> None:
    from airreg import resampling, targets
    from AIRRegistrationLib import mrml_bridge

    ui = panel.ui
    _mr, trus = open_with_pair(panel)
    add_targets("lesion targets", MR_TARGETS_LPS, ["lesion_1", "lesion_2", "apex"])
    add_block_labelmap("lesion labels", 3)
    assert panel.items("targetPointsSelector") == ["None", "lesion targets"]
    assert panel.items("targetSegmentationSelector") == ["None", "lesion labels"]  # no MR or TRUS volume
    panel.select("targetPointsSelector", "lesion targets")
    panel.select("targetSegmentationSelector", "lesion labels")
    assert not ui.mapTargetsButton.enabled and not ui.exportTargetsButton.enabled
    assert ui.targetsStatusLabel.text.startswith("Register first")

    panel.click("applyButton")
    assert ui.mapTargetsButton.enabled and ui.exportTargetsButton.enabled
    assert ui.targetsStatusLabel.text == "Not mapped with the current result: click Map to TRUS."
    panel.click("mapTargetsButton")
    points, labels = panel.p.mappedTargets, panel.p.mappedSegmentation
    assert ui.targetsStatusLabel.text == "In TRUS coordinates: lesion targets (TRUS), lesion labels (TRUS)"
    composites = [
        slicer.mrmlScene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        for i in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
    ]
    assert composites and all(
        c.GetLabelVolumeID() == labels.GetID() for c in composites
    )  # shown in the views
    trus_points = geometry.apply(TRUTH, MR_TARGETS_LPS)  # the exact registrar's result is the truth
    mapped = mrml_bridge.targets_from_markups_node(points, world=False)
    np.testing.assert_allclose(mapped.points_lps, trus_points, atol=1e-6)
    assert mapped.labels == ("lesion_1", "lesion_2", "apex")
    world = mrml_bridge.targets_from_markups_node(points, world=True).points_lps
    np.testing.assert_allclose(world, MR_TARGETS_LPS, atol=1e-6)  # shown on the MR targets
    on_trus = mrml_bridge.label_image_from_labelmap_node(labels, include_parent=False)
    assert on_trus.GetSize() == mrml_bridge.image_from_volume_node(trus, include_parent=False).GetSize()
    block = geometry.apply(np.diag([1.0, 1.0, 2.0, 1.0]), np.array([10.0, 12.0, 4.5]))  # the block's centre
    index = np.argwhere(sitk.GetArrayFromImage(on_trus) == 3)[:, ::-1].astype(float)
    centroid = geometry.apply(resampling.index_to_world(on_trus), index).mean(axis=0)
    assert np.linalg.norm(centroid - geometry.apply(TRUTH, block)) < 2.0  # within a voxel (2 mm)

    panel.click("mapTargetsButton")  # again: the same nodes are updated
    assert (panel.p.mappedTargets.GetID(), panel.p.mappedSegmentation.GetID()) == (
        points.GetID(),
        labels.GetID(),
    )
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 2

    panel.ui.targetsFormatComboBox.qobject.setCurrentIndex(1)  # CSV
    assert panel.items("labelmapFormatComboBox") == ["NRRD (.nrrd)", "NIfTI (.nii.gz)"]
    panel.ui.labelmapFormatComboBox.qobject.setCurrentIndex(1)
    panel.recorder.save_paths.append(str(tmp_path / "biopsy.json"))
    panel.click("exportTargetsButton")
    assert panel.recorder.errors == []
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "biopsy.json",
        "biopsy_labels.nii.gz",
        "biopsy_targets.csv",
    ]
    report = json.loads((tmp_path / "biopsy.json").read_text())
    assert report["model_sha256"] == "0" * 64 and report["adjusted_manually"] is False
    assert report["targets"]["output_file"] == str(tmp_path / "biopsy_targets.csv")
    assert report["segmentation"]["output_file"] == str(tmp_path / "biopsy_labels.nii.gz")
    assert report["segmentation"]["labels"] == [3]
    read = targets.read_targets(tmp_path / "biopsy_targets.csv", space="TRUS")
    np.testing.assert_allclose(read.points_lps, trus_points, atol=1e-6)


def test_bad_targets_give_a_panel_message_and_change_nothing(panel: Panel, tmp_path: Path) -> None:
    ui = panel.ui
    open_with_pair(panel)
    add_targets("plan", MR_TARGETS_LPS)
    panel.select("targetPointsSelector", "plan")
    panel.click("applyButton")
    panel.click("mapTargetsButton")
    half = add_targets("half placed", MR_TARGETS_LPS[:2])
    half.UnsetNthControlPointPosition(1)
    add_block_labelmap("lesion labels", 2)
    panel.select("targetPointsSelector", "half placed")
    panel.select("targetSegmentationSelector", "lesion labels")
    before = node_states()
    matrix = slicer.util.arrayFromTransformMatrix(panel.p.outputTransform).copy()

    panel.click("mapTargetsButton")
    assert ui.statusLabel.text == "Map to TRUS failed: point list 'half placed': point 2 ('T2') is not placed"
    assert panel.recorder.errors == []  # no traceback dialog
    assert node_states() == before  # no node added, modified or moved (the label map was not mapped either)
    np.testing.assert_array_equal(slicer.util.arrayFromTransformMatrix(panel.p.outputTransform), matrix)
    assert ui.mapTargetsButton.enabled and ui.applyButton.enabled  # usable again

    panel.recorder.save_paths.append(str(tmp_path / "report.json"))
    panel.click("exportTargetsButton")
    assert ui.statusLabel.text == (
        "Export failed: 'half placed' is not mapped with the current result: click Map to TRUS first."
    )
    assert list(tmp_path.iterdir()) == [] and node_states() == before
