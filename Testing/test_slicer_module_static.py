"""Static checks of the Slicer module that need neither Slicer nor Qt: the .ui, the module code, CMake, icons."""

from __future__ import annotations

import ast
import fnmatch
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "AIRRegistration"
MODULE_FILE = MODULE_DIR / "AIRRegistration.py"
LIB_DIR = MODULE_DIR / "AIRRegistrationLib"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "AIRRegistration.ui"
ICONS = [MODULE_DIR / "Resources" / "Icons" / "AIRRegistration.png", ROOT / "AIRRegistration.png"]

#: Qt and Slicer widget classes the .ui may use (Slicer's are declared as custom widgets).
QT_WIDGETS = {
    "QWidget", "QLabel", "QPushButton", "QToolButton", "QCheckBox", "QComboBox", "QLineEdit", "QSpinBox",
    "QDoubleSpinBox", "QProgressBar", "QGroupBox", "QTextEdit", "QPlainTextEdit", "QFrame", "QRadioButton",
}  # fmt: skip
SLICER_WIDGETS = {"qMRMLWidget", "qMRMLNodeComboBox", "ctkCollapsibleButton", "ctkPathLineEdit"}


@pytest.fixture(scope="module")
def ui_tree() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


@pytest.fixture(scope="module")
def module_ast() -> ast.Module:
    return ast.parse(
        MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE), feature_version=(3, 12)
    )


def widget_names(root: ET.Element) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def parameter_names(root: ET.Element) -> dict[str, str]:
    """Widget name -> SlicerParameterName (dynamic properties, stdset="0")."""
    names = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", f"{widget.get('name')}: SlicerParameterName must be dynamic"
                names[widget.get("name")] = prop.findtext("string")
    return names


def parameter_fields(tree: ast.Module) -> dict[str, ast.expr]:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "AIRRegistrationParameterNode":
            decorators = [ast.unparse(d) for d in node.decorator_list]
            assert "parameterNodeWrapper" in decorators
            return {
                stmt.target.id: stmt.annotation
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            }
    raise AssertionError("AIRRegistrationParameterNode not found")


# --- the .ui -------------------------------------------------------------------------------------------


def test_ui_is_qt_designer_xml(ui_tree):
    assert ui_tree.tag == "ui" and ui_tree.get("version") == "4.0"
    assert ui_tree.findtext("class") == "AIRRegistration"
    top = ui_tree.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "AIRRegistration"
    custom = {c.findtext("class"): c for c in ui_tree.iter("customwidget")}
    for name, cls in widget_names(ui_tree).items():
        assert cls in QT_WIDGETS or cls in custom, f"{name}: {cls} is neither a Qt widget nor declared"
        if cls in custom:
            assert cls in SLICER_WIDGETS
            assert custom[cls].findtext("extends") and custom[cls].findtext("header") == f"{cls}.h"
    names = [w.get("name") for w in ui_tree.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"


def test_ui_sections_and_selectors(ui_tree):
    widgets = widget_names(ui_tree)
    sections = {
        ui_tree.find(f".//widget[@name='{n}']").find("property[@name='text']/string").text: n
        for n, c in widgets.items()
        if c == "ctkCollapsibleButton"
    }
    assert set(sections) == {"Inputs", "Advanced", "Results", "Export", "Biopsy targets"}
    advanced = ui_tree.find(".//widget[@name='advancedCollapsibleButton']")
    assert advanced.findtext("property[@name='collapsed']/bool") == "true"
    combos = [n for n, c in widgets.items() if c == "qMRMLNodeComboBox"]
    assert len(combos) == 6
    params = parameter_names(ui_tree)
    assert all(n in params for n in combos)
    # every selector follows the scene
    receivers = {
        c.findtext("receiver") for c in ui_tree.iter("connection") if "setMRMLScene" in c.findtext("slot")
    }
    assert receivers == set(combos)


def test_ui_texts(ui_tree):
    def text(name):
        return ui_tree.find(f".//widget[@name='{name}']/property[@name='text']/string").text

    assert text("applyButton") == "Register"  # why it is disabled goes into inputHintLabel, not the button
    assert text("inputHintLabel") == "Select MR and TRUS volumes"
    assert text("checkAlignmentButton") == "Check current alignment"
    disclaimer = text("disclaimerLabel").lower()
    assert "synthetic phantoms" in disclaimer and "not for clinical use" in disclaimer
    assert "validated on your own data" in disclaimer


def test_selectors_of_a_base_class_list_its_subclasses(ui_tree):
    """qMRMLNodeComboBox filters on the exact class unless showChildNodeTypes is true (Slicer's
    qMRMLSortFilterProxyModel::filterAcceptsRow): "vtkMRMLTransformNode" alone lists no linear transform."""
    base_classes = {"vtkMRMLTransformNode", "vtkMRMLVolumeNode", "vtkMRMLNode"}
    checked = 0
    for widget in ui_tree.iter("widget"):
        if widget.get("class") != "qMRMLNodeComboBox":
            continue
        types = {s.text for s in widget.findall("property[@name='nodeTypes']/stringlist/string")}
        if types & base_classes:
            checked += 1
            assert widget.findtext("property[@name='showChildNodeTypes']/bool") == "true", widget.get("name")
    assert checked >= 1  # the initial-transform selector


def test_score_rows_say_their_range_and_direction(ui_tree):
    """Each D-score row and the estimated error say what the number means and which way is better."""
    for name in ("dScoreBeforeLabel", "dScoreAfterLabel", "dScoreCurrentLabel", "estimatedErrorLabel"):
        tip = ui_tree.findtext(f".//widget[@name='{name}']/property[@name='toolTip']/string") or ""
        assert "better" in tip, name
        if name.startswith("dScore"):
            assert "0 to 1" in tip and "higher is better" in tip, name


# --- module code vs .ui and parameter node -------------------------------------------------------------


def test_translated_texts_are_literals(module_ast):
    """Every ``_()`` gets one string literal: text built at run time (``+``, f-strings, variables) cannot be
    extracted for translation (Slicer's i18n: lupdate reads the literals)."""
    calls = [
        node
        for node in ast.walk(module_ast)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_"
    ]
    assert calls
    for call in calls:
        assert len(call.args) == 1 and not call.keywords, ast.unparse(call)
        arg = call.args[0]
        assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), ast.unparse(call)


def test_module_and_lib_parse_for_python_312():
    for path in [MODULE_FILE, *sorted(LIB_DIR.glob("*.py"))]:
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 12))


def test_every_ui_name_used_in_code_exists(ui_tree, module_ast):
    used = {
        node.attr
        for node in ast.walk(module_ast)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }
    assert used, "the widget uses no self.ui.<name>?"
    missing = used - set(widget_names(ui_tree))
    assert not missing, f"self.ui names missing from the .ui: {sorted(missing)}"


def test_parameter_names_match_parameter_node(ui_tree, module_ast):
    fields = parameter_fields(module_ast)
    for widget, name in parameter_names(ui_tree).items():
        assert name in fields, f"{widget}: SlicerParameterName '{name}' is not a parameter-node field"
    expected = {
        "mrVolume": "vtkMRMLScalarVolumeNode",
        "trusVolume": "vtkMRMLScalarVolumeNode",
        "initialTransform": "vtkMRMLTransformNode",
        "outputTransform": "vtkMRMLLinearTransformNode",
        "iterations": "Annotated[int, WithinRange(1, 10)]",
        "toleranceMm": "Annotated[float, WithinRange(0.5, 20)]",
        "targetPoints": "vtkMRMLMarkupsFiducialNode",
        "targetSegmentation": "Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]",
    }
    for name, annotation in expected.items():
        assert ast.unparse(fields[name]) == annotation
    # annotations the wrapper reads: no PEP 604 unions, no string annotations
    for name, annotation in fields.items():
        assert not any(isinstance(n, ast.BinOp) for n in ast.walk(annotation)), name
        assert not isinstance(annotation, ast.Constant), name


def test_widget_types_fit_parameter_types(ui_tree, module_ast):
    fields = {k: ast.unparse(v) for k, v in parameter_fields(module_ast).items()}
    classes = widget_names(ui_tree)
    for widget, name in parameter_names(ui_tree).items():
        cls, annotation = classes[widget], fields[name]
        if annotation.startswith(("vtkMRML", "Union[vtkMRML")):
            assert cls == "qMRMLNodeComboBox", widget
        elif "int" in annotation:
            assert cls == "QSpinBox", widget
        elif "float" in annotation:
            assert cls == "QDoubleSpinBox", widget
        elif annotation == "str":
            assert cls == "QLineEdit", widget
        else:  # an Enum
            assert cls == "QComboBox", widget


def test_module_has_template_classes(module_ast):
    classes = {
        n.name: [ast.unparse(b) for b in n.bases] for n in module_ast.body if isinstance(n, ast.ClassDef)
    }
    assert classes["AIRRegistration"] == ["ScriptedLoadableModule"]
    assert classes["AIRRegistrationWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert classes["AIRRegistrationLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["AIRRegistrationTest"] == ["ScriptedLoadableModuleTest"]


def test_heavy_imports_are_lazy(module_ast):
    top = set()
    for node in module_ast.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    assert not top & {"torch", "airreg", "numpy", "SimpleITK", "AIRRegistrationLib", "PyTorchUtils"}


QT_BOUND_MODULES = {"qt", "ctk", "PythonQt", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper",
                    "slicer.packaging", "slicer.i18n"}  # fmt: skip


def test_bridge_is_qt_free():
    """The bridge may use MRML classes (slicer-core) but nothing that needs Qt or the application."""
    for path in LIB_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not any(name == m or name.startswith(m + ".") for m in QT_BOUND_MODULES), (
                    f"{path.name}: imports {name}"
                )
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) != ("slicer", "app"), f"{path.name}: uses slicer.app"


# --- CMake and resources -------------------------------------------------------------------------------


def cmake_entries(path: Path) -> tuple[set[str], list[str]]:
    """Explicit file names and GLOB patterns in a CMakeLists.txt (``${MODULE_NAME}`` expanded)."""
    text = re.sub(r"#.*", "", path.read_text(encoding="utf-8")).replace("${MODULE_NAME}", "AIRRegistration")
    globs = []
    for body in re.findall(r"file\s*\(\s*GLOB(?:_RECURSE)?\s+(.*?)\)", text, flags=re.S):
        globs += [t for t in body.split() if "*" in t]
    files = set(re.findall(r"[\w./-]+\.(?:py|ui|png|pt|json|md)\b", text))
    return files, globs


def shipped_files() -> list[str]:
    skip = ("__pycache__", ".egg-info", ".pytest_cache")
    suffixes = {".py", ".ui", ".png", ".pt", ".json", ".md"}
    return sorted(
        p.relative_to(MODULE_DIR).as_posix()
        for p in MODULE_DIR.rglob("*")
        if p.is_file() and p.suffix in suffixes and not any(s in p.as_posix() for s in skip)
        and p.name != "CMakeLists.txt"
    )  # fmt: skip


def test_module_cmake_lists_every_script_and_resource():
    cmake = MODULE_DIR / "CMakeLists.txt"
    text = cmake.read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    files, globs = cmake_entries(cmake)
    for name in files:
        assert (MODULE_DIR / name).is_file(), f"CMakeLists lists {name}, which does not exist"
    unlisted = [
        f for f in shipped_files() if f not in files and not any(fnmatch.fnmatch(f, g) for g in globs)
    ]
    assert not unlisted, f"not in AIRRegistration/CMakeLists.txt: {unlisted}"


def test_extension_cmake():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for field in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                  "EXTENSION_SCREENSHOTURLS"):  # fmt: skip
        assert re.search(rf"set\({field}\s+\"[^\"]+\"\)", text), field
    assert re.search(r'set\(EXTENSION_CATEGORY\s+"Registration"\)', text)
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"PyTorch"\)', text)
    assert "add_subdirectory(AIRRegistration)" in text
    # as Slicer 5.10's extension template (3.20.6...3.22.6; 5.12's asks 3.28.0), policies up to 5.12's
    match = re.search(r"cmake_minimum_required\(VERSION (\d+)\.(\d+)\.(\d+)(?:\.\.\.([\d.]+))?", text)
    assert match and tuple(int(v) for v in match.groups()[:3]) >= (3, 20, 6), text[:80]
    assert "${Slicer_EXTENSION_GENERATE_CONFIG}" in text and "${Slicer_EXTENSION_CPACK}" in text


@pytest.mark.parametrize("path", ICONS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_icons_are_128_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def test_node_selectors_list_the_classes_of_their_field(ui_tree, module_ast):
    """Slicer's parameter-node binding sets a selector's nodeTypes from its field's annotation
    (qMRMLNodeComboBoxToNodeConnector, parameterNodeWrapper/guiConnectors.py:759, v5.12.3): the .ui must say the
    same, or the panel lists other nodes than the .ui suggests."""
    fields = parameter_fields(module_ast)
    params = parameter_names(ui_tree)
    for widget in ui_tree.iter("widget"):
        if widget.get("class") != "qMRMLNodeComboBox":
            continue
        types = [s.text for s in widget.findall("property[@name='nodeTypes']/stringlist/string")]
        annotation = fields[params[widget.get("name")]]
        names = [n.id for n in ast.walk(annotation) if isinstance(n, ast.Name) and n.id.startswith("vtkMRML")]
        assert types == names, widget.get("name")
