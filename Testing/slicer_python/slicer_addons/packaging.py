"""Stand-in for Slicer 5.12's ``slicer.packaging`` (``Base/Python/slicer/packaging.py``), which slicer-core lacks.

The conftest appends this folder to ``slicer.__path__``: like the real submodule, it is importable as
``slicer.packaging`` but is not an attribute of ``slicer`` until imported (``slicer/__init__.py`` does not import
it). :func:`pip_ensure` follows Slicer's control flow (v5.12.0, ``pip_ensure``): requirements already satisfied
return at once; in testing mode nothing is installed; with ``prompt_install`` the user is asked through
``slicer.util.confirmOkCancelDisplay`` and a refusal raises ``RuntimeError("User declined package
installation")``; otherwise ``python -m pip install`` runs in this interpreter's environment. Not copied: the
progress dialog, ``skip_packages``, the restart prompt.

Where a Slicer installation would use its own pip configuration, this uses the repository's constraints.txt (it
pins torch to the CPU wheel on the machines' disk) unless ``constraints`` is given.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement

REPO_CONSTRAINTS = Path(__file__).resolve().parents[3] / "constraints.txt"

#: Every call, for the tests: ``(requirements, keyword arguments, what happened)``.
calls: list[tuple[list[str], dict, str]] = []


def pip_check(requirement: Requirement) -> bool:
    """Whether ``requirement`` is installed at an acceptable version (extras are not followed here)."""
    try:
        return version(requirement.name) in requirement.specifier
    except PackageNotFoundError:
        return False


def pip_ensure(
    requirements,
    constraints=None,
    skip_packages=None,
    prompt_install: bool = True,
    prompt_restart: bool = True,
    requester: str | None = None,
    skip_in_testing: bool = True,
    show_progress: bool = True,
):
    import slicer

    if skip_packages is not None:
        raise NotImplementedError("the stand-in pip_ensure does not support skip_packages")
    names = [requirements] if isinstance(requirements, str) else list(requirements)
    kwargs = {"prompt_install": prompt_install, "requester": requester, "skip_in_testing": skip_in_testing}
    missing = [str(r) for r in map(Requirement, names) if not pip_check(r)]
    if not missing:
        calls.append((names, kwargs, "satisfied"))
        return None
    if skip_in_testing and slicer.app.testingEnabled():
        logging.info(f"Testing mode is enabled: skipping pip_ensure for [{', '.join(missing)}]")
        calls.append((names, kwargs, "skipped in testing mode"))
        return None
    if prompt_install and not slicer.util.confirmOkCancelDisplay(
        f"{len(missing)} Python package(s) need to be installed.", f"{requester} - Install Python Packages"
    ):
        calls.append((names, kwargs, "declined"))
        raise RuntimeError("User declined package installation")
    calls.append((names, kwargs, "installed"))
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "-c",
        str(constraints or REPO_CONSTRAINTS),
        *missing,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        logging.error(done.stderr)
        raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)
    return None
