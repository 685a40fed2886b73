"""The module in a Python like a stock 3D Slicer's: from "nothing installed" to "registered" (issue 12).

The tests run in file order and share one environment: those before the ``installs`` ones find no torch; the
``installs`` ones pip-install it through the stand-in ``slicer.packaging.pip_ensure`` (Python 3.11 pass only).
See conftest.py for the stand-ins and what they cannot show.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import slicer

from conftest import NOT_IN_SLICER, slicer_packages

#: The core's modules that need no torch (the rest of the inference core imports torch at the top).
TORCH_FREE_CORE = ("airreg.errors", "airreg.fileio", "airreg.geometry", "airreg.intensity", "airreg.quality")


def packaging_calls() -> list:
    """The calls the stand-in ``slicer.packaging.pip_ensure`` received (importing it if needed)."""
    return importlib.import_module("slicer.packaging").calls


def node_state(w: SimpleNamespace) -> tuple:
    """What a failed or refused registration must leave as it was."""
    scene = slicer.mrmlScene
    return (
        scene.GetNumberOfNodesByClass("vtkMRMLTransformNode"),
        w.trus.GetTransformNodeID(),
        w.mr.GetTransformNodeID(),
        slicer.util.arrayFromVolume(w.trus).tobytes(),
        slicer.util.arrayFromVolume(w.mr).tobytes(),
    )


# --- nothing installed ------------------------------------------------------------------------------------


def test_environment_is_a_stock_slicers() -> None:
    """Slicer 5.12's numpy, scipy and SimpleITK, and none of what Slicer lacks (else these tests prove little)."""
    assert set(slicer_packages()) == {"numpy", "scipy", "SimpleITK"}
    for name, expected in slicer_packages().items():
        assert importlib.metadata.version(name) == expected, name
    assert [name for name in NOT_IN_SLICER if importlib.util.find_spec(name) is not None] == []
    assert not hasattr(slicer, "packaging")  # Slicer 5.12's ``import slicer`` does not import it


def test_core_parts_without_torch_import(slicer_app: SimpleNamespace) -> None:
    """The torch-free part of the core and the module's MRML bridge import in Slicer's Python as shipped."""
    for name in (*TORCH_FREE_CORE, "airreg.data", "AIRRegistrationLib.mrml_bridge"):
        importlib.import_module(name)
    assert "torch" not in sys.modules


def test_panel_enables_register_with_nothing_installed(widget: SimpleNamespace) -> None:
    """The GUI update with valid inputs enables Register and Check current alignment; it imports no torch."""
    panel = widget.panel
    p = panel._parameterNode
    p.mrVolume, p.trusVolume = widget.mr, widget.trus
    panel.updateGUIFromParameterNode()
    assert panel.ui.applyButton.enabled is True
    assert panel.ui.inputHintLabel.visible is False  # no reason shown for a disabled Register
    assert panel.ui.checkAlignmentButton.enabled is True
    assert "torch" not in sys.modules

    p.trusVolume = widget.mr  # an invalid choice still disables it
    panel.updateGUIFromParameterNode()
    assert panel.ui.applyButton.enabled is False
    assert panel.ui.inputHintLabel.visible is True and panel.ui.inputHintLabel.text


def test_declining_the_install_gives_a_panel_message(
    slicer_app: SimpleNamespace, widget: SimpleNamespace
) -> None:
    """Register reaches Slicer's ``pip_ensure``; declining shows a message in the panel (no traceback dialog),
    changes no node and leaves Register usable."""
    panel, dialogs = widget.panel, slicer_app.dialogs
    p = panel._parameterNode
    p.mrVolume, p.trusVolume = widget.mr, widget.trus
    before = node_state(widget)
    dialogs.answer = False
    panel.onApplyButton()

    assert packaging_calls()[-1][0] == ["torch"] and packaging_calls()[-1][2] == "declined"
    assert dialogs.errors == []
    assert "torch" in p.statusText and "declined" in p.statusText
    assert p.quality == "warning"
    assert node_state(widget) == before
    assert p.outputTransform is None and p.reportJson == ""
    assert panel.ui.applyButton.enabled is True and panel.ui.inputHintLabel.visible is False
    assert importlib.util.find_spec("torch") is None


def test_self_test_in_testing_mode_skips_the_registration_tests_clearly(
    slicer_app: SimpleNamespace, scene, log_messages: pytest.LogCaptureFixture
) -> None:
    """In testing mode Slicer's pip_ensure installs nothing: the self-test checks input validation, then says
    that the registration tests are skipped and why, instead of failing on the missing torch."""
    slicer_app.app.testing = True
    slicer_app.module.AIRRegistrationTest().runTest()
    assert packaging_calls()[-1][2] == "skipped in testing mode"
    skipped = [r.getMessage() for r in log_messages.records if "registration tests skipped" in r.getMessage()]
    assert len(skipped) == 1
    assert "torch" in skipped[0] and "testing mode" in skipped[0]
    assert importlib.util.find_spec("torch") is None


def test_slicer_without_packaging_asks_then_uses_pip_install(
    slicer_app: SimpleNamespace, scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slicer 5.10 has no ``slicer.packaging``: the module asks itself, then calls ``slicer.util.pip_install``;
    a refusal or a failed install is a MissingDependencyError naming the package."""
    module, dialogs = slicer_app.module, slicer_app.dialogs
    monkeypatch.setattr(slicer, "__path__", [p for p in slicer.__path__ if not p.endswith("slicer_addons")])
    monkeypatch.delitem(sys.modules, "slicer.packaging", raising=False)
    monkeypatch.delattr(slicer, "packaging", raising=False)
    installs: list = []
    monkeypatch.setattr(slicer.util, "pip_install", installs.append)
    assert module.slicerPackaging() is None
    logic = module.AIRRegistrationLogic()

    dialogs.answer = False
    with pytest.raises(module.MissingDependencyError, match="torch; the install was declined"):
        logic.ensureCore()
    assert installs == [] and "torch" in dialogs.confirmations[-1]

    dialogs.answer = True
    with pytest.raises(
        module.MissingDependencyError, match=r"missing: torch\.$"
    ):  # the recorder installs nothing
        logic.ensureCore()
    assert installs == [["torch"]]


# --- the dependency step installs, then the module works --------------------------------------------------


@pytest.mark.installs
def test_register_installs_the_dependencies_then_registers(
    slicer_app: SimpleNamespace, widget: SimpleNamespace, tmp_path
) -> None:
    """Accepting the install: pip installs torch into this environment, the model loads (with a status message
    first), the TRUS is registered and put under the new output transform, and the result is exported."""
    panel, dialogs = widget.panel, slicer_app.dialogs
    p = panel._parameterNode
    p.mrVolume, p.trusVolume = widget.mr, widget.trus
    status_before = len(dialogs.status)
    panel.onApplyButton()

    assert packaging_calls()[-1][0] == ["torch"] and packaging_calls()[-1][2] == "installed"
    assert dialogs.errors == [], dialogs.errors
    assert p.reportJson, p.statusText
    assert json.loads(p.reportJson)["d_score"] == pytest.approx(float(p.dScoreAfter), abs=1e-3)
    assert widget.trus.GetTransformNodeID() == p.outputTransform.GetID()
    assert widget.mr.GetTransformNodeID() is None
    status = dialogs.status[status_before:]
    loading = [i for i, m in enumerate(status) if m.startswith("Loading PyTorch")]
    model = [i for i, m in enumerate(status) if m.startswith("Loading model")]
    assert loading and model and loading[0] < model[0], status
    assert panel.ui.applyButton.enabled is True

    import SimpleITK as sitk

    panel.logic.exportTransform(p.outputTransform, str(tmp_path / "mr_to_trus.h5"), p.mrVolume)
    panel.logic.exportReport(p.reportJson, str(tmp_path / "report.json"), p.outputTransform)
    exported = sitk.ReadTransform(str(tmp_path / "mr_to_trus.h5"))
    assert exported.GetDimension() == 3
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["d_score"] == pytest.approx(float(p.dScoreAfter), abs=1e-3)


@pytest.mark.installs
def test_logic_and_self_test_after_the_install(
    slicer_app: SimpleNamespace, scene, log_messages: pytest.LogCaptureFixture
) -> None:
    """With the dependencies in place the self-test runs every step without asking anything (as Slicer runs it:
    testing mode), and the logic scores an alignment without changing it."""
    slicer_app.app.testing = True
    calls, confirmations = len(packaging_calls()), len(slicer_app.dialogs.confirmations)
    slicer_app.module.AIRRegistrationTest().runTest()
    assert [call[2] for call in packaging_calls()[calls:]] in ([], ["satisfied"])
    assert len(slicer_app.dialogs.confirmations) == confirmations
    assert "registration tests skipped" not in log_messages.text
    assert "Poor-alignment warning passed" in log_messages.text  # the self-test's last step
    mr, trus = slicer.util.getFirstNodeByName("Phantom MR"), slicer.util.getFirstNodeByName("Phantom TRUS")
    parent = trus.GetTransformNodeID()
    quality = slicer_app.module.AIRRegistrationLogic().scoreAlignment(mr, trus)
    assert 0.0 <= quality.d_score <= 1.0 and np.isfinite(quality.estimated_tre_mm)
    assert trus.GetTransformNodeID() == parent
