"""Helpers of the AIRRegistration Slicer module.

``mrml_bridge`` is the Qt-free layer between MRML nodes and the ``airreg`` core: it imports ``slicer`` MRML
classes, ``vtk``, numpy and SimpleITK only, so plain pytest can exercise it with the ``slicer-core`` package.
"""
