"""The inference path (what 3D Slicer imports to register and score) imports no training code (issue 12).

Slicer's Python ships no tqdm or matplotlib, and the module must not drag training code in. Each check runs in
a fresh interpreter whose import system refuses the blocked modules, so an import anywhere on the path fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import SimpleITK as sitk

from conftest import make_case

MODULE_DIR = Path(__file__).resolve().parents[1] / "AIRRegistration"

#: Never imported by the inference path: third-party packages Slicer lacks, and the core's training side.
TRAINING_SIDE = (
    "tqdm",
    "matplotlib",
    "airreg.training",
    "airreg.patient_check_training",
    "airreg.evaluation",
    "airreg.phantom",
    "airreg.benchmark",
    "airreg.plotting",
    "airreg.cli",
)
#: What Slicer imports to register and score.
INFERENCE_MODULES = (
    "airreg.geometry",
    "airreg.resampling",
    "airreg.preprocessing",
    "airreg.intensity",
    "airreg.networks",
    "airreg.checkpoint",
    "airreg.quality",
    "airreg.scoring",
    "airreg.registration",
    "airreg.patient_check",
    "airreg.data",
)

BLOCKER = """
import importlib.abc
import sys

BLOCKED = {blocked!r}


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"blocked by the test: {{name}}")
        return None


sys.meta_path.insert(0, Blocker())
"""


def run_blocked(blocked: tuple[str, ...], body: str) -> dict:
    """Run ``body`` (which prints one JSON line last) with ``blocked`` unimportable; return that JSON."""
    script = BLOCKER.format(blocked=blocked) + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(MODULE_DIR), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_blocker_refuses_what_it_blocks() -> None:
    """The check itself: a blocked module cannot be imported, even if installed."""
    out = run_blocked(
        ("json.tool",),
        """
        import json
        try:
            import json.tool
        except ImportError as exc:
            print(json.dumps({"refused": str(exc)}))
        """,
    )
    assert out == {"refused": "blocked by the test: json.tool"}


def test_inference_core_registers_without_training_code(tmp_path: Path) -> None:
    """The inference modules import, read two images and register them with the bundled model, with tqdm,
    matplotlib and the training-side modules unimportable."""
    case = make_case(5)
    sitk.WriteImage(case.mr, str(tmp_path / "mr.nrrd"))
    sitk.WriteImage(case.trus, str(tmp_path / "trus.nrrd"))
    out = run_blocked(
        TRAINING_SIDE,
        f"""
        import importlib, json, sys
        import numpy as np
        for name in {INFERENCE_MODULES!r}:
            importlib.import_module(name)
        from airreg import data
        from airreg.registration import Registrar

        registrar = Registrar.from_checkpoint(None, "cpu", iterations=1)
        result = registrar.register(data.read_image({str(tmp_path / "mr.nrrd")!r}, "MR"),
                                    data.read_image({str(tmp_path / "trus.nrrd")!r}, "TRUS"))
        print(json.dumps({{
            "d_score": result.d_score,
            "rigid": bool(np.allclose(result.mr_to_trus[:3, :3] @ result.mr_to_trus[:3, :3].T, np.eye(3),
                                      atol=1e-5)),
            "loaded": sorted(m for m in sys.modules if m.startswith("airreg")),
        }}))
        """,
    )
    assert 0.0 <= out["d_score"] <= 1.0
    assert out["rigid"]
    assert "airreg.patient_check" in out["loaded"] and "airreg.training" not in out["loaded"]


def test_module_helpers_import_without_torch_or_training_code() -> None:
    """What the panel imports to validate its inputs (``AIRRegistrationLib.mrml_bridge``) needs no torch: the
    panel must enable Register before anything is installed."""
    pytest.importorskip("vtk")
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core")
    out = run_blocked(
        (*TRAINING_SIDE, "torch"),
        """
        import json
        import slicer
        from AIRRegistrationLib import mrml_bridge

        scene = slicer.vtkMRMLScene()
        volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        print(json.dumps({"reason": mrml_bridge.validate_inputs(volume, volume)}))
        """,
    )
    assert out == {"reason": "MR and TRUS must differ"}
