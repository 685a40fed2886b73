"""Render the module panel (AIRRegistration.ui) offscreen to a PNG for the README, without Slicer.

Slicer's own widgets are replaced by plain Qt stand-ins (qMRMLNodeComboBox -> QComboBox showing example node
names, ctkCollapsibleButton -> QGroupBox titled like a collapsible section, qMRMLWidget -> QWidget); the panel
is shown as it looks when the module is opened (no result yet).

Usage (a tool, not a test dependency):

    pip install PySide6-Essentials
    python Resources/render_panel.py [--output Resources/Screenshots/panel.png] [--width 440]
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "AIRRegistration" / "Resources" / "UI" / "AIRRegistration.ui"
DEFAULT_OUTPUT = ROOT / "Resources" / "Screenshots" / "panel.png"

STAND_INS = {"qMRMLNodeComboBox": "QComboBox", "ctkCollapsibleButton": "QGroupBox", "qMRMLWidget": "QWidget"}

#: What the node selectors show in the picture.
EXAMPLE_NODES = {
    "mrVolumeSelector": "Prostate T2 MR",
    "trusVolumeSelector": "3D TRUS sweep",
    "targetPointsSelector": "Lesion targets",
    "targetSegmentationSelector": "Lesion segmentation",
}

SECTION_STYLE = """
QGroupBox { border: 1px solid #b8b8b8; border-radius: 3px; margin-top: 14px; padding-top: 6px;
            font-weight: bold; background: #f4f4f4; }
QGroupBox::title { subcontrol-origin: margin; left: 6px; padding: 0 4px; }
QGroupBox QLabel, QGroupBox QCheckBox { font-weight: normal; }
"""


def stand_in_ui(path: Path) -> tuple[bytes, dict[str, bool]]:
    """The .ui with Slicer widgets swapped for Qt stand-ins; also which sections start collapsed."""
    root = ET.parse(path).getroot()
    collapsed = {}
    for widget in root.iter("widget"):
        cls = widget.get("class")
        if cls not in STAND_INS:
            continue
        widget.set("class", STAND_INS[cls])
        for prop in list(widget.findall("property")):
            name = prop.get("name")
            if cls == "ctkCollapsibleButton" and name == "text":
                prop.set("name", "title")
            elif cls == "ctkCollapsibleButton" and name == "collapsed":
                collapsed[widget.get("name")] = prop.findtext("bool") == "true"
                widget.remove(prop)
            elif cls == "qMRMLNodeComboBox" and name != "toolTip":
                widget.remove(prop)  # nodeTypes, noneDisplay ... mean nothing to QComboBox
        if cls == "ctkCollapsibleButton":
            collapsed.setdefault(widget.get("name"), False)
    for tag in ("customwidgets", "connections"):
        for element in root.findall(tag):
            root.remove(element)
    return ET.tostring(root, encoding="utf-8"), collapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--width", type=int, default=440)
    args = parser.parse_args(argv)

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QComboBox, QGroupBox, QLabel, QPushButton, QWidget

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setStyle("Fusion")
    app.setStyleSheet(SECTION_STYLE)

    data, collapsed = stand_in_ui(UI_FILE)
    buffer = QBuffer()
    buffer.setData(QByteArray(data))
    buffer.open(QIODevice.OpenModeFlag.ReadOnly)
    panel = QUiLoader().load(buffer)
    if panel is None:
        print(f"could not load {UI_FILE}", file=sys.stderr)
        return 1

    # what the Slicer widget does in setup(), and what the node selectors would show
    panel.findChild(QWidget, "progressBar").hide()
    for name, text in EXAMPLE_NODES.items():
        panel.findChild(QComboBox, name).addItem(text)
    panel.findChild(QComboBox, "initialTransformSelector").addItem("TRUS volume's current transform")
    panel.findChild(QComboBox, "outputTransformSelector").addItem("Create new transform")
    # with both volumes selected, the widget enables the Register button and hides the hint under it
    # (see updateGUIFromParameterNode)
    panel.findChild(QPushButton, "applyButton").setEnabled(True)
    panel.findChild(QWidget, "inputHintLabel").hide()
    # targets selected, no result yet: what AIRRegistrationLogic.targetsStatus says then
    panel.findChild(QLabel, "targetsStatusLabel").setText(
        "Register first: the targets are mapped with the registration result."
    )
    for name, is_collapsed in collapsed.items():
        box = panel.findChild(QGroupBox, name)
        box.setTitle(("\u25b8 " if is_collapsed else "\u25be ") + box.title())
        if is_collapsed:  # only the title line, like a collapsed ctkCollapsibleButton
            for child in box.findChildren(QWidget):
                child.hide()
            box.setStyleSheet("QGroupBox { border: none; background: transparent; }")
            box.setFixedHeight(box.fontMetrics().height() + 12)

    panel.resize(args.width, 10)
    panel.adjustSize()
    layout = panel.layout()
    height = layout.totalHeightForWidth(args.width) if layout.hasHeightForWidth() else -1
    panel.resize(args.width, max(height, panel.minimumSizeHint().height()))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(args.output)):
        print(f"could not write {args.output}", file=sys.stderr)
        return 1
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
