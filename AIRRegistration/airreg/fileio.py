"""Safe file writing: results appear complete or not at all, and a run's outputs appear as a set.

Every file is written to a hidden temporary file beside its target (``.<stem>~airreg-<pid>-<token><suffixes>``)
and renamed onto the target when it is complete. Inside :func:`output_set`, the renames wait until the whole run
has succeeded, so a failed or interrupted run leaves none of its outputs (no transform without its report).
Temporary files that a killed run left behind are removed by the next run that writes into the same folder.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from .errors import InputError

_UMASK = os.umask(0)
os.umask(_UMASK)

#: Our temporary files: hidden, with the writing process's id, so stale ones can be told from live ones.
_TEMP_NAME = re.compile(r"^\..*~airreg-(?P<pid>\d+)-[0-9a-z]{8}(\..*)?$")
_cleaned_folders: set[Path] = set()


# --- file names ---------------------------------------------------------------------------------------


def printable(path: str | os.PathLike) -> str:
    """A path for messages: bytes that are not UTF-8 shown as ``\\xNN`` (they cannot be printed as text)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_name(path: str | os.PathLike, what: str = "file") -> Path:
    """Refuse a path that cannot be handed to SimpleITK/ITK as UTF-8 text (it aborts the process on one).

    Such a name holds bytes that are not UTF-8, or non-ASCII characters that Python could not decode because
    the locale is not UTF-8 (``LC_ALL=C`` with ``PYTHONUTF8=0``).
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"{printable(text)}: {what} name is not valid UTF-8 text in this locale; rename it "
            "(or run under a UTF-8 locale such as C.UTF-8)"
        ) from None
    return Path(text)


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name the same file or folder (resolved paths, or the same inode for hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def _inside(path: Path, folder: Path) -> bool:
    return folder.is_dir() and path.resolve().is_relative_to(folder.resolve())


def check_distinct(inputs: Mapping[str, Path | None], outputs: Mapping[str, Path | None]) -> None:
    """Refuse, before anything runs, an output that is an input or another output, or lies in an input folder.

    Keys are what the user called each path (``--mr``, ``--out``/summary.json ...), for the message.
    """
    given_in = {k: Path(v) for k, v in inputs.items() if v is not None}
    given_out = {k: Path(v) for k, v in outputs.items() if v is not None}
    for name, path in {**given_in, **given_out}.items():
        check_name(path, name)
    seen: dict[str, Path] = {}
    for out_name, out in given_out.items():
        for in_name, source in given_in.items():
            if _same(out, source):
                raise InputError(f"{printable(out)}: {out_name} would overwrite the input {in_name}")
            if source.is_dir() and _inside(out, source):
                raise InputError(f"{printable(out)}: {out_name} lies inside the input folder {in_name}")
        for other_name, other in seen.items():
            if _same(out, other):
                raise InputError(f"{printable(out)}: {out_name} and {other_name} are the same file")
        seen[out_name] = out


# --- temporary files ----------------------------------------------------------------------------------


def _temp_name(target: Path) -> Path:
    suffix = "".join(target.suffixes) or ".tmp"
    token = "".join(secrets.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(8))
    return target.with_name(f".{target.name.split('.')[0]}~airreg-{os.getpid()}-{token}{suffix}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove our temporary files in ``folder`` whose writing process is gone (killed runs); returns them."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = _TEMP_NAME.match(entry.name)
            if match and entry.is_file(follow_symlinks=False) and not _process_alive(int(match["pid"])):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _prepare_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key not in _cleaned_folders:
        _cleaned_folders.add(key)
        clean_stale_temps(folder)


# --- output sets --------------------------------------------------------------------------------------


class OutputSet:
    """The outputs of one run: complete temporary files waiting to be renamed onto their targets together."""

    def __init__(self) -> None:
        self.pending: dict[Path, Path] = {}  # target -> complete temporary file
        self.written: list[Path] = []  # targets this run has already published (removed on failure)
        self.at_once = False  # inside written_at_once: publish each file as soon as it is complete

    def add(self, tmp: Path, target: Path) -> None:
        old = self.pending.pop(target, None)
        if old is not None:  # written twice in one run: the last version wins
            old.unlink(missing_ok=True)
        self.pending[target] = tmp

    def publish(self) -> None:
        """Rename every pending file onto its target; if one rename fails, remove what this run wrote."""
        try:
            while self.pending:
                target, tmp = next(iter(self.pending.items()))
                os.replace(tmp, target)
                del self.pending[target]
                self.written.append(target)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Remove the pending temporary files and the outputs this run already published."""
        for path in [*self.pending.values(), *self.written]:
            with contextlib.suppress(OSError):
                path.unlink()
        self.pending.clear()
        self.written.clear()


_ACTIVE: contextvars.ContextVar[OutputSet | None] = contextvars.ContextVar("airreg_output_set", default=None)


@contextlib.contextmanager
def output_set() -> Iterator[OutputSet]:
    """Collect every file written by :func:`atomic_path` in the block; publish them all only if it succeeds."""
    outputs = OutputSet()
    token = _ACTIVE.set(outputs)
    try:
        yield outputs
    except BaseException:
        outputs.discard()
        raise
    finally:
        _ACTIVE.reset(token)
    outputs.publish()


@contextlib.contextmanager
def written_at_once(remove_on_failure: bool) -> Iterator[None]:
    """Inside an output set, write files at once: working files the run reads back (a phantom case, caches).

    With ``remove_on_failure`` they still count as the run's outputs and are removed if the run fails.
    """
    outputs = _ACTIVE.get()
    token = _ACTIVE.set(outputs if remove_on_failure else None)
    at_once = outputs is not None and outputs.at_once
    if outputs is not None and remove_on_failure:
        outputs.at_once = True
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        if outputs is not None:
            outputs.at_once = at_once


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    The temporary name keeps the target's suffixes (``.nii.gz``, ``.h5`` ...) because writers such as
    SimpleITK choose the file format from them. Inside :func:`output_set` the rename waits for the whole set.
    """
    target = check_name(target, "output")
    _prepare_folder(target.parent)
    tmp_path = _temp_name(target)
    handed_over = False
    # the name is known before the file exists, so a signal at any point leaves no temporary file behind
    try:
        try:
            os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_UMASK)  # give the result ordinary permissions
        except OSError as exc:  # disk full, file size limit, permissions: name the output, not the temporary
            raise InputError(f"{printable(target)}: cannot be written ({exc.strerror or exc})") from exc
        outputs = _ACTIVE.get()
        if outputs is None or outputs.at_once:
            os.replace(tmp_path, target)
            if outputs is not None:
                outputs.written.append(target)
        else:
            outputs.add(tmp_path, target)
        handed_over = True
    finally:
        if not handed_over:
            tmp_path.unlink(missing_ok=True)


def atomic_write(target: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``target`` atomically."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    return atomic_write(target, lambda p: p.write_text(text, encoding="utf-8"))


def _nan_to_null(value):
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_null(v) for v in value]
    return value


def write_json(target: str | os.PathLike, value, undefined_as_null: bool = False, **options) -> Path:
    """Write strict JSON atomically: NaN and Inf are refused (they are not JSON), or written as null when
    ``undefined_as_null`` (summary statistics that are undefined, e.g. a correlation of constant values)."""
    if undefined_as_null:
        value = _nan_to_null(value)
    try:
        text = json.dumps(value, allow_nan=False, indent=2, **options)
    except ValueError as exc:
        raise InputError(
            f"{printable(target)}: refused to write NaN or Inf into a JSON file ({exc})"
        ) from None
    return write_text(target, text)


def check_writable(target: str | os.PathLike) -> Path:
    """Fail early, before any work or output, when ``target`` cannot be written as a file."""
    path = check_name(target, "output")
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
