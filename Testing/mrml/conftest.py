"""Fixtures shared by the module's logic tests: the real AIRRegistration module, imported with the stand-ins for
what only the Slicer application provides, and its scene."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def air_module() -> Iterator[ModuleType]:
    """The real AIRRegistration module, imported with the application stand-ins (undone afterwards)."""
    from slicer_app_standins import slicer_application  # needs slicer-core: the test modules skip without it

    with slicer_application() as imported:
        yield imported


@pytest.fixture
def scene(air_module: ModuleType):
    """``slicer.mrmlScene``, cleared as Slicer's test ``setUp`` does (singletons are kept). Tests of the bridge
    alone define their own ``scene``: a fresh ``vtkMRMLScene``."""
    slicer = air_module.slicer
    slicer.mrmlScene.Clear()
    return slicer.mrmlScene
