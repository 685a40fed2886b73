"""Checks on an image file made before ITK reads its voxels.

* Size: the header is read alone (``ImageFileReader.ReadImageInformation``) and an image declaring more voxels
  than :func:`max_voxels` is refused, so that a small file whose header claims 1500^3 voxels cannot make ITK
  allocate gigabytes. The limit is ``DEFAULT_MAX_VOXELS`` (2^28 voxels, 1 GiB as float32; a 512x512x200 MR
  has 2^25.6) and can be changed with the environment variable ``AIRREG_MAX_VOXELS``.
* Range (after reading): intensities spanning more than float32's largest number are refused.
* NaN and Inf in NIfTI: ITK 5.4's NIfTI reader turns NaN and Inf voxels into 0, so the image it returns looks
  clean. For a NIfTI-1 or NIfTI-2 file (``.nii``, ``.nii.gz``) of a floating-point type, the data block is
  read with numpy, in chunks, and must be finite. (Other formats keep NaN and Inf, and the check on the image
  read by ITK sees them.)

DICOM series folders are not checked here (their slices are read one file at a time by ITK).
"""

from __future__ import annotations

import gzip
import os
import zlib
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
_CHUNK_BYTES = 1 << 23


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


def check_before_reading(path: Path, what: str) -> None:
    """Refuse an image file whose header declares too many voxels, or a NIfTI file holding NaN or Inf."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path}: {what} is not a readable image file") from exc
    size = reader.GetSize()
    voxels = int(np.prod(size, dtype=object)) * reader.GetNumberOfComponents()
    limit = max_voxels()
    if voxels > limit:
        raise InputError(
            f"{path}: {what} declares {'x'.join(map(str, size))} voxels ({voxels:,} values), more than the "
            f"limit of {limit:,} (set {MAX_VOXELS_ENV} to raise it)"
        )
    problem = nifti_problem(path) if path.name.lower().endswith((".nii", ".nii.gz")) else None
    if problem:
        raise InputError(f"{path}: {what} {problem}")


def check_range(array: np.ndarray, path: Path, what: str) -> None:
    """Refuse voxel values whose range float32 arithmetic cannot hold (the preprocessing runs in float32)."""
    low, high = float(array.min()), float(array.max())
    if high - low > FLOAT32_MAX:
        raise InputError(
            f"{path}: {what} has intensities from {low:.3g} to {high:.3g}, a range wider than float32 can "
            "hold; rescale the image"
        )


def nifti_problem(path: Path) -> str | None:
    """What is wrong with the data block of a single-file NIfTI-1/2 image of a floating-point type: NaN or Inf
    values, or fewer values than the header declares; None if nothing is.

    None too for other data types, two-file (``.hdr``/``.img``) headers, headers this parser does not
    understand and damaged compression: those are left to ITK, which refuses what it cannot read.
    """
    try:
        with _open(path) as stream:
            head = stream.read(540)
            layout = _nifti_layout(head)
            if layout is None:
                return None
            dtype, count, offset = layout
            _skip(stream, offset - len(head))
            found = _count_finite(head[offset:], stream, dtype, count)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile):
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
    """(dtype, number of values, data offset) of a single-file NIfTI header, or None."""
    if len(header) < 348:
        return None
    for order in ("<", ">"):
        sizeof_hdr = int(np.frombuffer(header, f"{order}i4", 1, 0)[0])
        if sizeof_hdr == 348 and header[344:348] == b"n+1\0":
            dims = np.frombuffer(header, f"{order}i2", 8, 40).astype(np.int64)
            code = int(np.frombuffer(header, f"{order}i2", 1, 70)[0])
            offset = float(np.frombuffer(header, f"{order}f4", 1, 108)[0])
            break
        if sizeof_hdr == 540 and len(header) >= 540 and header[4:8] == b"n+2\0":
            dims = np.frombuffer(header, f"{order}i8", 8, 16)
            code = int(np.frombuffer(header, f"{order}i2", 1, 12)[0])
            offset = float(np.frombuffer(header, f"{order}i8", 1, 168)[0])
            break
    else:
        return None
    if code not in _NIFTI_FLOAT_TYPES or not 1 <= dims[0] <= 7 or not np.isfinite(offset):
        return None
    shape = dims[1 : dims[0] + 1]
    if np.any(shape < 1) or offset < 348:
        return None
    count = int(np.prod(shape, dtype=object))
    return np.dtype(_NIFTI_FLOAT_TYPES[code]).newbyteorder(order), count, int(offset)


def _skip(stream: BinaryIO, n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, _CHUNK_BYTES))
        if not chunk:
            raise EOFError
        n -= len(chunk)


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
