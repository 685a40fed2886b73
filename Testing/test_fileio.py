"""Atomic writing: results appear whole or not at all, with ordinary permissions."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from airreg.errors import InputError
from airreg.fileio import (
    atomic_path,
    check_distinct,
    check_name,
    check_writable,
    output_set,
    write_json,
    write_text,
    written_at_once,
)


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


def test_an_output_set_publishes_every_file_only_when_the_block_succeeds(tmp_path):
    with output_set():
        write_text(tmp_path / "transform.tfm", "t")
        write_text(tmp_path / "report.json", "{}")
        assert not (
            tmp_path / "transform.tfm"
        ).exists()  # nothing at a final path before the whole set is done
    assert (tmp_path / "transform.tfm").read_text() == "t" and (tmp_path / "report.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "transform.tfm"]


def test_a_failed_output_set_leaves_no_output_and_no_temporary_file(tmp_path):
    write_text(tmp_path / "report.json", "old")
    with pytest.raises(InputError, match=r"report\.json: cannot be written \(disk full\)"), output_set():
        write_text(tmp_path / "transform.tfm", "t")
        with atomic_path(tmp_path / "report.json") as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert (tmp_path / "report.json").read_text() == "old"


def test_files_written_at_once_in_a_failed_set_are_removed_unless_they_are_working_files(tmp_path):
    with pytest.raises(RuntimeError), output_set():
        with written_at_once(remove_on_failure=True):
            write_text(tmp_path / "case" / "mr.txt", "read back by the run")
            assert (tmp_path / "case" / "mr.txt").exists()
        with written_at_once(remove_on_failure=False):
            write_text(tmp_path / "cache" / "ids.json", "[]")
        raise RuntimeError("the run failed")
    assert not (tmp_path / "case" / "mr.txt").exists()
    assert (tmp_path / "cache" / "ids.json").read_text() == "[]"


def test_temporary_files_of_dead_processes_are_removed_by_the_next_write_into_the_folder(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".t~airreg-{int(dead.stdout)}-abcdefgh.tfm"
    live = tmp_path / f".r~airreg-{os.getpid()}-abcdefgh.json"
    other = tmp_path / ".not-ours-12345.tfm"
    for path in (stale, live, other):
        path.write_text("x")
    write_text(tmp_path / "out.txt", "new")
    assert not stale.exists()
    assert live.exists() and other.exists()


def test_file_names_that_are_not_utf8_are_refused():
    with pytest.raises(InputError, match=r"x\\xff\.nii: MR image name is not valid UTF-8"):
        check_name("x\udcff.nii", "MR image")
    assert check_name("mü.nii") == Path("mü.nii")


def test_an_output_that_is_an_input_or_another_output_is_refused(tmp_path):
    source = tmp_path / "mr.nii"
    source.write_text("x")
    os.link(source, tmp_path / "hard.nii")
    (tmp_path / "data").mkdir()
    with pytest.raises(InputError, match="--report would overwrite the input --mr"):
        check_distinct({"--mr": source}, {"--report": tmp_path / "sub" / ".." / "mr.nii"})
    with pytest.raises(InputError, match="would overwrite the input --mr"):
        check_distinct({"--mr": source}, {"--report": tmp_path / "hard.nii"})
    with pytest.raises(InputError, match="--b and --a are the same file"):
        check_distinct({}, {"--a": tmp_path / "o.tfm", "--b": tmp_path / "o.tfm"})
    with pytest.raises(InputError, match="inside the input folder --data"):
        check_distinct({"--data": tmp_path / "data"}, {"--out": tmp_path / "data" / "summary.json"})
    check_distinct({"--mr": source, "--data": tmp_path / "data"}, {"--a": tmp_path / "a", "--b": None})


def test_json_with_nan_is_refused_or_written_as_null(tmp_path):
    with pytest.raises(InputError, match="report.json: refused to write NaN or Inf"):
        write_json(tmp_path / "report.json", {"d_score": float("nan")})
    assert not (tmp_path / "report.json").exists()
    write_json(
        tmp_path / "summary.json", {"rho": float("nan"), "tre": [1.0, float("inf")]}, undefined_as_null=True
    )
    assert json.loads((tmp_path / "summary.json").read_text()) == {"rho": None, "tre": [1.0, None]}
