"""A small PythonQt-style shim over PySide6, so pytest can run the real ``AIRRegistrationWidget`` on a real Qt.

Slicer's Python talks to Qt through PythonQt; this shim gives the widget what it uses of that, on PySide6
(``QT_QPA_PLATFORM=offscreen``), next to the MRML stand-ins of ``Testing/mrml/slicer_app_standins.py``:

* ``PythonQtObject``: a QObject seen as PythonQt shows it: Qt properties read and written as attributes
  (``button.enabled = False``), other attributes passed through, and ``connect("clicked(bool)", slot)``.
* ``qMRMLWidget``, ``ctkCollapsibleButton`` and ``qMRMLNodeComboBox``: PySide6 classes with the properties the
  .ui sets, registered with ``QUiLoader`` so the real ``AIRRegistration.ui`` loads unchanged. The combo box
  lists the scene's nodes as Slicer's does: ``nodeTypes`` matched with ``IsA``, and only the exact class unless
  ``showChildNodeTypes`` (qMRMLSortFilterProxyModel::filterAcceptsRow, Libs/MRML/Widgets/
  qMRMLSortFilterProxyModel.cxx:267-279, v5.12.3); nodes hidden from editors are left out; with
  ``noneEnabled`` a first item stands for None (qMRMLNodeComboBox.cxx:243). The .ui's
  ``mrmlSceneChanged -> setMRMLScene`` connections are made by name.
* ``connect_gui``: the parameter-node <-> widget binding that Slicer's parameterNodeWrapper makes from the
  ``SlicerParameterName`` properties (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py): node combo
  boxes (their ``nodeTypes`` set from the field, as Slicer does), spin boxes, line edits, QLabel (one way), and a QComboBox of an Enum filled with its ``label``s
  (QComboBoxToEnumConnector, guiConnectors.py:466-510).
* ``ScriptedLoadableModuleWidget``: the base class of Base/Python/slicer/ScriptedLoadableModule.py:88-115
  (a parent qMRMLWidget with a QVBoxLayout, ``resourcePath``), without the developer-mode buttons.
* ``slicer.app.processEvents``, ``slicer.util.loadUI`` / ``childWidgetVariables`` / ``WaitCursor`` /
  ``showStatusMessage`` / ``errorDisplay`` / ``mainWindow`` and ``qt.QFileDialog`` / ``qt.QDir``: small stand-ins
  that record what the widget asked for (``Recorder``) instead of showing dialogs.

What this cannot show: PythonQt itself (its overload resolution and type conversions), Slicer's real
parameterNodeWrapper and qMRMLNodeComboBox (their "add/rename node" items, node selection upon creation, their
exact signal order), the module being loaded by Slicer's factory, the layout, views and interaction handles
being drawn, real dialogs, and pip or PyTorch installs. Those need a real Slicer.
"""

from __future__ import annotations

import contextlib
import os
import types
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import slicer  # noqa: E402
from PySide6 import QtCore, QtWidgets  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402

# --- PythonQt's view of a QObject -----------------------------------------------------------------------


class PythonQtObject:
    """A QObject with PythonQt's attribute access: Qt properties as attributes, ``connect("signal(...)")``."""

    __slots__ = ("_qobject",)

    def __init__(self, qobject: QtCore.QObject) -> None:
        object.__setattr__(self, "_qobject", qobject)

    @property
    def qobject(self) -> QtCore.QObject:
        return self._qobject

    def __getattr__(self, name: str) -> Any:
        q = self._qobject
        if q.metaObject().indexOfProperty(name) >= 0:
            return q.property(name)
        return getattr(q, name)

    def __setattr__(self, name: str, value: Any) -> None:
        q = self._qobject
        if q.metaObject().indexOfProperty(name) < 0:
            raise AttributeError(f"{q.objectName()}: {type(q).__name__} has no Qt property {name!r}")
        if not q.setProperty(name, value):
            raise TypeError(f"{q.objectName()}: cannot set {name!r} to {value!r}")

    def connect(self, signature: str, slot: Callable) -> None:
        """PythonQt's ``connect("clicked(bool)", slot)``: the signal named before the parenthesis."""
        getattr(self._qobject, signature.split("(")[0]).connect(slot)


def unwrap(widget: Any) -> QtCore.QObject:
    return widget.qobject if isinstance(widget, PythonQtObject) else widget


# --- Slicer's widgets -----------------------------------------------------------------------------------


class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801 - Slicer's class name
    """Top-level MRML widget: ``setMRMLScene`` emits ``mrmlSceneChanged`` to the selectors."""

    mrmlSceneChanged = QtCore.Signal(object)

    def setMRMLScene(self, scene) -> None:  # noqa: N802
        self.mrmlSceneChanged.emit(scene)


class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801 - CTK's class name
    """A titled section; ``text`` is the title, ``collapsed`` is kept (not drawn)."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._collapsed = False

    def _get_text(self) -> str:
        return self.title()

    def _set_text(self, text: str) -> None:
        self.setTitle(text)

    def _get_collapsed(self) -> bool:
        return self._collapsed

    def _set_collapsed(self, collapsed: bool) -> None:
        self._collapsed = bool(collapsed)

    text = QtCore.Property(str, _get_text, _set_text)
    collapsed = QtCore.Property(bool, _get_collapsed, _set_collapsed)


def _property(name: str, kind, default):
    """A Qt property stored in ``self._props``."""

    def get(self):
        return self._props.get(name, default)

    def set_(self, value):
        self._props[name] = list(value) if kind == "QStringList" else value
        self.refresh()

    return QtCore.Property(kind, get, set_)


class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801 - Slicer's class name
    """Lists the scene's nodes of ``nodeTypes`` (see the module docstring for the filter it copies)."""

    currentNodeChanged = QtCore.Signal(object)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._props: dict[str, Any] = {}
        self._scene = None
        self._observers: list[int] = []
        self._current_id: str | None = None
        self.currentIndexChanged.connect(self._on_index_changed)

    nodeTypes = _property("nodeTypes", "QStringList", [])
    showChildNodeTypes = _property("showChildNodeTypes", bool, True)
    noneEnabled = _property("noneEnabled", bool, False)
    addEnabled = _property("addEnabled", bool, False)
    removeEnabled = _property("removeEnabled", bool, False)
    renameEnabled = _property("renameEnabled", bool, False)
    noneDisplay = _property("noneDisplay", str, "None")
    baseName = _property("baseName", str, "")

    def setMRMLScene(self, scene) -> None:  # noqa: N802
        if self._scene is not None:
            for tag in self._observers:
                self._scene.RemoveObserver(tag)
        self._scene, self._observers = scene, []
        if scene is not None:
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent):
                self._observers.append(scene.AddObserver(event, lambda *args: self.refresh()))
        self.refresh()

    def accepts(self, node) -> bool:
        """qMRMLSortFilterProxyModel::filterAcceptsRow's type filter (see the module docstring)."""
        if node.GetHideFromEditors():
            return False
        types_ = self._props.get("nodeTypes", [])
        show_children = self._props.get("showChildNodeTypes", True)
        return any(node.IsA(t) and (show_children or t == node.GetClassName()) for t in types_)

    def nodes(self) -> list:
        if self._scene is None:
            return []
        all_nodes = [self._scene.GetNthNode(i) for i in range(self._scene.GetNumberOfNodes())]
        return [node for node in all_nodes if self.accepts(node)]

    def refresh(self) -> None:
        """Rebuild the items, keeping the current node if it is still listed."""
        with QtCore.QSignalBlocker(self):
            self.clear()
            if self._props.get("noneEnabled", False):
                self.addItem(self._props.get("noneDisplay", "None"), None)
            for node in self.nodes():
                self.addItem(node.GetName(), node.GetID())
            index = self.findData(self._current_id) if self._current_id else -1
            if index < 0 and self.count():  # Qt's QComboBox shows its first item
                index = 0
            self.setCurrentIndex(index)
        self._on_index_changed(self.currentIndex())

    def currentNode(self):  # noqa: N802
        node_id = self.currentData()
        return self._scene.GetNodeByID(node_id) if (node_id and self._scene is not None) else None

    def setCurrentNode(self, node) -> None:  # noqa: N802
        node_id = node.GetID() if node is not None else None
        index = self.findData(node_id) if node_id else (0 if self._props.get("noneEnabled") else -1)
        self.setCurrentIndex(index)

    def _on_index_changed(self, _index: int) -> None:
        node = self.currentNode()
        node_id = node.GetID() if node is not None else None
        if node_id != self._current_id:
            self._current_id = node_id
            self.currentNodeChanged.emit(node)


SLICER_WIDGETS = (qMRMLWidget, ctkCollapsibleButton, qMRMLNodeComboBox)


def load_ui(path: str | os.PathLike) -> QtWidgets.QWidget:
    """The .ui as ``slicer.util.loadUI`` loads it, with the Slicer widgets above and its scene connections."""
    loader = QUiLoader()
    for cls in SLICER_WIDGETS:
        loader.registerCustomWidget(cls)
    root = ET.parse(path).getroot()
    connections = [
        (c.findtext("sender"), c.findtext("signal").split("(")[0], c.findtext("receiver"), c.findtext("slot"))
        for c in root.iter("connection")
    ]
    for element in root.findall("connections"):
        root.remove(element)  # made below by name: QUiLoader cannot match vtkMRMLScene* signatures
    buffer = QtCore.QBuffer()
    buffer.setData(QtCore.QByteArray(ET.tostring(root, encoding="utf-8")))
    buffer.open(QtCore.QIODevice.OpenModeFlag.ReadOnly)
    widget = loader.load(buffer)
    if widget is None:
        raise RuntimeError(f"QUiLoader could not load {path}: {loader.errorString()}")
    for sender, signal, receiver, slot in connections:
        source = widget if widget.objectName() == sender else widget.findChild(QtCore.QObject, sender)
        target = widget.findChild(QtCore.QObject, receiver)
        getattr(source, signal).connect(getattr(target, slot.split("(")[0]))
    return widget


def child_widget_variables(widget: QtWidgets.QWidget) -> types.SimpleNamespace:
    """``slicer.util.childWidgetVariables``: every named child as an attribute (PythonQt view)."""
    children = {
        c.objectName(): PythonQtObject(c) for c in widget.findChildren(QtWidgets.QWidget) if c.objectName()
    }
    return types.SimpleNamespace(**children)


# --- the parameter node <-> GUI binding ----------------------------------------------------------------


def connect_gui(wrapper, gui: types.SimpleNamespace) -> Callable[[], None]:
    """Bind widgets with a ``SlicerParameterName`` to the wrapper's fields; returns the undo (the "tag")."""
    node = wrapper.parameterNode
    bound: list[tuple[QtWidgets.QWidget, str]] = []
    undo: list[Callable[[], None]] = []
    for proxy in vars(gui).values():
        widget = unwrap(proxy)
        name = widget.property("SlicerParameterName")
        if name:
            bound.append((widget, name))

    def write_gui() -> None:
        for widget, name in bound:
            value = getattr(wrapper, name)
            with QtCore.QSignalBlocker(widget):
                if isinstance(widget, qMRMLNodeComboBox):
                    widget.setCurrentNode(value)
                    widget._current_id = value.GetID() if value is not None else None
                elif isinstance(widget, QtWidgets.QComboBox):
                    widget.setCurrentIndex(list(type(value)).index(value))
                elif isinstance(widget, (QtWidgets.QSpinBox, QtWidgets.QDoubleSpinBox)):
                    widget.setValue(value)
                elif isinstance(widget, (QtWidgets.QLineEdit, QtWidgets.QLabel)):
                    widget.setText(str(value))

    fields = getattr(type(wrapper), "allParameters", {})
    for widget, name in bound:
        if isinstance(widget, qMRMLNodeComboBox):
            # Slicer's connector lists the field's node classes (qMRMLNodeComboBoxToNodeConnector.__init__,
            # guiConnectors.py:759, v5.12.3), whatever the .ui says
            widget.nodeTypes = (
                [t.__name__ for t in fields[name].node_types] if name in fields else widget.nodeTypes
            )
            signal, read = widget.currentNodeChanged, widget.currentNode
        elif isinstance(widget, QtWidgets.QComboBox):
            choices = list(type(getattr(wrapper, name)))
            widget.clear()
            widget.addItems([e.label() if hasattr(e, "label") else e.name for e in choices])
            signal, read = widget.currentIndexChanged, (lambda w=widget, c=choices: c[w.currentIndex()])
        elif isinstance(widget, (QtWidgets.QSpinBox, QtWidgets.QDoubleSpinBox)):
            signal, read = widget.valueChanged, widget.value
        elif isinstance(widget, QtWidgets.QLineEdit):
            signal, read = widget.textChanged, widget.text
        else:
            continue  # QLabel: one way

        def changed(*_args, name=name, read=read) -> None:
            setattr(wrapper, name, read())

        signal.connect(changed)
        undo.append(lambda s=signal, c=changed: s.disconnect(c))

    tag = node.AddObserver("ModifiedEvent", lambda *args: write_gui())
    write_gui()
    undo.append(lambda: node.RemoveObserver(tag))

    def disconnect() -> None:
        for step in undo:
            step()

    return disconnect


# --- the application pieces the widget uses ---------------------------------------------------------


class Recorder:
    """What the widget asked of the application: status messages, error dialogs, file dialogs, cursor."""

    def __init__(self) -> None:
        self.status: list[str] = []
        self.errors: list[str] = []
        self.save_paths: list[str] = []  # answers of QFileDialog.getSaveFileName, first first
        self.wait_cursor = 0

    def WaitCursor(self):  # noqa: N802 - slicer.util's name
        recorder = self

        @contextlib.contextmanager
        def cursor() -> Iterator[None]:
            recorder.wait_cursor += 1
            try:
                yield
            finally:
                recorder.wait_cursor -= 1

        return cursor()


def module_panel() -> qMRMLWidget:
    """The parent Slicer's module factory gives a scripted widget (a widget with a vertical layout); Slicer
    then calls the widget's ``setup()`` (qSlicerScriptedLoadableModuleWidget::setup)."""
    panel = qMRMLWidget()
    panel.setLayout(QtWidgets.QVBoxLayout())
    return panel


class ScriptedLoadableModuleWidget:
    """Slicer's widget base class (see the module docstring): a parent qMRMLWidget with a vertical layout."""

    def __init__(self, parent=None) -> None:
        self.moduleName = type(self).__name__.removesuffix("Widget")
        created = parent is None
        if created:
            parent = qMRMLWidget()
            parent.setLayout(QtWidgets.QVBoxLayout())
            parent.setMRMLScene(slicer.mrmlScene)
        self.parent = parent
        self.parent.isEntered = True  # qSlicerAbstractModuleWidget::isEntered: the module is shown
        self.layout = self.parent.layout()
        if created:
            self.setup()

    def resourcePath(self, filename: str) -> str:  # noqa: N802
        return os.path.join(
            os.path.dirname(__import__(type(self).__module__).__file__), "Resources", filename
        )

    def setup(self) -> None:
        pass


def qt_module(recorder: Recorder) -> types.ModuleType:
    """``qt``: the file dialog (answers from ``recorder.save_paths``) and ``QDir.homePath``."""

    class QFileDialog:
        @staticmethod
        def getSaveFileName(*args) -> str:  # noqa: N802
            return recorder.save_paths.pop(0) if recorder.save_paths else ""

        @staticmethod
        def getOpenFileName(*args) -> str:  # noqa: N802
            return ""

    return types.SimpleNamespace(
        QFileDialog=QFileDialog, QDir=types.SimpleNamespace(homePath=lambda: str(Path.home()))
    )


@contextlib.contextmanager
def pythonqt_application(monkeypatch, air_module) -> Iterator[Recorder]:
    """Install the shim around a module imported with ``slicer_app_standins.slicer_application``."""
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    recorder = Recorder()
    util = slicer.util
    monkeypatch.setattr(util, "loadUI", load_ui)
    monkeypatch.setattr(util, "childWidgetVariables", child_widget_variables)
    monkeypatch.setattr(util, "WaitCursor", recorder.WaitCursor)
    monkeypatch.setattr(util, "showStatusMessage", lambda text, msec=0: recorder.status.append(text))
    monkeypatch.setattr(util, "errorDisplay", lambda text, **kwargs: recorder.errors.append(text))
    monkeypatch.setattr(util, "mainWindow", lambda: None)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=app.processEvents), raising=False)
    monkeypatch.setattr(air_module, "qt", qt_module(recorder))
    base = air_module.ScriptedLoadableModuleWidget  # the stand-in that refuses to be built without Qt
    for name in ("__init__", "resourcePath", "setup"):
        monkeypatch.setattr(base, name, getattr(ScriptedLoadableModuleWidget, name), raising=False)
    wrapper = air_module.AIRRegistrationParameterNode
    monkeypatch.setattr(wrapper, "connectGui", connect_gui, raising=False)
    monkeypatch.setattr(wrapper, "disconnectGui", lambda self, tag: tag() if tag else None, raising=False)
    yield recorder
