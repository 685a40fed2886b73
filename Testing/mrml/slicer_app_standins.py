"""Stand-ins for what the 3D Slicer *application* adds to the ``slicer`` package, for pytest.

The ``slicer-core`` PyPI package gives real MRML (``slicer.vtkMRML*``) and ``slicer.util``, but not what the
application sets up at start-up. :func:`slicer_application` installs small stand-ins for exactly that, imports
the real module file ``AIRRegistration/AIRRegistration.py`` the way Slicer does (its folder on ``sys.path``) and
undoes everything afterwards:

* ``slicer.mrmlScene``: a real ``vtkMRMLScene`` with three slice composite nodes (singletons, as the
  application's Red/Yellow/Green views have), so ``Clear()`` keeps them as it does in Slicer.
* ``slicer.ScriptedLoadableModule``: the four base classes. The logic's ``getParameterNode`` follows Slicer's
  (a singleton ``vtkMRMLScriptedModuleNode`` tagged with the module name, ``ModuleName`` attribute); the test
  base class is a ``unittest.TestCase`` whose ``delayDisplay`` only logs. The widget base class refuses to be
  constructed: the widget needs Qt.
* ``slicer.parameterNodeWrapper``: ``parameterNodeWrapper`` and ``WithinRange``, storing fields on the scripted
  module node as Slicer's serializers do (nodes as node references, enums by member name, numbers and strings
  as parameters; defaults from the class body; type and range checks on assignment), and observable like
  Slicer's (``AddObserver``, ``RemoveObserver``, ``Modified``). No caching, GUI binding (the widget tests add
  one, Testing/widget/pythonqt_shim.py)
  or the other types Slicer supports (lists, dicts, unions, parameter packs): they raise ``TypeError`` here.
* ``slicer.i18n``: ``tr`` and ``translate`` return the text unchanged.
* ``slicer.selfTests``: an empty dict, filled by the module class as in Slicer.
* ``qt`` and ``ctk``: empty modules, so importing the module works and any use of Qt fails loudly.
* ``slicer.util.resetSliceViews``: needs ``slicer.app.layoutManager()``; replaced by a call counter.

What this does NOT verify: the Qt widget (.ui loading, GUI <-> parameter node binding, buttons, dialogs),
loading the module by Slicer's module factory, Slicer's own parameter node wrapper and serializers, the
application's default scene content (colour tables, layout, views), pip/PyTorch installation through Slicer,
and rendering.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import logging
import sys
import types
import typing
import unittest
from collections.abc import Iterator
from pathlib import Path

import pytest
import slicer

MODULE_DIR = Path(__file__).resolve().parents[2] / "AIRRegistration"

#: Singleton tags of the application's slice views.
SLICE_VIEWS = ("Red", "Yellow", "Green")

log = logging.getLogger(__name__)


# --- slicer.ScriptedLoadableModule ----------------------------------------------------------------------


class ScriptedLoadableModule:
    """Module metadata holder; registers the module's self-test in ``slicer.selfTests`` like Slicer."""

    def __init__(self, parent) -> None:
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""
        if not hasattr(slicer, "selfTests"):
            slicer.selfTests = {}
        slicer.selfTests[self.moduleName] = self.runTest

    def runTest(self, msec: int = 100, **kwargs) -> None:
        test_class = getattr(importlib.import_module(self.__module__), self.moduleName + "Test")
        test_case = test_class()
        test_case.messageDelay = msec
        test_case.runTest(**kwargs)


class ScriptedLoadableModuleWidget:
    """The widget needs Qt and the application: not available here."""

    def __init__(self, parent=None) -> None:
        raise NotImplementedError("the module widget needs Qt and the Slicer application")


class ScriptedLoadableModuleLogic:
    """Base logic: the module's singleton parameter node in ``slicer.mrmlScene``, as in Slicer."""

    def __init__(self, parent=None) -> None:
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[: -len("Logic")]
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is not None:
            if node.GetAttribute("ModuleName") != self.moduleName:
                node.SetAttribute("ModuleName", self.moduleName)
            return node
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)  # owned by the Python variable, as in Slicer
        node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(scene.GenerateUniqueName(self.moduleName))
        return scene.AddNode(node)


class ScriptedLoadableModuleTest(unittest.TestCase):
    """Base of the module's self-test; ``delayDisplay`` logs instead of showing a message box."""

    def delayDisplay(self, message, requestedDelay=None, msec=None) -> None:
        log.info("delayDisplay: %s", message)

    def runTest(self) -> None:
        log.warning("No test is defined in %s", type(self).__name__)


# --- slicer.parameterNodeWrapper ------------------------------------------------------------------------


class WithinRange:
    """Validator: the value must lie in [minimum, maximum] (inclusive)."""

    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


class _Field:
    """One annotated field stored on the scripted module node under its own name."""

    def __init__(self, name: str, type_: type, validators: list, default) -> None:
        self.name, self.type, self.validators = name, type_, validators
        self.node_types = _node_types(type_)
        self.is_node = bool(self.node_types)
        self.is_enum = isinstance(type_, type) and issubclass(type_, enum.Enum)
        if not (self.is_node or self.is_enum or type_ in (str, int, float, bool)):
            raise TypeError(f"{name}: the stand-in wrapper does not support {type_!r}")
        if default is _MISSING:
            default = None if self.is_node else next(iter(type_)) if self.is_enum else type_()
        self.default = default

    def is_in(self, node) -> bool:
        return bool(node.HasParameter(self.name))

    def write(self, node, value) -> None:
        if value is None and not self.is_node:
            raise ValueError(f"{self.name}: value must not be None")
        allowed = self.node_types if self.is_node else (int, float) if self.type is float else self.type
        if value is not None and not isinstance(value, allowed):
            raise TypeError(f"{self.name}: value must be of type {self.type!r}, is {type(value)!r}")
        for validator in self.validators:
            validator.validate(value)
        if self.is_node:
            node.SetParameter(self.name, "")  # marks the field as present, as Slicer's NodeSerializer does
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        elif self.is_enum:
            node.SetParameter(self.name, value.name)
        elif self.type is bool:
            node.SetParameter(self.name, "True" if value else "False")
        else:
            node.SetParameter(self.name, str(value))

    def read(self, node):
        if not self.is_in(node):  # e.g. after a scene close reset the node: Slicer writes the default
            self.write(node, self.default)
        if self.is_node:
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        if self.is_enum:
            return self.type[text]
        if self.type is bool:
            return text == "True"
        return self.type(text)


_MISSING = object()


def _node_types(type_) -> tuple[type, ...]:
    """The MRML node classes a field holds: ``(type_,)`` for a node class, the node classes of a
    ``Union[NodeA, NodeB, None]`` (Slicer's isNodeOrUnionOfNodes, parameterNodeWrapper/util.py, v5.12.3), else
    ``()``. A union is stored here as one node reference (Slicer's UnionSerializer uses ``name.<index>``)."""
    if isinstance(type_, type):
        return (type_,) if issubclass(type_, slicer.vtkMRMLNode) else ()
    if typing.get_origin(type_) is not typing.Union:
        return ()
    args = [arg for arg in typing.get_args(type_) if arg is not type(None)]
    if type(None) in typing.get_args(type_) and all(
        isinstance(arg, type) and issubclass(arg, slicer.vtkMRMLNode) for arg in args
    ):
        return tuple(args)
    return ()


def _field_property(field: _Field) -> property:
    return property(
        lambda self: field.read(self.parameterNode),
        lambda self, value: field.write(self.parameterNode, value),
    )


def parameterNodeWrapper(classtype: type) -> type:
    """Make the annotated class a typed view of a ``vtkMRMLScriptedModuleNode`` (``.parameterNode``)."""
    fields = {}
    for name, hint in typing.get_type_hints(classtype, include_extras=True).items():
        validators = []
        if typing.get_origin(hint) is typing.Annotated:
            hint, *extras = typing.get_args(hint)
            validators = [extra for extra in extras if hasattr(extra, "validate")]
        fields[name] = _Field(name, hint, validators, classtype.__dict__.get(name, _MISSING))

    def __init__(self, parameterNode) -> None:
        self.parameterNode = parameterNode
        for field in fields.values():
            if not field.is_in(parameterNode):
                field.write(parameterNode, field.default)

    for name, field in fields.items():
        setattr(classtype, name, _field_property(field))
    classtype.allParameters = fields
    classtype.__init__ = __init__
    classtype.StartModify = lambda self: self.parameterNode.StartModify()
    classtype.EndModify = lambda self, wasModifying: self.parameterNode.EndModify(wasModifying)
    # as Slicer's wrapper (Base/Python/slicer/parameterNodeWrapper/wrapper.py:357-359, v5.12.3)
    classtype.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(
        event, callback, priority
    )
    classtype.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
    classtype.Modified = lambda self: self.parameterNode.Modified()
    return classtype


# --- installation ---------------------------------------------------------------------------------------


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(
        name, "Stand-in for the Slicer application (Testing/mrml/slicer_app_standins.py)"
    )
    module.__dict__.update(attributes)
    return module


def standin_modules() -> dict[str, types.ModuleType]:
    """The modules the application provides and slicer-core lacks, by their import name."""
    return {
        "slicer.ScriptedLoadableModule": _module(
            "slicer.ScriptedLoadableModule",
            ScriptedLoadableModule=ScriptedLoadableModule,
            ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
            ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
            ScriptedLoadableModuleTest=ScriptedLoadableModuleTest,
        ),
        "slicer.parameterNodeWrapper": _module(
            "slicer.parameterNodeWrapper", parameterNodeWrapper=parameterNodeWrapper, WithinRange=WithinRange
        ),
        "slicer.i18n": _module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text),
        "qt": _module("qt"),
        "ctk": _module("ctk"),
    }


class SliceViewResets:
    """Replaces ``slicer.util.resetSliceViews`` (it calls ``slicer.app.layoutManager()``); counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def add_slice_view_composites(scene) -> list:
    """The slice composite nodes of the application's three slice views (singletons, kept by ``Clear()``)."""
    composites = []
    for view in SLICE_VIEWS:
        node = scene.CreateNodeByClass("vtkMRMLSliceCompositeNode")
        node.UnRegister(None)
        node.SetSingletonTag(view)
        node.SetLayoutName(view)
        composites.append(scene.AddNode(node))
    return composites


@contextlib.contextmanager
def slicer_application(
    module_name: str = "AIRRegistration", prepend_module_dir: bool = True
) -> Iterator[types.ModuleType]:
    """Install the stand-ins, import the real module file and yield it; undo everything on exit.

    ``prepend_module_dir=False`` leaves sys.path to the caller (Slicer itself appends the module folder).
    """
    with pytest.MonkeyPatch.context() as mp:
        scene = slicer.vtkMRMLScene()
        add_slice_view_composites(scene)
        mp.setattr(slicer, "mrmlScene", scene, raising=False)
        for name, module in standin_modules().items():
            mp.setitem(sys.modules, name, module)
            if name.startswith("slicer."):
                mp.setattr(slicer, name.removeprefix("slicer."), module, raising=False)
        mp.setattr(slicer.util, "resetSliceViews", SliceViewResets())
        mp.setattr(slicer, "selfTests", {}, raising=False)
        if prepend_module_dir:
            mp.syspath_prepend(str(MODULE_DIR))  # Slicer's "additional module paths"
        previous = sys.modules.pop(module_name, None)
        try:
            yield importlib.import_module(module_name)
        finally:
            # the module is bound to the stand-ins: never reuse it. AIRRegistrationLib (Qt-free, imported
            # lazily by the module) stays imported, as test_mrml_bridge.py imports it anyway.
            sys.modules.pop(module_name, None)
            if previous is not None:
                sys.modules[module_name] = previous
            scene.Clear(1)
