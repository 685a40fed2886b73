"""Atomic file writing: results appear complete or not at all (write to a temporary file, then rename)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import InputError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    The temporary name keeps the target's suffixes (``.nii.gz``, ``.h5`` ...) because writers such as
    SimpleITK choose the file format from them.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name.split('.')[0]}-", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the result ordinary permissions
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(target: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``target`` atomically."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    return atomic_write(target, lambda p: p.write_text(text, encoding="utf-8"))


def check_writable(target: str | os.PathLike) -> Path:
    """Fail early, before any work or output, when ``target`` cannot be written as a file."""
    path = Path(target)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; expected a file name for the output")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{path}: cannot be written because {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise InputError(f"{path}: folder {parent} is not writable")
            break
    return path
