"""Reading ITK transform files without handing unchecked content to ITK's readers.

ITK's file readers trust the file: a text transform whose ``Parameters:`` line is empty segfaults
``sitk.ReadTransform``, and one with too few values makes the transform read memory past the end of its
parameter array. So every format is parsed here, each transform's type, dimension and parameter counts are
checked against what that type takes, and only then is a SimpleITK transform built from the values (through
``SetFixedParameters`` / ``SetParameters``, which check the counts again).

* ``.tfm`` / ``.txt`` (``#Insight Transform File V1.0``): parsed as text, composites included.
* ``.mat``: ITK writes a MATLAB level-4 file of two matrices (parameters, fixed parameters); the format is a
  20-byte header per matrix, so it is parsed with numpy.
* ``.xfm``: the MNI text format; only its ``Linear`` form (a 3x4 matrix, which ITK writes in LPS) is read.
* ``.h5`` / ``.hdf5``: HDF5 is too large a format to parse here, so ITK reads it in a child process
  (``sys.executable``; a crash there is an error here, not a dead program) and only the type names and
  values come back, checked like the others. The child cannot see how many values the file stored, so a short
  parameter list can still come back as garbage values; those fail the rigidity check unless they happen to
  form a rotation.

Accepted: the rigid types (translation, identity, Euler, versor, versor rigid) and the types that are rigid
for some parameters (similarity, scale-versor, scale-skew-versor, scale, affine, matrix-offset), which must
then have a rigid matrix, plus composites of those. Deformable and unknown types are refused by name.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

#: A transform file larger than this is not a rigid transform (a text composite of 100 parts is ~20 kB).
MAX_TRANSFORM_FILE_BYTES = 1_000_000
#: Composites with more parts than this are refused (ours hold 1 to 3).
MAX_COMPOSITE_PARTS = 100
#: Seconds the child process reading an HDF5 transform may take.
CHILD_TIMEOUT_S = 60
_RIGID_TOL = 1e-3

TEXT_HEADER = "#Insight Transform File V1.0"
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)(?:\(\w*\))?", re.IGNORECASE)
_TYPE_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9]*)_(double|float)_(\d+)_(\d+)$")
_DEFORMABLE = ("BSpline", "Displacement", "Field", "Kernel", "Spline", "Velocity", "Gaussian")


@dataclass(frozen=True)
class _Kind:
    """What one ITK transform type takes: its parameter count, accepted fixed-parameter counts and a factory."""

    parameters: int
    fixed: tuple[int, ...]
    make: Callable[[], sitk.Transform]
    versor: bool = False  # parameters 0-2 are a versor (norm at most 1)


KINDS: dict[str, _Kind] = {
    "IdentityTransform": _Kind(0, (0,), lambda: sitk.Transform(3, sitk.sitkIdentity)),
    "TranslationTransform": _Kind(3, (0,), lambda: sitk.TranslationTransform(3)),
    # Euler3D's fourth fixed parameter is the ComputeZYX flag (ITK 5 writes it); older files have 3
    "Euler3DTransform": _Kind(6, (3, 4), sitk.Euler3DTransform),
    "VersorTransform": _Kind(3, (3,), sitk.VersorTransform, versor=True),
    "VersorRigid3DTransform": _Kind(6, (3,), sitk.VersorRigid3DTransform, versor=True),
    "Similarity3DTransform": _Kind(7, (3,), sitk.Similarity3DTransform, versor=True),
    "ScaleVersor3DTransform": _Kind(9, (3,), sitk.ScaleVersor3DTransform, versor=True),
    "ScaleSkewVersor3DTransform": _Kind(15, (3,), sitk.ScaleSkewVersor3DTransform, versor=True),
    "ScaleTransform": _Kind(3, (3,), lambda: sitk.ScaleTransform(3)),
    "AffineTransform": _Kind(12, (3,), lambda: sitk.AffineTransform(3)),
    "MatrixOffsetTransformBase": _Kind(12, (3,), lambda: sitk.AffineTransform(3)),
}


@dataclass(frozen=True)
class Part:
    """One transform as stored: its type name (``Euler3DTransform_double_3_3``) and values."""

    type_name: str
    parameters: tuple[float, ...]
    fixed: tuple[float, ...]


def read(path: str | Path) -> sitk.Transform:
    """A checked SimpleITK transform (a CompositeTransform for a composite file) built from an ITK file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        is_composite, parts = _read_in_child(path)
    elif suffix == ".mat":
        is_composite, parts = False, [_parse_mat(_read_capped(path), path)]
    elif suffix == ".xfm":
        is_composite, parts = False, [_parse_xfm(read_text(path), path)]
    else:
        is_composite, parts = parse_text(read_text(path), path)
    transforms = [
        build(part, f"{path}: transform {i + 1}" if is_composite else str(path))
        for i, part in enumerate(parts)
    ]
    return sitk.CompositeTransform(transforms) if is_composite else transforms[0]


def _check_size(path: Path) -> None:
    size = path.stat().st_size
    if size > MAX_TRANSFORM_FILE_BYTES:
        raise InputError(
            f"{path}: {size} bytes is too large for a rigid transform file (limit {MAX_TRANSFORM_FILE_BYTES})"
        )


def _read_capped(path: Path) -> bytes:
    _check_size(path)
    return path.read_bytes()


def read_text(path: Path) -> str:
    """A transform file's text: at most MAX_TRANSFORM_FILE_BYTES of UTF-8 without NUL bytes."""
    raw = _read_capped(path)
    if b"\0" in raw:
        raise InputError(f"{path}: binary data in a text transform file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text transform file (not UTF-8 text)") from None


# --- text (.tfm, .txt) ------------------------------------------------------------------------------------


def parse_numbers(text: str, where: str) -> tuple[float, ...]:
    """Whitespace-separated decimal numbers; NaN, Inf and anything else is refused naming ``where``."""
    values = []
    for token in text.split():
        if _NON_FINITE.fullmatch(token):
            raise InputError(f"{where}: NaN or Inf value {token!r}")
        if not _NUMBER.fullmatch(token):
            raise InputError(f"{where}: {token[:20]!r} is not a number")
        value = float(token)
        if not np.isfinite(value):
            raise InputError(f"{where}: value {token[:20]!r} overflows a double")
        values.append(value)
    return tuple(values)


def parse_text(text: str, path: str | Path) -> tuple[bool, list[Part]]:
    """(is a composite, its parts) of an ITK text transform file; raises InputError on anything malformed."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None or lines[first].strip() != TEXT_HEADER:
        raise InputError(f"{path}: not an ITK text transform file (the first line must be {TEXT_HEADER!r})")
    blocks: list[dict[str, tuple[int, str]]] = []
    for number, line in enumerate(lines[first + 1 :], start=first + 2):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, colon, value = stripped.partition(":")
        key = key.strip()
        if not colon or key not in ("Transform", "Parameters", "FixedParameters"):
            raise InputError(
                f"{path}: line {number}: expected 'Transform:', 'Parameters:' or 'FixedParameters:'"
            )
        if key == "Transform":
            blocks.append({})
        elif not blocks:
            raise InputError(f"{path}: line {number}: {key} before any 'Transform:' line")
        if key in blocks[-1]:
            raise InputError(f"{path}: line {number}: a second {key} line for one transform")
        blocks[-1][key] = (number, value.strip())
        if len(blocks) > MAX_COMPOSITE_PARTS + 1:
            raise InputError(f"{path}: more than {MAX_COMPOSITE_PARTS} transforms")
    if not blocks:
        raise InputError(f"{path}: holds no transform")
    is_composite = blocks[0]["Transform"][1].startswith("CompositeTransform")
    if is_composite:
        extra = set(blocks[0]) - {"Transform"}
        if extra:
            raise InputError(f"{path}: line {blocks[0][extra.pop()][0]}: a composite transform has no values")
        blocks = blocks[1:]
        if not blocks:
            raise InputError(f"{path}: the composite transform holds no transforms")
    elif len(blocks) > 1:
        raise InputError(f"{path}: holds {len(blocks)} transforms; expected one, or one composite")
    return is_composite, [_text_part(block, path) for block in blocks]


def _text_part(block: dict[str, tuple[int, str]], path: str | Path) -> Part:
    line, type_name = block["Transform"]
    if type_name.startswith("CompositeTransform"):
        raise InputError(f"{path}: line {line}: a composite inside a composite is not supported")
    values = {}
    for key in ("Parameters", "FixedParameters"):
        if key not in block:
            raise InputError(f"{path}: the transform on line {line} has no {key} line")
        number, text = block[key]
        values[key] = parse_numbers(text, f"{path}: line {number}")
    return Part(type_name, values["Parameters"], values["FixedParameters"])


# --- MATLAB level 4 (.mat) and MNI (.xfm) -----------------------------------------------------------------


def _parse_mat(raw: bytes, path: Path) -> Part:
    """The two matrices ITK's MatlabTransformIO writes: parameters named by the type, then ``fixed``."""
    matrices, offset = [], 0
    while offset < len(raw):
        name, values, offset = _mat_matrix(raw, offset, path)
        matrices.append((name, values))
        if len(matrices) > 2:
            break
    if len(matrices) != 2 or matrices[1][0] != "fixed":
        raise InputError(f"{path}: not an ITK .mat transform (expected the parameters, then 'fixed')")
    (type_name, parameters), (_, fixed) = matrices
    return Part(type_name, parameters, fixed)


def _mat_matrix(raw: bytes, offset: int, path: Path) -> tuple[str, tuple[float, ...], int]:
    """One MATLAB level-4 matrix at ``offset``: (name, values, offset after it)."""
    bad = InputError(f"{path}: not an ITK .mat transform (damaged MATLAB v4 data at byte {offset})")
    if len(raw) - offset < 20:
        raise bad
    for order in ("<", ">"):
        kind, rows, cols, imaginary, name_length = np.frombuffer(raw, f"{order}i4", 5, offset)
        if 0 <= kind < 10000 and kind // 1000 == (0 if order == "<" else 1):
            break
    else:
        raise bad
    precision, full = (kind // 10) % 10, kind % 10
    if precision not in (0, 1) or full != 0 or imaginary != 0 or not 0 < name_length <= 256:
        raise bad
    if not (0 <= rows <= 64 and 0 <= cols <= 64):
        raise bad
    name_start = offset + 20
    data_start = name_start + int(name_length)
    dtype = np.dtype(f"{order}{'f8' if precision == 0 else 'f4'}")
    end = data_start + int(rows) * int(cols) * dtype.itemsize
    if end > len(raw):
        raise bad
    name_bytes = raw[name_start:data_start]
    if not name_bytes.endswith(b"\0"):
        raise bad
    try:
        name = name_bytes[:-1].decode("ascii")
    except UnicodeDecodeError:
        raise bad from None
    values = np.frombuffer(raw, dtype, int(rows) * int(cols), data_start).astype(float)
    if not np.all(np.isfinite(values)):
        raise InputError(f"{path}: the transform contains NaN or Inf")
    return name, tuple(values.tolist()), end


def _parse_xfm(text: str, path: Path) -> Part:
    """An MNI transform file holding one ``Linear`` transform, read as an ITK affine (ITK writes it in LPS)."""
    lines = [line.strip() for line in text.splitlines()]
    if not lines or lines[0] != "MNI Transform File":
        raise InputError(f"{path}: not an MNI transform file (the first line must be 'MNI Transform File')")
    body = " ".join(line for line in lines[1:] if line and not line.startswith("%"))
    statements = [s.strip() for s in body.split(";") if s.strip()]
    fields = {}
    for statement in statements:
        key, equals, value = statement.partition("=")
        if not equals or key.strip() in fields:
            raise InputError(f"{path}: unexpected {statement[:40]!r}")
        fields[key.strip()] = value.strip()
    if fields.get("Transform_Type") != "Linear" or set(fields) != {"Transform_Type", "Linear_Transform"}:
        raise InputError(f"{path}: only a single linear MNI transform is supported")
    values = parse_numbers(fields["Linear_Transform"], str(path))
    if len(values) != 12:
        raise InputError(f"{path}: Linear_Transform has {len(values)} values; expected 12 (3 rows of 4)")
    matrix = np.array(values).reshape(3, 4)
    return Part("AffineTransform_double_3_3", (*matrix[:, :3].ravel(), *matrix[:, 3]), (0.0, 0.0, 0.0))


# --- HDF5 (.h5), read by ITK in a child process --------------------------------------------------------------

_CHILD = """
import json, sys
import SimpleITK as sitk
t = sitk.ReadTransform(sys.argv[1])
composite = t.GetName() == "CompositeTransform"
parts = []
if composite:
    t = sitk.CompositeTransform(t)
    parts = [t.GetNthTransform(i) for i in range(t.GetNumberOfTransforms())]
else:
    parts = [t]
names = ["IdentityTransform" if p.GetTransformEnum() == sitk.sitkIdentity else p.GetName() for p in parts]
out = [[n, list(p.GetParameters()), list(p.GetFixedParameters())] for n, p in zip(names, parts)]
print(json.dumps({"composite": composite, "parts": out}))
"""


def _read_in_child(path: Path) -> tuple[bool, list[Part]]:
    """Let ITK read an HDF5 transform in another process; return what it read, unchecked."""
    _check_size(path)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path)],
            capture_output=True,
            timeout=CHILD_TIMEOUT_S,
            text=True,
            errors="replace",
        )
    except subprocess.TimeoutExpired:
        raise InputError(f"{path}: reading the HDF5 transform took over {CHILD_TIMEOUT_S} s") from None
    if done.returncode != 0:
        how = "crashed reading it" if done.returncode < 0 else "could not read it"
        raise InputError(f"{path}: not a readable ITK HDF5 transform file (ITK {how})")
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
        parts = [Part(f"{name}_double_3_3", tuple(p), tuple(f)) for name, p, f in result["parts"]]
    except (ValueError, KeyError, IndexError, TypeError):
        raise InputError(f"{path}: not a readable ITK HDF5 transform file") from None
    if not parts:
        raise InputError(f"{path}: holds no transform")
    if len(parts) > MAX_COMPOSITE_PARTS:
        raise InputError(f"{path}: more than {MAX_COMPOSITE_PARTS} transforms")
    return bool(result["composite"]), parts


# --- checking and building ---------------------------------------------------------------------------------


def build(part: Part, where: str) -> sitk.Transform:
    """A SimpleITK transform from a part whose type, dimension, counts and values have been checked."""
    match = _TYPE_NAME.match(part.type_name)
    if not match:
        raise InputError(f"{where}: {part.type_name[:60]!r} is not an ITK transform type name")
    base, _, dim_in, dim_out = match.groups()
    if (dim_in, dim_out) != ("3", "3"):
        raise InputError(f"{where}: {base} is {dim_in}D -> {dim_out}D; expected a 3D transform")
    kind = KINDS.get(base)
    if kind is None:
        if any(word in base for word in _DEFORMABLE):
            raise InputError(f"{where}: {base} is a deformable transform; a rigid transform is needed")
        raise InputError(f"{where}: unsupported transform type {base}; use a rigid or affine transform")
    if len(part.parameters) != kind.parameters:
        raise InputError(
            f"{where}: {base} takes {kind.parameters} parameters, the file has {len(part.parameters)}"
        )
    if len(part.fixed) not in kind.fixed:
        expected = " or ".join(map(str, kind.fixed))
        raise InputError(f"{where}: {base} takes {expected} fixed parameters, the file has {len(part.fixed)}")
    values = np.array(part.parameters + part.fixed, dtype=float)
    if not np.all(np.isfinite(values)):
        raise InputError(f"{where}: the transform contains NaN or Inf")
    fixed = part.fixed
    if base == "Euler3DTransform":
        if len(fixed) == 4 and fixed[3] not in (0.0, 1.0):
            raise InputError(f"{where}: Euler3DTransform's ComputeZYX flag must be 0 or 1, got {fixed[3]:g}")
        fixed = fixed[:3] + (fixed[3] if len(fixed) == 4 else 0.0,)
    if kind.versor and np.linalg.norm(part.parameters[:3]) > 1.0 + 1e-9:
        raise InputError(f"{where}: {base}'s versor (parameters 1-3) has a norm above 1")
    transform = kind.make()
    try:
        if fixed:
            transform.SetFixedParameters(fixed)
        if part.parameters:
            transform.SetParameters(part.parameters)
    except RuntimeError as exc:
        raise InputError(f"{where}: ITK refused the {base} values") from exc
    _check_rigid_part(transform, base, where)
    return transform


def _check_rigid_part(transform: sitk.Transform, base: str, where: str) -> None:
    """Refuse a part whose linear map is not a rotation (scale, shear, reflection), naming its type."""
    if base in ("IdentityTransform", "TranslationTransform"):
        return
    if base == "ScaleTransform":
        linear = np.diag(transform.GetParameters())
    else:
        linear = np.asarray(transform.GetMatrix(), dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(linear)):
        raise InputError(f"{where}: the {base} contains NaN or Inf")
    if not np.allclose(linear.T @ linear, np.eye(3), atol=_RIGID_TOL) or np.linalg.det(linear) <= 0:
        raise InputError(
            f"{where}: the {base} is not rigid (it scales, shears or mirrors); a rigid transform is needed"
        )
