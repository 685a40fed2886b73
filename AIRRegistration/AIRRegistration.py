"""AIR Registration: adversarial MR-TRUS rigid registration with a discriminator quality flag (3D Slicer module).

Four parts as in Slicer's scripted-module template: module metadata, a parameter node, a thin widget and a
logic usable without the widget. MRML <-> image conversions live in ``AIRRegistrationLib.mrml_bridge`` (Qt-free,
tested with pytest); registration and scoring live in the ``airreg`` core, imported lazily together with torch.
"""

import enum
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Annotated, Union

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLLinearTransformNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTransformNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: This module's folder. Slicer's scripted-module factory *appends* it to sys.path
#: (Base/QTGUI/qSlicerScriptedLoadableModuleFactory.cxx:59, appendPythonPaths, v5.12.3), so a pip-installed
#: ``airregistration`` in site-packages would shadow the bundled ``airreg`` core: put the folder first.
MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if sys.path[:1] != [MODULE_DIR]:
    if MODULE_DIR in sys.path:
        sys.path.remove(MODULE_DIR)
    sys.path.insert(0, MODULE_DIR)

DISCLAIMER = _(
    "Research software. The bundled model was trained on synthetic phantoms only: it is not for clinical use "
    "until it has been trained and validated on your own data."
)

#: Packages Slicer already ships; the module never asks pip to install or upgrade them.
SLICER_OWNED_PACKAGES = ("SimpleITK", "numpy", "vtk")
#: Import names the inference core needs besides torch (Slicer 5.10 and 5.12 ship scipy: then nothing to do).
CORE_REQUIREMENTS = ("scipy",)


#
# AIRRegistration
#


class AIRRegistration(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("AIR Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["AIRRegistration developers"]
        self.parent.helpText = _(
            "Rigid registration of a 3D transrectal ultrasound (TRUS) volume to an MR volume with AIR-net "
            "(adversarial image registration), plus a discriminator score (D-score) and an estimated error that "
            "flag poor alignments. The result is a linear transform: the TRUS volume is put under it, and it can "
            "be exported as an ITK transform (LPS), a 4x4 RAS matrix and a JSON report for biopsy planning. "
            "Biopsy targets on the MR (a point list, a segmentation or a label map) are mapped into TRUS "
            "coordinates and saved with the report. "
            "It also warns when the two volumes belong to different patients (their DICOM PatientIDs, or the "
            "patients they are filed under in the Data module)."
        )
        self.parent.helpText += "<br><br><b>" + DISCLAIMER + "</b>"
        self.parent.acknowledgementText = _(
            "Method: P. Yan, S. Xu, A. R. Rastinehad, B. J. Wood, 'Adversarial Image Registration with "
            "Application for MR and TRUS Image Fusion', MLMI 2018. This implementation is independent of the "
            "authors. Module layout follows Slicer's scripted-module template and SlicerElastix."
        )


#
# AIRRegistrationParameterNode
#


class Device(enum.Enum):
    """Where the networks run."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self):
        return {"auto": _("Auto"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)")}[self.value]


class TargetsFormat(enum.Enum):
    """File format of exported targets (the value is the file-name ending)."""

    MRK_JSON = ".mrk.json"
    CSV = ".csv"

    def label(self):
        return {".mrk.json": _("Slicer point list (.mrk.json)"), ".csv": _("CSV, LPS and RAS (.csv)")}[
            self.value
        ]


class LabelmapFormat(enum.Enum):
    """File format of an exported label map (the value is the file-name ending)."""

    NRRD = ".nrrd"
    NIFTI = ".nii.gz"

    def label(self):
        return {".nrrd": _("NRRD (.nrrd)"), ".nii.gz": _("NIfTI (.nii.gz)")}[self.value]


@parameterNodeWrapper
class AIRRegistrationParameterNode:
    """Inputs, options and the last result (read-only strings shown in the Results section).

    mrVolume - fixed volume. trusVolume - moving volume, put under outputTransform after registration.
    initialTransform - starting alignment; None: the transform the TRUS volume is already under.
    outputTransform - receives the result; None: a new node is created.
    modelPath - AIR-net checkpoint; empty: the bundled model (trained on synthetic phantoms).
    The result fields describe resultMrVolume, resultTrusVolume and resultTransform; they are cleared when the
    selection changes (see AIRRegistrationLogic.clearStaleResults).
    targetPoints, targetSegmentation - biopsy targets on the MR (a point list; a segmentation or label map).
    mappedTargets, mappedSegmentation - the nodes *Map to TRUS* made from them (updated by the next mapping).
    """

    mrVolume: vtkMRMLScalarVolumeNode
    trusVolume: vtkMRMLScalarVolumeNode
    initialTransform: vtkMRMLTransformNode
    outputTransform: vtkMRMLLinearTransformNode
    modelPath: str = ""
    device: Device = Device.AUTO
    iterations: Annotated[int, WithinRange(1, 10)] = 3
    toleranceMm: Annotated[float, WithinRange(0.5, 20)] = 5.0
    # biopsy targets (None is part of the union, as Slicer's UnionSerializer needs it to store "no node")
    targetPoints: vtkMRMLMarkupsFiducialNode
    targetSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # noqa: UP007
    mappedTargets: vtkMRMLMarkupsFiducialNode
    mappedSegmentation: vtkMRMLLabelMapVolumeNode
    targetsFormat: TargetsFormat = TargetsFormat.MRK_JSON
    labelmapFormat: LabelmapFormat = LabelmapFormat.NRRD
    # results (written by the logic, shown read-only); result* name the nodes they describe
    resultMrVolume: vtkMRMLScalarVolumeNode
    resultTrusVolume: vtkMRMLScalarVolumeNode
    resultTransform: vtkMRMLLinearTransformNode
    dScoreBefore: str = ""
    dScoreAfter: str = ""
    dScoreCurrent: str = ""
    estimatedErrorMm: str = ""
    samePatient: str = ""
    inputCheck: str = ""
    elapsed: str = ""
    quality: str = ""
    statusText: str = ""
    reportJson: str = ""


class MissingDependencyError(ValueError):
    """A required Python package is missing and was not installed."""


#: Volume names that say ultrasound (pre-selected as the TRUS volume).
ULTRASOUND_NAME = re.compile(r"trus|ultrasound|(?<![a-z])us(?![a-z])", re.IGNORECASE)

#: Parameter-node fields holding results (text), cleared together when they go stale.
RESULT_TEXT_FIELDS = (
    "dScoreBefore",
    "dScoreAfter",
    "dScoreCurrent",
    "estimatedErrorMm",
    "samePatient",
    "inputCheck",
    "elapsed",
    "quality",
    "statusText",
    "reportJson",
)


def sameNode(a, b) -> bool:
    """Whether two node variables name the same MRML node (or are both None)."""
    if a is None or b is None:
        return a is None and b is None
    return a.GetID() == b.GetID()


def slicerPackaging():
    """Slicer's ``slicer.packaging`` (5.12+), or None in older Slicer.

    ``import slicer`` does not import it (Slicer 5.12 ``slicer/__init__.py``), so it is imported here as the
    scripted-module template (``Utilities/Templates/Modules/Scripted/TemplateKey.py``) does.
    """
    try:
        import slicer.packaging
    except ImportError:
        return None
    return slicer.packaging


def testingEnabled() -> bool:
    """Whether Slicer runs in testing mode (``--testing``): then ``pip_ensure`` installs nothing."""
    app = getattr(slicer, "app", None)
    return bool(app is not None and app.testingEnabled())


def dicomPatientLookup():
    """PatientID of a DICOM instance UID from Slicer's DICOM database, or None when no database is open.

    Volumes loaded from DICOM carry their instance UIDs; with their PatientIDs (else the subject hierarchy's
    patients, see ``mrml_bridge.patient_id_of_node``) the core warns when the MR and the TRUS belong to different
    patients.
    """
    database = getattr(slicer, "dicomDatabase", None)
    if database is None or not database.isOpen:
        return None
    return lambda uid: database.instanceValue(uid, "0010,0020")


#
# AIRRegistrationWidget
#


class RegistrationCancelled(ValueError):
    """The scene was closed while a registration or a check ran; nothing was changed."""


class AIRRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: binds the .ui to the parameter node and forwards actions to the logic.

    While an action runs (registration runs in the GUI thread; its progress callback pumps events), inputs,
    options and exports are disabled and a second click is ignored; closing the scene cancels the run.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._busy = False
        self._cancelled = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AIRRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.disclaimerLabel.text = DISCLAIMER
        self.ui.progressBar.hide()

        self.logic = AIRRegistrationLogic()
        self.logic.logCallback = self.addLog

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.checkAlignmentButton.connect("clicked(bool)", self.onCheckAlignmentButton)
        self.ui.modelPathBrowseButton.connect("clicked(bool)", self.onBrowseModel)
        self.ui.showRegisteredCheckBox.connect("toggled(bool)", self.onShowRegisteredToggled)
        self.ui.adjustCheckBox.connect("toggled(bool)", self.onAdjustToggled)
        self.ui.exportTransformButton.connect("clicked(bool)", self.onExportTransform)
        self.ui.exportMatrixButton.connect("clicked(bool)", self.onExportMatrix)
        self.ui.exportReportButton.connect("clicked(bool)", self.onExportReport)
        self.ui.mapTargetsButton.connect("clicked(bool)", self.onMapTargets)
        self.ui.exportTargetsButton.connect("clicked(bool)", self.onExportTargets)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode
            )

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelled = self._busy  # a running action stops at its next progress report
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        # Save the user a few clicks, as the template does. A selector without "None" shows the first volume
        # of the scene, so both may name the same one: then the TRUS is chosen again.
        if p.mrVolume is None or p.trusVolume is None or sameNode(p.mrVolume, p.trusVolume):
            mr, trus = self.logic.defaultVolumes(slicer.mrmlScene)
            with slicer.util.NodeModify(p.parameterNode):
                p.mrVolume = p.mrVolume or mr
                if p.trusVolume is None or sameNode(p.mrVolume, p.trusVolume):
                    p.trusVolume = trus if not sameNode(trus, p.mrVolume) else mr

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode
            )
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode
            )
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """Button states and the read-only result labels."""
        p = self._parameterNode
        if p is None:
            return
        from AIRRegistrationLib import mrml_bridge

        if not self._busy and self.logic.clearStaleResults(p):
            return  # clearing modified the parameter node, which ran this method again
        reason = mrml_bridge.validate_inputs(p.mrVolume, p.trusVolume, p.outputTransform, p.initialTransform)
        idle = not self._busy
        self.ui.applyButton.enabled = reason is None and idle
        self.ui.applyButton.toolTip = _("Run AIR-net rigid registration.") if reason is None else reason
        self.ui.inputHintLabel.text = reason or ""
        self.ui.inputHintLabel.visible = reason is not None
        self.ui.checkAlignmentButton.enabled = (
            mrml_bridge.validate_inputs(p.mrVolume, p.trusVolume) is None and idle
        )
        for widget in (
            self.ui.mrVolumeSelector,
            self.ui.trusVolumeSelector,
            self.ui.initialTransformSelector,
            self.ui.outputTransformSelector,
            self.ui.advancedCollapsibleButton,
            self.ui.targetPointsSelector,
            self.ui.targetSegmentationSelector,
            self.ui.targetsFormatComboBox,
            self.ui.labelmapFormatComboBox,
        ):
            widget.enabled = idle

        self.ui.dScoreBeforeValueLabel.text = p.dScoreBefore or "-"
        self.ui.dScoreAfterValueLabel.text = p.dScoreAfter or "-"
        self.ui.dScoreCurrentValueLabel.text = p.dScoreCurrent or "-"
        self.ui.estimatedErrorValueLabel.text = p.estimatedErrorMm or "-"
        self.ui.samePatientValueLabel.text = p.samePatient or "-"
        self.ui.inputCheckValueLabel.text = p.inputCheck or "-"
        self.ui.timeValueLabel.text = p.elapsed or "-"
        if idle:
            self._showStatus(p.statusText or _("No result yet."), p.quality)

        hasResult = bool(p.reportJson) and p.resultTransform is not None and self.logic.resultIsCurrent(p)
        self.ui.showRegisteredCheckBox.enabled = hasResult and idle
        self.ui.adjustCheckBox.enabled = hasResult and idle
        wasBlocked = self.ui.adjustCheckBox.blockSignals(True)
        self.ui.adjustCheckBox.checked = hasResult and self.logic.transformHandlesShown(p.resultTransform)
        self.ui.adjustCheckBox.blockSignals(wasBlocked)
        self.ui.exportTransformButton.enabled = p.outputTransform is not None and idle
        self.ui.exportMatrixButton.enabled = p.outputTransform is not None and idle
        self.ui.exportReportButton.enabled = hasResult and idle
        hasTargets = p.targetPoints is not None or p.targetSegmentation is not None
        self.ui.mapTargetsButton.enabled = hasResult and hasTargets and idle
        self.ui.exportTargetsButton.enabled = hasResult and hasTargets and idle
        self.ui.targetsStatusLabel.text = self.logic.targetsStatus(p, hasResult)

    def _showStatus(self, text: str, quality: str) -> None:
        style = {
            "ok": "QLabel { color: #ffffff; background-color: #2e7d32; padding: 4px; border-radius: 3px; }",
            "warning": "QLabel { color: #ffffff; background-color: #c62828; padding: 4px; border-radius: 3px; "
            "font-weight: bold; }",
        }.get(quality, "")
        self.ui.statusLabel.styleSheet = style
        self.ui.statusLabel.text = text

    def addLog(self, text: str) -> None:
        """Log callback handed to the logic (like SlicerElastix): messages go to the status bar too."""
        slicer.util.showStatusMessage(text, 3000)
        slicer.app.processEvents()

    def _checkCancelled(self) -> None:
        if self._cancelled:
            raise RegistrationCancelled(_("the scene was closed"))

    def _onProgress(self, fraction: float, message: str) -> None:
        self._checkCancelled()
        self.ui.progressBar.value = int(round(100 * max(0.0, min(1.0, fraction))))
        self.ui.progressBar.format = f"{message} %p%"
        slicer.app.processEvents()
        self._checkCancelled()

    def _report(self, text: str) -> None:
        """A failure or cancellation in the panel (and the status bar, if the scene has no parameter node)."""
        p = self._parameterNode
        if p is None:
            slicer.util.showStatusMessage(text, 5000)
            return
        self.logic.clearStaleResults(p)  # results of other nodes go; the message is about the selected ones
        with slicer.util.NodeModify(p.parameterNode):
            if p.resultMrVolume is None and p.resultTrusVolume is None:
                p.resultMrVolume, p.resultTrusVolume = p.mrVolume, p.trusVolume
            p.quality = "warning"
            p.statusText = text

    def _run(self, what: str, action, needsCore: bool = False):
        """Run an action with the panel locked; bad input, a refused install or a closed scene shows a message
        in the panel, no traceback dialog. A click while an action runs is ignored."""
        if self._busy or self._parameterNode is None:
            return None
        self._busy, self._cancelled = True, False
        self.updateGUIFromParameterNode()
        working = _("{what}: working...").format(what=what)
        if needsCore:
            working += " " + _("The first use loads PyTorch and the model, which can take a minute.")
        self._showStatus(working, "")
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        slicer.app.processEvents()
        try:
            if needsCore:
                self.logic.ensureCore()  # may ask to install packages: not under the wait cursor
            self._checkCancelled()
            with slicer.util.WaitCursor():
                return action()
        except ValueError as exc:  # InputError, ModelError, MissingDependencyError, RegistrationCancelled ...
            if self._cancelled:
                self._report(
                    _("{what} cancelled: the scene was closed; nothing was changed.").format(what=what)
                )
            else:
                logging.warning(f"{what} failed: {exc}")
                self._report(_("{what} failed: {error}").format(what=what, error=exc))
        except Exception as exc:
            logging.error(traceback.format_exc())
            self._report(_("{what} failed: {error}").format(what=what, error=exc))
            slicer.util.errorDisplay(
                _("{what} failed: {error}").format(what=what, error=exc), detailedText=traceback.format_exc()
            )
        finally:
            self._busy = False
            self.ui.progressBar.hide()
            self.updateGUIFromParameterNode()
        return None

    def onApplyButton(self) -> None:
        def register():
            p = self._parameterNode
            mr, trus = p.mrVolume, p.trusVolume
            self.logic.registerVolumesUsingParameterNode(p, progressCallback=self._onProgress)
            self.ui.showRegisteredCheckBox.checked = True  # the TRUS volume is now under the result
            self.logic.showFusion(mr, trus)

        self._run(_("Registration"), register, needsCore=True)

    def onCheckAlignmentButton(self) -> None:
        self._run(
            _("Alignment check"),
            lambda: self.logic.scoreUsingParameterNode(self._parameterNode),
            needsCore=True,
        )

    def onBrowseModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(),
            _("AIR-net checkpoint"),
            self._parameterNode.modelPath or "",
            _("PyTorch checkpoint (*.pt *.pth);;All files (*)"),
        )
        if path:
            self._parameterNode.modelPath = path

    def onShowRegisteredToggled(self, after: bool) -> None:
        p = self._parameterNode
        if p is None or p.resultTransform is None or not self.logic.resultIsCurrent(p):
            return
        self.logic.showAlignment(p.resultTrusVolume, p.resultTransform, after)

    def onAdjustToggled(self, visible: bool) -> None:
        """Handles on the output transform; the TRUS is put under it so that dragging them moves the TRUS."""
        p = self._parameterNode
        if p is None or p.resultTransform is None or not self.logic.resultIsCurrent(p):
            return
        if visible:
            self.ui.showRegisteredCheckBox.checked = True
        self.logic.showTransformHandles(p.resultTransform, visible)

    def _saveFileName(self, caption: str, defaultName: str, fileFilter: str) -> str:
        # QFileDialog asks before replacing an existing file, so a chosen name may be overwritten.
        return qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), caption, os.path.join(qt.QDir.homePath(), defaultName), fileFilter
        )

    def onExportTransform(self) -> None:
        path = self._saveFileName(
            _("Save transform"), "mr_to_trus.h5", _("ITK transform (*.h5 *.tfm *.txt);;All files (*)")
        )
        p = self._parameterNode
        if path:
            self._run(_("Export"), lambda: self.logic.exportTransform(p.outputTransform, path, p.mrVolume))

    def onExportMatrix(self) -> None:
        path = self._saveFileName(_("Save 4x4 RAS matrix"), "trus_to_mr_ras.txt", _("Text (*.txt)"))
        p = self._parameterNode
        if path:
            self._run(_("Export"), lambda: self.logic.exportMatrix(p.outputTransform, path, p.mrVolume))

    def onExportReport(self) -> None:
        path = self._saveFileName(_("Save report"), "air_registration_report.json", _("JSON (*.json)"))
        p = self._parameterNode
        if path:
            self._run(_("Export"), lambda: self.logic.exportReport(p.reportJson, path, p.resultTransform))

    def onMapTargets(self) -> None:
        def mapTargets():
            _points, labelmap = self.logic.mapTargetsUsingParameterNode(self._parameterNode)
            if labelmap is not None:
                self.logic.showLabelmap(labelmap)

        self._run(_("Map to TRUS"), mapTargets)

    def onExportTargets(self) -> None:
        path = self._saveFileName(
            _("Save targets and report (the target files are saved next to it)"),
            "biopsy_targets_report.json",
            _("JSON (*.json)"),
        )
        p = self._parameterNode
        if path:
            self._run(_("Export"), lambda: self.logic.exportTargetsUsingParameterNode(p, path))


#
# AIRRegistrationLogic
#


class AIRRegistrationLogic(ScriptedLoadableModuleLogic):
    """Registration on MRML nodes; usable without the widget (e.g. from the Python console or a test).

    Heavy packages (torch, the ``airreg`` core) are imported inside methods so the module loads without them.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback = None
        self._registrar = None
        self._registrarKey = None

    def getParameterNode(self):
        return AIRRegistrationParameterNode(super().getParameterNode())

    def addLog(self, text: str) -> None:
        logging.info(text)
        if self.logCallback:
            self.logCallback(text)

    # --- dependencies ---------------------------------------------------------------------------------

    def ensureTorch(self, askConfirmation: bool = True):
        """The torch module: already importable, else through the PyTorch extension, else pip after asking.

        Raises MissingDependencyError if torch is not available and the user declines the install.
        """
        if importlib.util.find_spec("torch") is not None:
            return self._importTorch()
        try:
            import PyTorchUtils
        except ImportError:
            PyTorchUtils = None
        if PyTorchUtils is not None:
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    _("AIR Registration needs PyTorch. Install it now through the PyTorch extension?")
                ):
                    raise MissingDependencyError(_("PyTorch is required; the install was declined."))
                torch = torchLogic.installTorch(askConfirmation=False)
            else:
                torch = torchLogic.torch
            if torch is None:
                raise MissingDependencyError(_("PyTorch could not be installed; see the PyTorch module."))
            return torch
        self._pipEnsure(["torch"], askConfirmation)
        return self._importTorch()

    def _importTorch(self):
        """Import torch, saying so first: the first import takes seconds, with the GUI frozen."""
        if "torch" not in sys.modules:
            self.addLog(_("Loading PyTorch (the first time takes a while)..."))
        import torch

        return torch

    def ensureCore(self, askConfirmation: bool = True):
        """The ``airreg.registration`` module with its pip dependencies (never SimpleITK or numpy).

        The inference core needs torch, numpy, SimpleITK and scipy only; Slicer ships all but torch.
        """
        self.ensureTorch(askConfirmation)
        missing = [name for name in CORE_REQUIREMENTS if importlib.util.find_spec(name) is None]
        if missing:
            self._pipEnsure(missing, askConfirmation)
        from airreg import registration

        return registration

    def _pipEnsure(self, requirements, askConfirmation: bool) -> None:
        """Install missing pip ``requirements`` as Slicer's scripted-module template does.

        Slicer 5.12+: ``slicer.packaging.pip_ensure`` (which asks first, and installs nothing in testing mode);
        older Slicer: ask, then ``slicer.util.pip_install``. A declined or skipped install raises
        MissingDependencyError (a ValueError: the panel shows it as a message, not as a traceback).
        """
        requirements = [r for r in requirements if r.split("[")[0] not in SLICER_OWNED_PACKAGES]
        names = ", ".join(requirements)
        packaging = slicerPackaging()
        if packaging is not None:
            try:
                packaging.pip_ensure(
                    requirements, requester="AIR Registration", prompt_install=askConfirmation
                )
            except RuntimeError as exc:  # "User declined package installation"
                raise MissingDependencyError(
                    _("Required Python packages are missing: {names} (not installed: {reason}).").format(
                        names=names, reason=exc
                    )
                ) from exc
        else:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("AIR Registration needs these Python packages: {names}. Install them now?").format(
                    names=names
                )
            ):
                raise MissingDependencyError(
                    _("Required Python packages are missing: {names}; the install was declined.").format(
                        names=names
                    )
                )
            slicer.util.pip_install(requirements)
        importlib.invalidate_caches()
        still = [r for r in requirements if importlib.util.find_spec(r) is None]
        if still:
            raise MissingDependencyError(
                _("Required Python packages are missing: {names}.").format(names=", ".join(still))
                + (_(" Slicer installs no packages in testing mode.") if testingEnabled() else "")
            )

    def getRegistrar(
        self, modelPath: str = "", device: str = "auto", iterations: int = 3, toleranceMm: float = 5.0
    ):
        """A cached ``airreg.registration.Registrar``; ModelError (a ValueError) if the model fails to load."""
        registration = self.ensureCore()
        key = (modelPath or None, device)
        if self._registrar is None or self._registrarKey != key:
            self.addLog(_("Loading model {name}").format(name=modelPath or _("(bundled)")))
            self._registrar = registration.Registrar.from_checkpoint(
                path=modelPath or None,
                device=device,
                iterations=int(iterations),
                tolerance_mm=float(toleranceMm),
            )
            self._registrarKey = key
        # options that do not need the model reloaded
        self._registrar.iterations = int(iterations)
        self._registrar.tolerance_mm = float(toleranceMm)
        return self._registrar

    # --- registration ---------------------------------------------------------------------------------

    def registerVolumes(
        self,
        mrVolumeNode,
        trusVolumeNode,
        outputTransformNode=None,
        initialTransformNode=None,
        modelPath: str = "",
        device: str = "auto",
        iterations: int = 3,
        toleranceMm: float = 5.0,
        progressCallback=None,
    ):
        """Register TRUS (moving) to MR (fixed); return ``(result, outputTransformNode)``.

        Raises ValueError with a user-readable message on bad input (also an output transform the MR is
        under, the TRUS's current placement or the initial transform); no node is changed before the registration has succeeded. The
        output transform (created if None) gets the RAS modeling matrix and fixed/moving references, and the
        TRUS volume is put under it.
        """
        from AIRRegistrationLib import mrml_bridge

        reason = mrml_bridge.validate_inputs(
            mrVolumeNode, trusVolumeNode, outputTransformNode, initialTransformNode
        )
        if reason:
            raise ValueError(reason)
        registrar = self.getRegistrar(modelPath, device, iterations, toleranceMm)
        self.addLog(
            _("Registering {trus} to {mr}").format(trus=trusVolumeNode.GetName(), mr=mrVolumeNode.GetName())
        )
        result, outputTransformNode = mrml_bridge.register_volume_nodes(
            registrar,
            mrVolumeNode,
            trusVolumeNode,
            outputTransformNode,
            initialTransformNode,
            progressCallback,
            patient_lookup=dicomPatientLookup(),
        )
        self.addLog(
            _("D-score {before:.3f} -> {after:.3f}, estimated error {tre:.1f} mm, {seconds:.1f} s").format(
                before=result.d_score_before,
                after=result.d_score,
                tre=result.estimated_tre_mm,
                seconds=result.seconds,
            )
        )
        if result.warning:
            logging.warning(f"AIR Registration: {result.warning}")
        return result, outputTransformNode

    def scoreAlignment(
        self,
        mrVolumeNode,
        trusVolumeNode,
        modelPath: str = "",
        device: str = "auto",
        toleranceMm: float = 5.0,
    ):
        """Score the alignment as Slicer shows it now (TRUS under its current transform); changes nothing."""
        from AIRRegistrationLib import mrml_bridge

        reason = mrml_bridge.validate_inputs(mrVolumeNode, trusVolumeNode)
        if reason:
            raise ValueError(reason)
        registrar = self.getRegistrar(modelPath, device, 1, toleranceMm)
        quality = mrml_bridge.score_volume_nodes(
            registrar, mrVolumeNode, trusVolumeNode, patient_lookup=dicomPatientLookup()
        )
        if quality.warning:
            logging.warning(f"AIR Registration: {quality.warning}")
        return quality

    def registerVolumesUsingParameterNode(self, parameterNode, progressCallback=None):
        """Unpack the parameter node into :meth:`registerVolumes` and store the results on it.

        The nodes are read once, before the run: the results and the report describe these nodes even if the
        selection changes while the registration runs.
        """
        p = parameterNode
        mr, trus, output = p.mrVolume, p.trusVolume, p.outputTransform
        result, outputTransformNode = self.registerVolumes(
            mr,
            trus,
            outputTransformNode=output,
            initialTransformNode=p.initialTransform,
            modelPath=p.modelPath.strip(),
            device=p.device.value,
            iterations=p.iterations,
            toleranceMm=p.toleranceMm,
            progressCallback=progressCallback,
        )
        from AIRRegistrationLib import mrml_bridge

        warning = mrml_bridge.warning_without_patient_ids(result.warning, mr, trus, dicomPatientLookup())
        report = mrml_bridge.build_report(result.report(), mr, trus, outputTransformNode)
        report["warning"] = warning
        with slicer.util.NodeModify(p.parameterNode):  # one GUI update
            p.outputTransform = outputTransformNode
            p.resultMrVolume, p.resultTrusVolume, p.resultTransform = mr, trus, outputTransformNode
            p.dScoreBefore = f"{result.d_score_before:.3f}"
            p.dScoreAfter = f"{result.d_score:.3f}"
            p.dScoreCurrent = ""
            p.estimatedErrorMm = f"{result.estimated_tre_mm:.1f} mm"
            p.samePatient = self.samePatientText(result.after)
            p.inputCheck = self.inputCheckText(result.after)
            p.elapsed = f"{result.seconds:.1f} s"
            p.quality = result.quality
            p.statusText = self.statusText(result.quality, warning, result.flag_note) + self.deviceNote(
                p.device, result.device
            )
            p.reportJson = json.dumps(report, default=str)
        return result

    def scoreUsingParameterNode(self, parameterNode):
        """Score the current alignment and show it in the result fields (no node other than ``p`` changes).

        When the TRUS is under the output transform of the current result, the report is updated with this
        score (``adjusted_manually`` says whether the transform was moved by hand since the registration).
        """
        from AIRRegistrationLib import mrml_bridge

        p = parameterNode
        mr, trus = p.mrVolume, p.trusVolume
        quality = self.scoreAlignment(mr, trus, p.modelPath.strip(), p.device.value, p.toleranceMm)
        warning = mrml_bridge.warning_without_patient_ids(quality.warning, mr, trus, dicomPatientLookup())
        self.clearStaleResults(p)
        report = None
        out = p.resultTransform
        if p.reportJson and out is not None and trus.GetTransformNodeID() == out.GetID():
            report = mrml_bridge.record_manual_adjustment(json.loads(p.reportJson), quality, out, mr, warning)
        device = str(self._registrar.device) if self._registrar is not None else ""
        with slicer.util.NodeModify(p.parameterNode):  # one GUI update
            p.resultMrVolume, p.resultTrusVolume = mr, trus
            p.dScoreCurrent = f"{quality.d_score:.3f}"
            p.estimatedErrorMm = f"{quality.estimated_tre_mm:.1f} mm"
            p.samePatient = self.samePatientText(quality)
            p.inputCheck = self.inputCheckText(quality)
            p.quality = quality.quality
            adjusted = report is not None and report["adjusted_manually"]
            prefix = _("Adjusted alignment: ") if adjusted else _("Current alignment: ")
            p.statusText = (
                prefix + self.statusText(quality.quality, warning) + self.deviceNote(p.device, device)
            )
            if report is not None:
                p.reportJson = json.dumps(report, default=str)
        return quality

    @staticmethod
    def defaultVolumes(scene):
        """``(mr, trus)`` to pre-select: the first volume whose name says ultrasound (TRUS, US) as TRUS, the
        first other one as MR (without such a name: the first two volumes); label maps are skipped."""
        volumes = [
            scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))
        ]
        volumes = [v for v in volumes if not v.IsA("vtkMRMLLabelMapVolumeNode")]
        ultrasound = [v for v in volumes if ULTRASOUND_NAME.search(v.GetName() or "")]
        trus = ultrasound[0] if ultrasound else None
        mr = next((v for v in volumes if v not in ultrasound), None)
        if trus is None:
            trus = next((v for v in volumes if v is not mr), None)
        return mr, trus

    @staticmethod
    def resultIsCurrent(parameterNode) -> bool:
        """Whether the result fields describe the selected MR and TRUS (and, after a registration, the
        selected output transform)."""
        p = parameterNode
        return (
            sameNode(p.resultMrVolume, p.mrVolume)
            and sameNode(p.resultTrusVolume, p.trusVolume)
            and (not p.reportJson or sameNode(p.resultTransform, p.outputTransform))
        )

    def clearStaleResults(self, parameterNode) -> bool:
        """Clear the result fields when they describe other nodes than those selected; True if cleared.

        Keeps old D-scores and reports from being shown, saved or toggled for a newly selected volume.
        """
        p = parameterNode
        if self.resultIsCurrent(p) or not any(getattr(p, name) for name in RESULT_TEXT_FIELDS):
            return False
        with slicer.util.NodeModify(p.parameterNode):
            p.resultMrVolume = p.resultTrusVolume = p.resultTransform = None
            for name in RESULT_TEXT_FIELDS:
                setattr(p, name, "")
        return True

    @staticmethod
    def deviceNote(requested, actual: str) -> str:
        """A sentence for the status when a GPU was asked for but the networks ran elsewhere (else empty)."""
        requested = getattr(requested, "value", requested)
        if requested == Device.CUDA.value and not str(actual).startswith("cuda"):
            return " " + _("The GPU (CUDA) is not available here: the networks ran on the CPU.")
        return ""

    @staticmethod
    def samePatientText(verdict) -> str:
        """The patient check's score for the result fields, or why there is none."""
        if verdict.same_patient_score is None:
            return _("not checked (the model has no patient check)")
        flag = _(" (another patient?)") if verdict.patient_flagged else ""
        return f"{verdict.same_patient_score:.2f}{flag}"

    @staticmethod
    def inputCheckText(verdict) -> str:
        """The input check's statistic against its threshold for the result fields, or why there is none."""
        check = verdict.input_check
        if check is None:
            return _("not checked (the model has no input check)")
        if check.out_of_distribution:
            return f"{check.statistic:.2f} > {check.threshold:.2f}" + _(": unlike the training data")
        return f"{check.statistic:.2f} ≤ {check.threshold:.2f}" + _(": like the training data")

    @staticmethod
    def statusText(quality: str, warning, flagNote=None) -> str:
        """The verdict for the status line; ``flagNote`` says when the model's flag is not calibrated."""
        if quality == "ok":
            text = _("Alignment looks good.")
        else:
            text = _("Warning: ") + (warning or _("alignment looks poor; check it visually before use"))
        return f"{text} {_('Warning: ')}{flagNote}." if flagNote else text

    # --- display and export ---------------------------------------------------------------------------

    def showFusion(self, mrVolumeNode, trusVolumeNode) -> None:
        """MR as background, TRUS as a colour-mapped foreground at half opacity in all slice views."""
        from AIRRegistrationLib import mrml_bridge

        mrml_bridge.setup_fusion_display(slicer.mrmlScene, mrVolumeNode, trusVolumeNode, opacity=0.5)
        slicer.util.resetSliceViews()

    def showLabelmap(self, labelmapNode) -> None:
        """A (mapped) label map as the label layer of all slice views, over the fusion."""
        from AIRRegistrationLib import mrml_bridge

        mrml_bridge.show_label_layer(slicer.mrmlScene, labelmapNode)

    def showAlignment(self, trusVolumeNode, outputTransformNode, after: bool) -> None:
        from AIRRegistrationLib import mrml_bridge

        mrml_bridge.show_alignment(trusVolumeNode, outputTransformNode, after)

    @staticmethod
    def showTransformHandles(transformNode, visible: bool) -> None:
        """Interaction handles on a transform in the views, to adjust an alignment by hand (Slicer's
        Transforms module's "Interaction" checkbox: vtkMRMLTransformDisplayNode.SetEditorVisibility)."""
        if transformNode.GetDisplayNode() is None:
            transformNode.CreateDefaultDisplayNodes()
        display = transformNode.GetDisplayNode()
        display.SetEditorVisibility(bool(visible))
        display.SetEditorSliceIntersectionVisibility(bool(visible))

    @staticmethod
    def transformHandlesShown(transformNode) -> bool:
        display = transformNode.GetDisplayNode() if transformNode is not None else None
        return bool(display is not None and display.GetEditorVisibility())

    @staticmethod
    def _exportMatrix(outputTransformNode, mrVolumeNode):
        """MR file -> TRUS file LPS matrix (mrml_bridge.EXPORT_FRAME); the MR is the transform's fixed volume
        unless given."""
        from AIRRegistrationLib import mrml_bridge

        if outputTransformNode is None:
            raise ValueError(_("No output transform to export."))
        mr = mrVolumeNode if mrVolumeNode is not None else mrml_bridge.fixed_volume_of(outputTransformNode)
        return mrml_bridge.mr_to_trus_from_transform_node(outputTransformNode, mr)

    def exportTransform(self, outputTransformNode, path: str, mrVolumeNode=None) -> None:
        """ITK transform file (LPS, resampling: a point of the MR file -> the point of the TRUS file, see
        ``mrml_bridge.EXPORT_FRAME``). ``path`` was chosen by the user."""
        from AIRRegistrationLib import mrml_bridge

        mrml_bridge.export_transform(
            path, self._exportMatrix(outputTransformNode, mrVolumeNode), overwrite=True
        )
        self.addLog(_("Saved {path}").format(path=path))

    def exportMatrix(self, outputTransformNode, path: str, mrVolumeNode=None) -> None:
        """4x4 RAS modeling matrix (TRUS -> MR, "to parent", in the volumes' file coordinates) as text."""
        from AIRRegistrationLib import mrml_bridge

        matrix = self._exportMatrix(outputTransformNode, mrVolumeNode)
        mrml_bridge.export_matrix_text(path, matrix, overwrite=True)
        self.addLog(_("Saved {path}").format(path=path))

    def exportReport(self, reportJson: str, path: str, outputTransformNode=None) -> None:
        """JSON report of the last registration. ``path`` was chosen by the user.

        With ``outputTransformNode``, refuses a report whose scores are not those of the transform as it is now
        (moved by hand since it was scored).
        """
        from AIRRegistrationLib import mrml_bridge

        if not reportJson:
            raise ValueError(_("No registration result to report yet."))
        report = json.loads(reportJson)
        if outputTransformNode is not None and not mrml_bridge.report_matches_transform(
            report, outputTransformNode
        ):
            raise ValueError(
                _("The output transform was moved after it was scored: click Check current alignment first.")
            )
        mrml_bridge.write_report(path, report, overwrite=True)
        self.addLog(_("Saved {path}").format(path=path))

    # --- biopsy targets -------------------------------------------------------------------------------

    def mapTargets(
        self,
        pointsNode,
        segmentationNode,
        transformNode,
        trusVolumeNode,
        previousPoints=None,
        previousSegmentation=None,
    ):
        """Map MR targets into TRUS coordinates with a registration transform as it is now; return the mapped
        ``(points, labelmap)`` nodes (None for an input not given).

        A previous mapped node of the same source is updated, else a new one is made; both are put under the
        transform. Every input is checked before any node is made or changed: on a ValueError nothing changed.
        """
        from AIRRegistrationLib import mrml_bridge

        if transformNode is None or trusVolumeNode is None:
            raise ValueError(_("Register first: the targets are mapped with the registration result."))
        if pointsNode is None and segmentationNode is None:
            raise ValueError(_("Select MR targets: a point list, a segmentation or a label map."))
        for source in (pointsNode, segmentationNode):
            if source is not None and source.GetAttribute(mrml_bridge.SPACE_ATTRIBUTE) == "TRUS":
                raise ValueError(
                    _(
                        "'{name}' is already in TRUS coordinates (made by Map to TRUS): select the MR's."
                    ).format(name=source.GetName())
                )
        mrToTrus = mrml_bridge.mr_to_trus_from_transform_node(transformNode)  # MR world -> TRUS file
        if pointsNode is not None:  # a bad point list is refused before the segmentation is mapped
            mrml_bridge.targets_from_markups_node(pointsNode).mapped(mrToTrus)
        labelmap = points = None
        if segmentationNode is not None:
            labelmap = mrml_bridge.map_segmentation_to_trus(
                segmentationNode,
                mrToTrus,
                trusVolumeNode,
                node=mrml_bridge.reusable_mapped_node(previousSegmentation, segmentationNode),
            )
            mrml_bridge.mark_mapped(labelmap, segmentationNode, transformNode)
        if pointsNode is not None:
            points = mrml_bridge.map_markups_to_trus(
                pointsNode,
                mrToTrus,
                trusVolumeNode,
                node=mrml_bridge.reusable_mapped_node(previousPoints, pointsNode),
            )
            mrml_bridge.mark_mapped(points, pointsNode, transformNode)
        return points, labelmap

    def mapTargetsUsingParameterNode(self, parameterNode):
        """Map the selected MR targets with the current result; the mapped nodes are stored on ``p``."""
        p = parameterNode
        if not (p.reportJson and p.resultTransform is not None and self.resultIsCurrent(p)):
            raise ValueError(_("Register first: the targets are mapped with the registration result."))
        points, labelmap = self.mapTargets(
            p.targetPoints,
            p.targetSegmentation,
            p.resultTransform,
            p.resultTrusVolume,
            p.mappedTargets,
            p.mappedSegmentation,
        )
        with slicer.util.NodeModify(p.parameterNode):
            if points is not None:
                p.mappedTargets = points
            if labelmap is not None:
                p.mappedSegmentation = labelmap
        self.addLog(_("Targets mapped to TRUS"))
        return points, labelmap

    def targetsStatus(self, parameterNode, hasResult: bool) -> str:
        """One line for the panel: which selected targets are mapped with the current result."""
        from AIRRegistrationLib import mrml_bridge

        p = parameterNode
        if p.targetPoints is None and p.targetSegmentation is None:
            return _("Select a point list or a segmentation on the MR.")
        if not hasResult:
            return _("Register first: the targets are mapped with the registration result.")
        mapped = [
            mapped.GetName()
            for source, mapped in (
                (p.targetPoints, p.mappedTargets),
                (p.targetSegmentation, p.mappedSegmentation),
            )
            if source is not None and mrml_bridge.is_mapped_with(mapped, source, p.resultTransform)
        ]
        if not mapped:
            return _("Not mapped with the current result: click Map to TRUS.")
        return _("In TRUS coordinates: {names}").format(names=", ".join(mapped))

    def _mappedForExport(self, source, mapped, transformNode):
        """The mapped node of a selected source, refused when it was not mapped with the transform as it is."""
        from AIRRegistrationLib import mrml_bridge

        if source is None:
            return None
        if not mrml_bridge.is_mapped_with(mapped, source, transformNode):
            raise ValueError(
                _("'{name}' is not mapped with the current result: click Map to TRUS first.").format(
                    name=source.GetName()
                )
            )
        return mapped

    @staticmethod
    def targetFilePaths(reportPath: str, targetsFormat, labelmapFormat):
        """``(targets, labelmap)`` paths next to the report: ``<report name>_targets<ending>`` and
        ``<report name>_labels<ending>``."""
        report = Path(reportPath)
        stem = report.name[: -len(report.suffix)] if report.suffix else report.name
        return (
            report.with_name(stem + "_targets" + targetsFormat.value),
            report.with_name(stem + "_labels" + labelmapFormat.value),
        )

    @staticmethod
    def _checkTargetFiles(reportPath: str, paths) -> None:
        """Refuse to replace an existing file, unless the report being replaced names it (the same export):
        the save dialog only asked about the report."""
        previous = Path(reportPath)
        named = set()
        if previous.is_file():
            try:
                old = json.loads(previous.read_text())
            except (OSError, ValueError):
                old = {}
            for key in ("targets", "segmentation"):
                entry = old.get(key) if isinstance(old, dict) else None
                if isinstance(entry, dict) and entry.get("output_file"):
                    named.add(os.path.abspath(entry["output_file"]))
        for path in paths:
            if path.exists() and os.path.abspath(path) not in named:
                raise ValueError(
                    _(
                        "{path} exists; choose another report name (the target files are saved next to it)."
                    ).format(path=path)
                )

    def exportTargetsUsingParameterNode(self, parameterNode, reportPath: str):
        """Write the mapped targets, the mapped label map and the JSON report that records their file names
        (with the model's SHA-256 and the adjusted flag); return the paths written, the report last.

        Refused (ValueError, nothing written) without a current result, when the output transform moved since it
        was scored, when a selected target is not mapped with the transform as it is, or when a target file
        would replace an existing file.
        """
        from AIRRegistrationLib import mrml_bridge

        p = parameterNode
        if not (p.reportJson and p.resultTransform is not None and self.resultIsCurrent(p)):
            raise ValueError(_("No registration result to report yet."))
        report = json.loads(p.reportJson)
        if not mrml_bridge.report_matches_transform(report, p.resultTransform):
            raise ValueError(
                _("The output transform was moved after it was scored: click Check current alignment first.")
            )
        points = self._mappedForExport(p.targetPoints, p.mappedTargets, p.resultTransform)
        labelmap = self._mappedForExport(p.targetSegmentation, p.mappedSegmentation, p.resultTransform)
        if points is None and labelmap is None:
            raise ValueError(_("Select MR targets: a point list, a segmentation or a label map."))
        targetsPath, labelmapPath = self.targetFilePaths(reportPath, p.targetsFormat, p.labelmapFormat)
        targetsPath = targetsPath if points is not None else None
        labelmapPath = labelmapPath if labelmap is not None else None
        self._checkTargetFiles(reportPath, [path for path in (targetsPath, labelmapPath) if path is not None])
        written = []
        if points is not None:
            written.append(mrml_bridge.export_targets(targetsPath, points, overwrite=True))
        if labelmap is not None:
            written.append(mrml_bridge.export_labelmap(labelmapPath, labelmap, overwrite=True))
        report = mrml_bridge.add_targets_to_report(
            report, p.targetPoints, targetsPath, p.targetSegmentation, labelmapPath
        )
        written.append(mrml_bridge.write_report(reportPath, report, overwrite=True))
        self.addLog(_("Saved {paths}").format(paths=", ".join(str(path) for path in written)))
        return written


#
# AIRRegistrationTest
#


class AIRRegistrationTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer on generated phantom volumes (no network)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_InputValidation()
        if not self.dependenciesReady():
            return
        self.setUp()
        self.test_RegisterPhantom()
        self.setUp()
        self.test_PoorAlignmentWarning()

    def dependenciesReady(self) -> bool:
        """Install the core's Python packages (asking first, as the panel does), or say clearly that the tests
        needing them are skipped: declined, or Slicer in testing mode, where ``pip_ensure`` installs nothing."""
        self.delayDisplay("Python dependencies")
        try:
            AIRRegistrationLogic().ensureCore()
        except MissingDependencyError as exc:
            logging.warning(f"AIR Registration self-test: registration tests skipped: {exc}")
            self.delayDisplay(f"Registration tests skipped: {exc}")
            return False
        return True

    def _loadPhantom(self, seed: int):
        from airreg import phantom
        from AIRRegistrationLib import mrml_bridge

        case = phantom.generate_case(seed)
        mr = mrml_bridge.add_volume_node_from_image(slicer.mrmlScene, case.mr, "Phantom MR")
        trus = mrml_bridge.add_volume_node_from_image(slicer.mrmlScene, case.trus, "Phantom TRUS")
        return case, mr, trus

    @staticmethod
    def _tre(case, mrToTrus) -> float:
        import numpy as np

        from airreg import geometry

        errors = [
            np.linalg.norm(geometry.apply(mrToTrus, np.asarray(mrXyz)) - np.asarray(trusXyz))
            for _name, mrXyz, trusXyz in case.landmarks
        ]
        return float(np.sqrt(np.mean(np.square(errors))))

    def test_InputValidation(self):
        self.delayDisplay("Input validation")
        logic = AIRRegistrationLogic()
        case, mr, trus = self._loadPhantom(1)
        with self.assertRaises(ValueError):
            logic.registerVolumes(mr, mr)
        with self.assertRaises(ValueError):
            logic.registerVolumes(mr, None)
        # an output transform the MR is under would move the MR: refused, nothing changed
        mrPlacement = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "MR placement")
        mr.SetAndObserveTransformNodeID(mrPlacement.GetID())
        with self.assertRaises(ValueError):
            logic.registerVolumes(mr, trus, outputTransformNode=mrPlacement)
        self.assertIsNone(trus.GetTransformNodeID())
        self.assertIsNone(mrPlacement.GetNodeReferenceID(mrPlacement.GetMovingNodeReferenceRole()))
        self.delayDisplay("Input validation passed")

    def test_RegisterPhantom(self):
        import numpy as np

        from airreg import geometry
        from AIRRegistrationLib import mrml_bridge

        self.delayDisplay("Register a phantom pair")
        logic = AIRRegistrationLogic()
        from airreg.evaluation import random_start

        case, mr, trus = self._loadPhantom(0)
        mrVoxels = slicer.util.arrayFromVolume(mr).copy()
        trusVoxels = slicer.util.arrayFromVolume(trus).copy()
        # start like the paper's evaluation: the ground truth perturbed by up to 25 degrees and 5 mm in-plane
        start = random_start(case, 3, np.random.default_rng(7))
        startNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "start")
        startNode.SetMatrixTransformToParent(
            mrml_bridge.vtk_matrix_from_array(geometry.lps_resampling_to_ras_modeling(start))
        )
        trus.SetAndObserveTransformNodeID(startNode.GetID())

        result, outputTransform = logic.registerVolumes(mr, trus, iterations=3, toleranceMm=5.0)
        np.testing.assert_allclose(
            slicer.util.arrayFromTransformMatrix(outputTransform),
            geometry.lps_resampling_to_ras_modeling(result.mr_to_trus),
            atol=1e-6,
        )
        np.testing.assert_allclose(mrml_bridge.initial_transform_lps(trus), result.mr_to_trus, atol=1e-6)
        self.assertEqual(trus.GetTransformNodeID(), outputTransform.GetID())
        self.assertEqual(
            outputTransform.GetNodeReferenceID(outputTransform.GetFixedNodeReferenceRole()), mr.GetID()
        )
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(mr), mrVoxels)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(trus), trusVoxels)
        self.assertIsNone(mr.GetTransformNodeID())

        self.assertLess(self._tre(case, result.mr_to_trus), self._tre(case, start))
        self.assertLess(self._tre(case, result.mr_to_trus), 5.0)
        self.assertTrue(0.0 <= result.d_score <= 1.0)
        self.assertIn(result.quality, ("ok", "warning"))
        self.delayDisplay(f"D-score {result.d_score:.3f}, TRE {self._tre(case, result.mr_to_trus):.2f} mm")

        # the parameter-node path and the fusion display
        p = logic.getParameterNode()
        p.mrVolume, p.trusVolume = mr, trus
        logic.registerVolumesUsingParameterNode(p)
        self.assertTrue(p.dScoreAfter and p.reportJson)
        logic.showFusion(mr, trus)

        # biopsy targets: the MR landmarks mapped with the result land on the TRUS landmarks within its error
        from airreg import targets

        mrPoints = np.array([mrXyz for _name, mrXyz, _trusXyz in case.landmarks])
        trusPoints = np.array([trusXyz for _name, _mrXyz, trusXyz in case.landmarks])
        p.targetPoints = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "MR landmarks")
        for (name, _mrXyz, _trusXyz), ras in zip(case.landmarks, targets.lps_to_ras(mrPoints), strict=True):
            p.targetPoints.AddControlPoint([float(v) for v in ras], name)
        mapped, _labelmap = logic.mapTargetsUsingParameterNode(p)
        mapped = mrml_bridge.targets_from_markups_node(mapped, world=False).points_lps
        mrToTrus = mrml_bridge.mr_to_trus_from_transform_node(p.outputTransform)
        tre = np.linalg.norm(geometry.apply(mrToTrus, mrPoints) - trusPoints, axis=1)
        np.testing.assert_allclose(np.linalg.norm(mapped - trusPoints, axis=1), tre, atol=1e-4)
        self.delayDisplay("Registration passed")

    def test_PoorAlignmentWarning(self):
        import numpy as np

        from airreg import geometry
        from AIRRegistrationLib import mrml_bridge

        self.delayDisplay("A deliberately bad alignment is flagged")
        logic = AIRRegistrationLogic()
        case, mr, trus = self._loadPhantom(2)
        bad = geometry.RigidTransform((0.0, 0.0, 25.0), (15.0, -12.0, 8.0)).matrix @ np.asarray(case.gt)
        manual = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "bad alignment")
        manual.SetMatrixTransformToParent(
            mrml_bridge.vtk_matrix_from_array(geometry.lps_resampling_to_ras_modeling(bad))
        )
        trus.SetAndObserveTransformNodeID(manual.GetID())
        toParentBefore = slicer.util.arrayFromTransformMatrix(manual).copy()

        quality = logic.scoreAlignment(mr, trus, toleranceMm=5.0)
        self.assertEqual(quality.quality, "warning")
        self.assertTrue(quality.warning)
        np.testing.assert_array_equal(slicer.util.arrayFromTransformMatrix(manual), toParentBefore)
        self.assertEqual(trus.GetTransformNodeID(), manual.GetID())

        # the true alignment scores better than the bad one
        manual.SetMatrixTransformToParent(
            mrml_bridge.vtk_matrix_from_array(geometry.lps_resampling_to_ras_modeling(case.gt))
        )
        self.assertGreater(logic.scoreAlignment(mr, trus).d_score, quality.d_score)
        self.delayDisplay("Poor-alignment warning passed")
