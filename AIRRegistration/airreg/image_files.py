"""Checks on an image file made before ITK reads its voxels.

* Size: the header is read alone (``ImageFileReader.ReadImageInformation``) and an image declaring more voxels
  than :func:`max_voxels` is refused, so that a small file whose header claims 1500^3 voxels cannot make ITK
  allocate gigabytes. The limit is ``DEFAULT_MAX_VOXELS`` (2^28 voxels, 1 GiB as float32; a 512x512x200 MR
  has 2^25.6) and can be changed with the environment variable ``AIRREG_MAX_VOXELS``.
* Geometry: a spacing that is not positive and finite, an origin that is not finite or a singular direction
  matrix is refused (lying headers), and so is a NIfTI ``pixdim`` voxel size that is not positive (ITK would
  take 1 mm or the sform's scales instead, with a warning nobody sees).
* NIfTI data: ITK 5.4's NIfTI reader turns NaN and Inf voxels into 0, so the image it returns looks clean, and
  it fills a truncated data block (or gzip stream) with zeros without an error. So for a NIfTI-1 or NIfTI-2
  file (``.nii``, ``.nii.gz``) the data block is read with numpy, in chunks: it must be complete, and finite
  for a floating-point type. (Other formats keep NaN and Inf, and the check on the image ITK read sees them.)
* Range (after reading, :func:`check_range`): intensities spanning more than float32's largest number.
* What ITK and the libraries under it print on standard error while reading is collected (:func:`native_output`)
  and its last line added to the error message, so an error stays one line.

DICOM series folders are checked for geometry after reading (their slices are read one file at a time by ITK).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import SimpleITK as sitk

from .errors import InputError

DEFAULT_MAX_VOXELS = 2**28
#: Images are processed in float32: a wider intensity range overflows to Inf (e.g. an MR of only ±FLT_MAX).
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_VOXELS_ENV = "AIRREG_MAX_VOXELS"
#: NIfTI datatype codes of the floating-point types numpy can check, as little-endian dtypes.
_NIFTI_FLOAT_TYPES = {16: "<f4", 64: "<f8", 32: "<c8", 1792: "<c16"}
#: Bytes per voxel of every NIfTI datatype code with whole bytes (uint8 ... complex256, RGB, RGBA).
_NIFTI_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                1536: 16, 1792: 16, 2048: 32, 2304: 4}  # fmt: skip
_CHUNK_BYTES = 1 << 23


class _HeaderLie(Exception):
    """A NIfTI header field that cannot be true (its text says which)."""


def max_voxels() -> int:
    """The largest number of voxels (times components) an image may declare: ``$AIRREG_MAX_VOXELS`` or the default."""
    text = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"{MAX_VOXELS_ENV}={text[:30]!r} is not a whole number") from None
    if value < 1:
        raise InputError(f"{MAX_VOXELS_ENV}={value} must be at least 1")
    return value


def read(path: Path, what: str) -> sitk.Image:
    """Read an image file after :func:`check_before_reading`; what ITK prints while reading is kept off the
    terminal and its last line, if any, explains the error."""
    check_before_reading(path, what)
    error = None
    with native_output() as native:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            error = exc
    if error is not None:
        raise InputError(f"{path}: {what} is not a readable image file{explain(native)}") from error
    return image


def check_before_reading(path: Path, what: str) -> None:
    """Refuse an image file whose header declares too many voxels or an impossible geometry, or a NIfTI file
    whose data block holds NaN or Inf or is truncated."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    error = None
    with native_output() as native:
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            error = exc
    if error is not None:
        raise InputError(f"{path}: {what} is not a readable image file{explain(native)}") from error
    size = reader.GetSize()
    voxels = int(np.prod(size, dtype=object)) * reader.GetNumberOfComponents()
    limit = max_voxels()
    if voxels > limit:
        raise InputError(
            f"{path}: {what} declares {'x'.join(map(str, size))} voxels ({voxels:,} values), more than the "
            f"limit of {limit:,} (set {MAX_VOXELS_ENV} to raise it)"
        )
    check_geometry(reader, path, what)
    problem = nifti_problem(path) if path.name.lower().endswith((".nii", ".nii.gz")) else None
    if problem:
        raise InputError(f"{path}: {what} {problem}")


def check_geometry(image: sitk.Image | sitk.ImageFileReader, path: Path, what: str) -> None:
    """Refuse a header whose spacing is not positive and finite, whose origin is not finite, or whose direction
    matrix is not finite or is singular (such an image has no place in the world)."""
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    origin = np.asarray(image.GetOrigin(), dtype=float)
    n = len(spacing)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(n, n)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(
            f"{path}: {what} has an invalid voxel spacing {_numbers(spacing)}; it must be positive"
        )
    if not np.all(np.isfinite(origin)):
        raise InputError(f"{path}: {what} has an invalid origin {_numbers(origin)}")
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise InputError(
            f"{path}: {what} has an invalid direction matrix (not finite, or its axes are degenerate)"
        )


def _numbers(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


@contextlib.contextmanager
def native_output() -> Iterator[list[str]]:
    """Collect what native code (ITK, niftilib, GDCM, MetaIO) writes to standard error during the block into
    the yielded list, filled when the block ends, so that an error is one line and not a page of C++ output."""
    lines: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable file descriptor 2: leave the output alone
        yield lines
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read(1 << 16).decode("utf-8", "replace").splitlines())


def explain(native: list[str]) -> str:
    """`` (the last message of the native reader)``, or nothing when it printed none."""
    messages = [
        line.strip().removeprefix("** ERROR:").strip()
        for line in native
        if line.strip() and not re.match(r"\s*(WARNING|ERROR): In .*, line \d+", line)
    ]
    return f" ({messages[-1][:120]})" if messages else ""


def check_range(array: np.ndarray, path: Path, what: str) -> None:
    """Refuse voxel values that float32 cannot hold, or whose range float32 arithmetic cannot (the image is cast
    to float32 and the preprocessing runs in float32: either would turn into Inf)."""
    low, high = float(array.min()), float(array.max())
    if max(-low, high) > FLOAT32_MAX or high - low > FLOAT32_MAX:
        raise InputError(
            f"{path}: {what} has intensities from {low:.3g} to {high:.3g}, beyond what float32 can hold; "
            "rescale the image"
        )


def nifti_problem(path: Path) -> str | None:
    """What is wrong with the data block of a single-file NIfTI-1/2 image: NaN or Inf values (floating-point
    types), fewer values than the header declares, or damaged gzip data; None if nothing is.

    None too for two-file (``.hdr``/``.img``) headers and headers this parser does not understand: those are
    left to ITK, which refuses what it cannot read.
    """
    try:
        with _open(path) as stream:
            head = stream.read(540)
            layout = _nifti_layout(head)
            if layout is None:
                return None
            dtype, count, offset = layout
            if not _skip(stream, offset - len(head)):
                return f"is truncated (the file ends before its data block, which starts at byte {offset:,})"
            found = _count_finite(head[offset:], stream, dtype, count)
    except _HeaderLie as exc:
        return f"has an invalid voxel size in its NIfTI header ({exc}); each must be positive"
    except EOFError:  # gzip data that ends before its end marker: ITK would read zeros for the rest
        return "is truncated (its gzip data ends early)"
    except (zlib.error, gzip.BadGzipFile):
        return "is not a readable image file (damaged gzip data)"
    except OSError:
        return None  # unreadable: ITK's reader reports it
    if found is None:
        return "contains NaN or Inf voxels"
    if found < count:
        return f"is truncated (its data block holds {found:,} of the {count:,} values its header declares)"
    return None


def _open(path: Path) -> BinaryIO:
    with path.open("rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else path.open("rb")


def _nifti_layout(header: bytes) -> tuple[np.dtype, int, int] | None:
    """(dtype, number of values, data offset) of a single-file NIfTI header, or None. Types that cannot be
    NaN are counted as bytes (dtype ``u1``), since only their length is checked."""
    if len(header) < 348:
        return None
    for order in ("<", ">"):
        sizeof_hdr = int(np.frombuffer(header, f"{order}i4", 1, 0)[0])
        if sizeof_hdr == 348 and header[344:348] == b"n+1\0":
            dims = np.frombuffer(header, f"{order}i2", 8, 40).astype(np.int64)
            code = int(np.frombuffer(header, f"{order}i2", 1, 70)[0])
            pixdim = np.frombuffer(header, f"{order}f4", 8, 76).astype(float)
            offset = float(np.frombuffer(header, f"{order}f4", 1, 108)[0])
            break
        if sizeof_hdr == 540 and len(header) >= 540 and header[4:8] == b"n+2\0":
            dims = np.frombuffer(header, f"{order}i8", 8, 16)
            code = int(np.frombuffer(header, f"{order}i2", 1, 12)[0])
            pixdim = np.frombuffer(header, f"{order}f8", 8, 104)
            offset = float(np.frombuffer(header, f"{order}i8", 1, 168)[0])
            break
    else:
        return None
    if code not in _NIFTI_BYTES or not 1 <= dims[0] <= 7 or not np.isfinite(offset) or offset < 348:
        return None
    shape = dims[1 : dims[0] + 1]
    if np.any(shape < 1):
        return None
    sizes = pixdim[1 : min(dims[0], 3) + 1]
    if not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):  # ITK would guess 1 mm, or take the sform's
        raise _HeaderLie("pixdim " + ", ".join(f"{v:g}" for v in sizes))
    count = int(np.prod(shape, dtype=object))
    if code in _NIFTI_FLOAT_TYPES:
        return np.dtype(_NIFTI_FLOAT_TYPES[code]).newbyteorder(order), count, int(offset)
    return np.dtype("u1"), count * _NIFTI_BYTES[code], int(offset)


def _skip(stream: BinaryIO, n: int) -> bool:
    """Read past ``n`` bytes; False if the stream ends first."""
    while n > 0:
        chunk = stream.read(min(n, _CHUNK_BYTES))
        if not chunk:
            return False
        n -= len(chunk)
    return True


def _count_finite(first: bytes, stream: BinaryIO, dtype: np.dtype, count: int) -> int | None:
    """How many of the next ``count`` values of ``dtype`` (``first``, then ``stream``) exist, or None as soon as
    one is NaN or Inf."""
    per_chunk = max(_CHUNK_BYTES // dtype.itemsize, 1)
    found, pending = 0, first
    while found < count:
        need = min(count - found, per_chunk) * dtype.itemsize
        raw = pending[:need] + stream.read(max(need - len(pending), 0))
        pending = pending[need:]
        usable = len(raw) - len(raw) % dtype.itemsize
        if usable == 0:
            break
        if not np.all(np.isfinite(np.frombuffer(raw[:usable], dtype))):
            return None
        found += usable // dtype.itemsize
    return found
