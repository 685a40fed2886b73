"""Atomic writing: results appear whole or not at all, with ordinary permissions."""

import os
import stat

import pytest

from airreg.errors import InputError
from airreg.fileio import atomic_path, check_writable, write_text


def test_write_text_creates_the_file_with_umask_permissions(tmp_path):
    path = write_text(tmp_path / "sub" / "a.txt", "hello")
    assert path.read_text() == "hello"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_failed_write_leaves_neither_target_nor_temporary(tmp_path):
    target = tmp_path / "b.nii.gz"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz")  # writers pick the format from the suffix
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = write_text(tmp_path / "c.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("new")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old"


def test_check_writable_rejects_a_folder_and_a_file_in_the_way(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a folder"):
        check_writable(tmp_path / "folder")
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "report.json")
    assert check_writable(tmp_path / "new" / "report.json") == tmp_path / "new" / "report.json"
