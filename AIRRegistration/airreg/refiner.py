"""A cascade's second stage: a generator trained on small starts, run after G on G's own result.

Re-applying the same G moves a 6-DOF result little (BENCHMARKS.md §1): G was trained on starts up to ±25° and
±5 mm and its precision is that of a coarse view, 3 mm slices that see out-of-plane angles poorly. A refiner is
a generator of its own configuration (e.g. a grid of 1.5 mm slices, ``airreg train --grid-size``) trained with ``airreg train
--rotation-deg 10 --translation-mm 4``, i.e. on misalignments like those G leaves. ``airreg add-refiner`` stores
it in a model file under ``refiner``; the registrar then runs G once and the refiner for the remaining passes,
on a pair resampled around G's result (the same frame, so the estimates compose), and D chooses among the passes
as before. The critic, its calibration, the patient check and the input check stay the base model's.

The loading half of this module is on the inference path (Slicer imports it): torch and the networks only.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import checkpoint as ckpt
from .config import ModelConfig
from .errors import InputError, ModelError
from .networks import Generator, load_weights

KEY = "refiner"


def load_network(state: dict, dof: int, where: str) -> tuple[Generator, ModelConfig] | None:
    """The refiner of a model file and its configuration, or None if the model has none."""
    entry = state.get(KEY)
    if entry is None:
        return None
    config = ModelConfig.from_dict(entry["model_config"])
    if config.dof != dof:
        raise ModelError(f"{where}: the refiner estimates {config.dof} DOF, the model {dof}")
    message = f"{where}: refiner weights do not match the refiner's configuration"
    return load_weights(Generator(config), entry["generator"], message), config


def attach(model: str | os.PathLike, refiner: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``model`` with the generator of the trained model ``refiner`` as its cascade's second stage."""
    base, stage = ckpt.load(model), ckpt.load(refiner)
    where = stage["path"]
    if stage["model_config"]["dof"] != base["model_config"]["dof"]:
        raise InputError(
            f"{where}: the refiner was trained for {stage['model_config']['dof']} DOF, the model "
            f"{base['path']} for {base['model_config']['dof']}"
        )
    if stage["preprocessing"] != base["preprocessing"]:
        raise InputError(f"{where}: the refiner normalises intensities unlike the model {base['path']}")
    history = stage.get("history") or []
    train_config = stage.get("train_config") or {}
    metadata = dict(base.get("metadata") or {})
    metadata[KEY] = {
        "from_model_sha256": stage["sha256"],
        "rotation_deg": train_config.get("rotation_deg"),
        "translation_mm": train_config.get("translation_mm"),
        "epochs": len(history),
        "seconds": float(sum(h.get("seconds", 0.0) for h in history)),
    }
    entry = {"model_config": stage["model_config"], "generator": stage["generator"]}
    return ckpt.save(out, {**ckpt.export_for_inference(base), KEY: entry, "metadata": metadata})
