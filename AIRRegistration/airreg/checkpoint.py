"""Model files: everything inference needs (networks, grid, preprocessing, calibration) in one file that loads
without executing code (``torch.load(weights_only=True)``: tensors and plain containers only).

A checkpoint is a dict::

    format: "airreg-checkpoint", format_version: 1, package_version
    model_config: ModelConfig.to_dict()      train_config: TrainConfig.to_dict()
    preprocessing: {"mr": NormalizationSpec, "trus": NormalizationSpec} as dicts
    calibration: Calibration.to_dict() or None
    generator, discriminator: state dicts
    optimizer_g, optimizer_d: state dicts (training checkpoints only; stripped from exported models)
    epoch, step, history (list of per-epoch metric dicts), metadata (free-form strings and numbers)
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings
from importlib import resources
from pathlib import Path

import torch

from . import __version__, checkpoint_schema
from .errors import ModelError
from .fileio import atomic_path

FORMAT = "airreg-checkpoint"
FORMAT_VERSION = 1
DEFAULT_MODEL_NAME = "airnet-phantom-3dof.pt"
#: Model files larger than this are refused unread: the bundled ones are 4.3 MB, and the ``paper`` preset's G and
#: D hold 18.4 M float32 weights (70 MiB; a training checkpoint adds two Adam moments per weight).
#: ``$AIRREG_MAX_MODEL_BYTES`` overrides it.
DEFAULT_MAX_MODEL_BYTES = 2**31
MAX_MODEL_BYTES_ENV = "AIRREG_MAX_MODEL_BYTES"


def default_model_path() -> Path:
    """The bundled model, trained on synthetic phantoms (see models/MODEL_CARD.md)."""
    return bundled_model_path(DEFAULT_MODEL_NAME)


def bundled_model_path(name: str) -> Path:
    """Path of a model file shipped in ``airreg/models``."""
    return Path(str(resources.files("airreg.models").joinpath(name)))


def resolve(path: str | os.PathLike | None) -> Path:
    """A model path: ``None`` is the default model; a bundled model's name (``phantom-3dof``, ``phantom-6dof``)
    is that model unless a file of that name exists."""
    if path is None:
        return default_model_path()
    path = Path(path)
    bundled = bundled_model_path(f"airnet-{path.name}.pt")
    return bundled if not path.exists() and path.parent == Path(".") and bundled.is_file() else path


#: Said in every report of a model whose quality flag has not been made trustworthy.
FLAG_NOT_CALIBRATED = (
    "flag not calibrated: this model's critic has not been refined (airreg refine-critic) or it has no patient "
    "check (airreg train-patient-check), so its quality flag cannot be trusted"
)


def flag_calibrated(checkpoint: dict) -> bool:
    """Whether the critic refinement and the patient check have run for this model (its metadata says so)."""
    metadata = checkpoint.get("metadata") or {}
    return bool(metadata.get("critic_refinement")) and checkpoint.get("patient_check") is not None


def save(path: str | os.PathLike, checkpoint: dict) -> Path:
    """Write a checkpoint atomically."""
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__, **checkpoint}
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return Path(path)


def max_model_bytes() -> int:
    """The largest model file read: ``$AIRREG_MAX_MODEL_BYTES`` or ``DEFAULT_MAX_MODEL_BYTES``."""
    text = os.environ.get(MAX_MODEL_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_MODEL_BYTES
    if not text.isdigit() or int(text) < 1:
        raise ModelError(f"{MAX_MODEL_BYTES_ENV}={text[:30]!r} must be a whole number of bytes >= 1")
    return int(text)


def load(path: str | os.PathLike | None = None, map_location: str | torch.device = "cpu") -> dict:
    """Load and check a checkpoint without executing code; ``None`` loads the bundled default model.

    The file is refused unread if larger than :func:`max_model_bytes`, and its content is checked against
    the schema (:mod:`airreg.checkpoint_schema`) before anything is built from it.
    """
    path = resolve(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    size, limit = path.stat().st_size, max_model_bytes()
    if size > limit:
        raise ModelError(
            f"{path}: {size:,} bytes is larger than a model file may be ({limit:,}; set {MAX_MODEL_BYTES_ENV} "
            "to raise the limit)"
        )
    raw = path.read_bytes()
    try:
        with (
            warnings.catch_warnings()
        ):  # e.g. "Detected pickle protocol 113": the error below says what matters
            warnings.simplefilter("ignore")
            data = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):  # the weights-only unpickler met a class or function reference
            raise ModelError(
                f"{path}: refused to load: the file holds objects that would execute code "
                "(not a weights-only checkpoint)"
            ) from exc
        raise ModelError(f"{path}: corrupt or not a model file (unreadable pickle data)") from exc
    except Exception as exc:  # torch.load raises many types on garbage (KeyError, RuntimeError, EOFError ...)
        raise ModelError(f"{path}: corrupt or not a model file ({type(exc).__name__})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelError(f"{path}: not an AIRRegistration checkpoint")
    version = data.get("format_version", 0)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ModelError(f"{path}: checkpoint format {version} is newer than this version supports")
    checkpoint_schema.validate(data, str(path))
    data["sha256"] = hashlib.sha256(raw).hexdigest()
    data["path"] = str(path)
    return data


#: The entries of a model file that hold network weights (state dicts); a refiner holds its own under "generator".
WEIGHT_ENTRIES = ("generator", "discriminator", "patient_check")


def export_for_inference(checkpoint: dict, float16: bool = False) -> dict:
    """A copy without optimiser state, for shipping a trained model; ``float16`` stores the weights in half
    precision (half the file; the networks are rebuilt in float32 when loaded, so only the weights are rounded)."""
    drop = {"optimizer_g", "optimizer_d", "sha256", "path", "format", "format_version", "package_version"}
    out = {k: v for k, v in checkpoint.items() if k not in drop}
    if float16:
        for key in WEIGHT_ENTRIES:
            if out.get(key) is not None:
                out[key] = _half(out[key])
        if out.get("refiner") is not None:
            out["refiner"] = {**out["refiner"], "generator": _half(out["refiner"]["generator"])}
    return out


def _half(weights: dict) -> dict:
    return {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
