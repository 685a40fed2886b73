"""A 3D Slicer as installed, for the module's dependency path: stand-ins on top of a Slicer-like Python.

Run in an environment holding only what a stock Slicer 5.12 ships that the module may touch (numpy, scipy and
SimpleITK at Slicer's versions, ``slicer-core`` for MRML, ``vtk``) and **no** torch, tqdm or matplotlib; .ci/run
builds it (``.venv-slicer``). On top of ``Testing/mrml/slicer_app_standins.py`` (MRML scene, module base
classes, parameter node wrapper) this adds what the dependency path meets in the application:

* ``slicer.packaging``: ``slicer_addons/packaging.py``, importable as a submodule but not imported by
  ``import slicer`` (as in Slicer 5.12); its ``pip_ensure`` really pip-installs into this environment;
* ``slicer.app``: ``testingEnabled()`` (switchable) and ``processEvents()``;
* dialogs (``slicer.util.confirmOkCancelDisplay`` answers as told and records; ``errorDisplay`` records: a
  traceback dialog), ``WaitCursor`` and ``showStatusMessage`` (no Qt);
* the widget's base class, constructible, and a ``ui`` whose widgets are plain attribute holders, so that the
  real ``AIRRegistrationWidget`` methods run without Qt (signals, layout and .ui loading are not exercised).

What only a real Slicer can show: the Qt panel itself, Slicer's own pip_ensure dialogs and progress, the
PyTorch extension route, GPU use, and the module factory loading the module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "mrml"))

import slicer_app_standins  # noqa: E402
from slicer_app_standins import slicer_application  # noqa: E402

#: The pins .ci/run installs: the versions a stock Slicer 5.12 ships (sources named in the file).
SLICER_REQUIREMENTS = HERE / "slicer-5.12-python.txt"
#: Not in Slicer's Python: the module must work, or install them, without them.
NOT_IN_SLICER = ("torch", "tqdm", "matplotlib")

TORCH_AT_START = importlib.util.find_spec("torch") is not None


def slicer_packages() -> dict[str, str]:
    """``{name: version}`` from :data:`SLICER_REQUIREMENTS`."""
    lines = SLICER_REQUIREMENTS.read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def pytest_collection_modifyitems(config, items) -> None:
    """These tests start from "nothing installed": in an environment that already has torch they cannot."""
    if TORCH_AT_START:
        skip = pytest.mark.skip(
            reason="needs the Slicer-like environment without torch (.ci/run: .venv-slicer)"
        )
        for item in items:
            item.add_marker(skip)


class App:
    """``slicer.app``: testing mode switchable (Slicer's ``--testing``); events are a no-op."""

    applicationName = "Slicer"

    def __init__(self) -> None:
        self.testing = False

    def testingEnabled(self) -> bool:
        return self.testing

    def processEvents(self) -> None:
        pass


class Dialogs:
    """The dialogs the module may open: confirmations are answered with ``answer``; everything is recorded."""

    def __init__(self) -> None:
        self.answer = True
        self.confirmations: list[str] = []
        self.errors: list[str] = []
        self.status: list[str] = []

    def confirmOkCancelDisplay(self, text, windowTitle=None, parent=None, **kwargs) -> bool:
        self.confirmations.append(text)
        return self.answer

    def errorDisplay(self, text, windowTitle=None, parent=None, **kwargs) -> None:
        self.errors.append(text)

    def showStatusMessage(self, message, duration=0) -> None:
        self.status.append(message)


class Widget:
    """A Qt widget as the module's code sees it: properties are attributes; show/hide set ``visible``."""

    def __init__(self) -> None:
        self.enabled, self.visible, self.checked = True, True, False
        self.text = self.toolTip = self.styleSheet = self.format = ""
        self.value = 0

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False

    def blockSignals(self, block: bool) -> bool:
        """Qt's QObject.blockSignals: returns the previous state (these stand-ins emit no signals)."""
        previous, self.signalsBlocked = getattr(self, "signalsBlocked", False), block
        return previous


class Ui:
    """``self.ui``: any child widget name gives a :class:`Widget` (made on first use)."""

    def __getattr__(self, name: str) -> Widget:
        if name.startswith("__"):
            raise AttributeError(name)
        widget = Widget()
        setattr(self, name, widget)
        return widget


@pytest.fixture(scope="session")
def slicer_app() -> Iterator[SimpleNamespace]:
    """The module imported under the stand-ins, with ``slicer.packaging``, ``slicer.app`` and the dialogs."""
    import slicer

    dialogs, app = Dialogs(), App()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(slicer, "__path__", [*slicer.__path__, str(HERE / "slicer_addons")])
        mp.setattr(slicer, "app", app, raising=False)
        for name in ("confirmOkCancelDisplay", "errorDisplay", "showStatusMessage"):
            mp.setattr(slicer.util, name, getattr(dialogs, name))
        mp.setattr(slicer.util, "WaitCursor", contextlib.nullcontext)
        mp.setattr(
            slicer_app_standins.ScriptedLoadableModuleWidget,
            "__init__",
            lambda self, parent=None: setattr(self, "parent", parent),
        )
        with slicer_application() as module:
            yield SimpleNamespace(module=module, dialogs=dialogs, app=app)
        sys.modules.pop("slicer.packaging", None)
        with contextlib.suppress(AttributeError):
            delattr(slicer, "packaging")


@pytest.fixture
def scene(slicer_app: SimpleNamespace):
    """``slicer.mrmlScene`` cleared, testing mode off, confirmations answered OK."""
    import slicer

    slicer.mrmlScene.Clear()
    slicer_app.app.testing = False
    slicer_app.dialogs.answer = True
    return slicer.mrmlScene


@pytest.fixture
def widget(slicer_app: SimpleNamespace, scene) -> SimpleNamespace:
    """The real AIRRegistrationWidget (no Qt: ``ui`` of attribute holders) on a phantom MR/TRUS pair."""
    from airreg import phantom
    from AIRRegistrationLib import mrml_bridge

    module: ModuleType = slicer_app.module
    panel = module.AIRRegistrationWidget()
    panel.ui = Ui()
    panel.logic = module.AIRRegistrationLogic()
    panel.logic.logCallback = panel.addLog
    panel._parameterNode = panel.logic.getParameterNode()
    case = phantom.generate_case(0)
    mr = mrml_bridge.add_volume_node_from_image(scene, case.mr, "Phantom MR")
    trus = mrml_bridge.add_volume_node_from_image(scene, case.trus, "Phantom TRUS")
    return SimpleNamespace(panel=panel, mr=mr, trus=trus, case=case)


@pytest.fixture
def log_messages(caplog) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog
