"""AIR Registration: adversarial MR-TRUS rigid registration with a discriminator quality flag (3D Slicer module).

Four parts as in Slicer's scripted-module template: module metadata, a parameter node, a thin widget and a
logic usable without the widget. MRML <-> image conversions live in ``AIRRegistrationLib.mrml_bridge`` (Qt-free,
tested with pytest); registration and scoring live in the ``airreg`` core, imported lazily together with torch.
"""

import enum
import json
import logging
import os
import traceback
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLLinearTransformNode, vtkMRMLScalarVolumeNode, vtkMRMLTransformNode
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

DISCLAIMER = _(
    "Research software. The bundled model was trained on synthetic phantoms only: it is not for clinical use "
    "until it has been trained and validated on your own data."
)

#: Packages Slicer already ships; the module never asks pip to install or upgrade them.
SLICER_OWNED_PACKAGES = ("SimpleITK", "numpy", "vtk")


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
            "It also warns when the two volumes belong to different patients (their DICOM PatientIDs, or the "
            "patients they are filed under in the Data module)."
            "<br><br><b>" + DISCLAIMER + "</b>"
        )
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


@parameterNodeWrapper
class AIRRegistrationParameterNode:
    """Inputs, options and the last result (read-only strings shown in the Results section).

    mrVolume - fixed volume. trusVolume - moving volume, put under outputTransform after registration.
    initialTransform - starting alignment; None: the transform the TRUS volume is already under.
    outputTransform - receives the result; None: a new node is created.
    modelPath - AIR-net checkpoint; empty: the bundled model (trained on synthetic phantoms).
    """

    mrVolume: vtkMRMLScalarVolumeNode
    trusVolume: vtkMRMLScalarVolumeNode
    initialTransform: vtkMRMLTransformNode
    outputTransform: vtkMRMLLinearTransformNode
    modelPath: str = ""
    device: Device = Device.AUTO
    iterations: Annotated[int, WithinRange(1, 10)] = 3
    toleranceMm: Annotated[float, WithinRange(0.5, 20)] = 5.0
    # results (written by the logic, shown read-only)
    dScoreBefore: str = ""
    dScoreAfter: str = ""
    estimatedErrorMm: str = ""
    samePatient: str = ""
    inputCheck: str = ""
    elapsed: str = ""
    quality: str = ""
    statusText: str = ""
    reportJson: str = ""


class MissingDependencyError(ValueError):
    """A required Python package is missing and was not installed."""


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


class AIRRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: binds the .ui to the parameter node and forwards actions to the logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._busy = False

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
        self.ui.exportTransformButton.connect("clicked(bool)", self.onExportTransform)
        self.ui.exportMatrixButton.connect("clicked(bool)", self.onExportMatrix)
        self.ui.exportReportButton.connect("clicked(bool)", self.onExportReport)

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
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

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

        reason = mrml_bridge.validate_inputs(p.mrVolume, p.trusVolume)
        self.ui.applyButton.enabled = reason is None and not self._busy
        self.ui.applyButton.text = _("Register") if reason is None else reason
        self.ui.applyButton.toolTip = _("Run AIR-net rigid registration.") if reason is None else reason
        self.ui.checkAlignmentButton.enabled = reason is None and not self._busy

        self.ui.dScoreBeforeValueLabel.text = p.dScoreBefore or "-"
        self.ui.dScoreAfterValueLabel.text = p.dScoreAfter or "-"
        self.ui.estimatedErrorValueLabel.text = p.estimatedErrorMm or "-"
        self.ui.samePatientValueLabel.text = p.samePatient or "-"
        self.ui.inputCheckValueLabel.text = p.inputCheck or "-"
        self.ui.timeValueLabel.text = p.elapsed or "-"
        self._showStatus(p.statusText or _("No result yet."), p.quality)

        hasResult = p.outputTransform is not None and p.trusVolume is not None and bool(p.reportJson)
        self.ui.showRegisteredCheckBox.enabled = hasResult
        self.ui.exportTransformButton.enabled = p.outputTransform is not None
        self.ui.exportMatrixButton.enabled = p.outputTransform is not None
        self.ui.exportReportButton.enabled = bool(p.reportJson)

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

    def _onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * max(0.0, min(1.0, fraction))))
        self.ui.progressBar.format = f"{message} %p%"
        slicer.app.processEvents()

    def _run(self, what: str, action):
        """Run an action; bad input or a refused install shows a message in the panel, no traceback dialog."""
        self._busy = True
        self.updateGUIFromParameterNode()
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        try:
            with slicer.util.WaitCursor():
                return action()
        except ValueError as exc:  # InputError, ModelError, MissingDependencyError ...
            logging.warning(f"{what} failed: {exc}")
            self._parameterNode.quality = "warning"
            self._parameterNode.statusText = _("{what} failed: {error}").format(what=what, error=exc)
        except Exception as exc:
            logging.error(traceback.format_exc())
            self._parameterNode.quality = "warning"
            self._parameterNode.statusText = _("{what} failed: {error}").format(what=what, error=exc)
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
            self.logic.registerVolumesUsingParameterNode(
                self._parameterNode, progressCallback=self._onProgress
            )
            self.ui.showRegisteredCheckBox.checked = True  # the TRUS volume is now under the result
            self.logic.showFusion(self._parameterNode.mrVolume, self._parameterNode.trusVolume)

        self._run(_("Registration"), register)

    def onCheckAlignmentButton(self) -> None:
        self._run(_("Alignment check"), lambda: self.logic.scoreUsingParameterNode(self._parameterNode))

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
        if p is None or p.outputTransform is None or p.trusVolume is None:
            return
        self.logic.showAlignment(p.trusVolume, p.outputTransform, after)

    def _saveFileName(self, caption: str, defaultName: str, fileFilter: str) -> str:
        # QFileDialog asks before replacing an existing file, so a chosen name may be overwritten.
        return qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), caption, os.path.join(qt.QDir.homePath(), defaultName), fileFilter
        )

    def onExportTransform(self) -> None:
        path = self._saveFileName(
            _("Save transform"), "mr_to_trus.h5", _("ITK transform (*.h5 *.tfm *.txt);;All files (*)")
        )
        if path:
            self._run(
                _("Export"), lambda: self.logic.exportTransform(self._parameterNode.outputTransform, path)
            )

    def onExportMatrix(self) -> None:
        path = self._saveFileName(_("Save 4x4 RAS matrix"), "trus_to_mr_ras.txt", _("Text (*.txt)"))
        if path:
            self._run(_("Export"), lambda: self.logic.exportMatrix(self._parameterNode.outputTransform, path))

    def onExportReport(self) -> None:
        path = self._saveFileName(_("Save report"), "air_registration_report.json", _("JSON (*.json)"))
        if path:
            self._run(_("Export"), lambda: self.logic.exportReport(self._parameterNode.reportJson, path))


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
        try:
            import torch

            return torch
        except ImportError:
            pass
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
        import torch

        return torch

    def ensureCore(self, askConfirmation: bool = True):
        """The ``airreg.registration`` module with its pip dependencies (never SimpleITK or numpy)."""
        import importlib.util

        self.ensureTorch(askConfirmation)
        missing = [name for name in ("scipy", "tqdm") if importlib.util.find_spec(name) is None]
        if missing:
            self._pipEnsure(missing, askConfirmation)
        from airreg import registration

        return registration

    def _pipEnsure(self, requirements, askConfirmation: bool) -> None:
        requirements = [r for r in requirements if r.split("[")[0] not in SLICER_OWNED_PACKAGES]
        if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):  # Slicer 5.12+
            slicer.packaging.pip_ensure(
                requirements, requester="AIR Registration", prompt_install=askConfirmation
            )
        else:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("AIR Registration needs these Python packages: {names}. Install them now?").format(
                    names=", ".join(requirements)
                )
            ):
                raise MissingDependencyError(
                    _("Required Python packages are missing: {names}; the install was declined.").format(
                        names=", ".join(requirements)
                    )
                )
            slicer.util.pip_install(requirements)
        import importlib
        import importlib.util

        importlib.invalidate_caches()
        still = [r for r in requirements if importlib.util.find_spec(r) is None]
        if still:
            raise MissingDependencyError(
                _("Required Python packages are missing: {names}.").format(names=", ".join(still))
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

        Raises ValueError with a user-readable message on bad input; no node is changed before the
        registration has succeeded. The output transform (created if None) gets the RAS modeling matrix and
        fixed/moving references, and the TRUS volume is put under it.
        """
        from AIRRegistrationLib import mrml_bridge

        reason = mrml_bridge.validate_inputs(mrVolumeNode, trusVolumeNode)
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
        """Unpack the parameter node into :meth:`registerVolumes` and store the results on it."""
        p = parameterNode
        result, outputTransformNode = self.registerVolumes(
            p.mrVolume,
            p.trusVolume,
            outputTransformNode=p.outputTransform,
            initialTransformNode=p.initialTransform,
            modelPath=p.modelPath.strip(),
            device=p.device.value,
            iterations=p.iterations,
            toleranceMm=p.toleranceMm,
            progressCallback=progressCallback,
        )
        from AIRRegistrationLib import mrml_bridge

        report = mrml_bridge.build_report(result.report(), p.mrVolume, p.trusVolume, outputTransformNode)
        with slicer.util.NodeModify(p.parameterNode):  # one GUI update
            p.outputTransform = outputTransformNode
            p.dScoreBefore = f"{result.d_score_before:.3f}"
            p.dScoreAfter = f"{result.d_score:.3f}"
            p.estimatedErrorMm = f"{result.estimated_tre_mm:.1f} mm"
            p.samePatient = self.samePatientText(result.after)
            p.inputCheck = self.inputCheckText(result.after)
            p.elapsed = f"{result.seconds:.1f} s"
            p.quality = result.quality
            p.statusText = self.statusText(result.quality, result.warning)
            p.reportJson = json.dumps(report, default=str)
        return result

    def scoreUsingParameterNode(self, parameterNode):
        """Score the current alignment and show it in the result fields (no node is changed)."""
        p = parameterNode
        quality = self.scoreAlignment(
            p.mrVolume, p.trusVolume, p.modelPath.strip(), p.device.value, p.toleranceMm
        )
        with slicer.util.NodeModify(p.parameterNode):  # one GUI update
            p.dScoreBefore = f"{quality.d_score:.3f}"
            p.dScoreAfter = ""
            p.estimatedErrorMm = f"{quality.estimated_tre_mm:.1f} mm"
            p.samePatient = self.samePatientText(quality)
            p.inputCheck = self.inputCheckText(quality)
            p.elapsed = ""
            p.quality = quality.quality
            p.statusText = _("Current alignment: ") + self.statusText(quality.quality, quality.warning)
        return quality

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
    def statusText(quality: str, warning) -> str:
        if quality == "ok":
            return _("Alignment looks good.")
        return _("Warning: ") + (warning or _("alignment looks poor; check it visually before use"))

    # --- display and export ---------------------------------------------------------------------------

    def showFusion(self, mrVolumeNode, trusVolumeNode) -> None:
        """MR as background, TRUS as a colour-mapped foreground at half opacity in all slice views."""
        from AIRRegistrationLib import mrml_bridge

        mrml_bridge.setup_fusion_display(slicer.mrmlScene, mrVolumeNode, trusVolumeNode, opacity=0.5)
        slicer.util.resetSliceViews()

    def showAlignment(self, trusVolumeNode, outputTransformNode, after: bool) -> None:
        from AIRRegistrationLib import mrml_bridge

        mrml_bridge.show_alignment(trusVolumeNode, outputTransformNode, after)

    def exportTransform(self, outputTransformNode, path: str) -> None:
        """ITK transform file (LPS, resampling: MR point -> TRUS point). ``path`` was chosen by the user."""
        from AIRRegistrationLib import mrml_bridge

        matrix = mrml_bridge.mr_to_trus_from_transform_node(outputTransformNode)
        mrml_bridge.export_transform(path, matrix, overwrite=True)
        self.addLog(_("Saved {path}").format(path=path))

    def exportMatrix(self, outputTransformNode, path: str) -> None:
        """4x4 RAS modeling matrix (TRUS -> MR, "to parent") as text. ``path`` was chosen by the user."""
        from AIRRegistrationLib import mrml_bridge

        matrix = mrml_bridge.mr_to_trus_from_transform_node(outputTransformNode)
        mrml_bridge.export_matrix_text(path, matrix, overwrite=True)
        self.addLog(_("Saved {path}").format(path=path))

    def exportReport(self, reportJson: str, path: str) -> None:
        """JSON report of the last registration. ``path`` was chosen by the user."""
        from AIRRegistrationLib import mrml_bridge

        if not reportJson:
            raise ValueError(_("No registration result to report yet."))
        mrml_bridge.write_report(path, json.loads(reportJson), overwrite=True)
        self.addLog(_("Saved {path}").format(path=path))


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
        self.setUp()
        self.test_RegisterPhantom()
        self.setUp()
        self.test_PoorAlignmentWarning()

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
        self.assertIsNone(trus.GetTransformNodeID())
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
