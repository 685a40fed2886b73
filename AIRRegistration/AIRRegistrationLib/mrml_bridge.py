"""Qt-free bridge between MRML nodes and the ``airreg`` core.

Everything here works on real MRML nodes without the Slicer application (pytest + the ``slicer-core`` package):
it uses only node methods, ``vtk``, numpy and SimpleITK, and never imports qt, ctk or ``slicer.app``.

Conventions (see ``airreg.geometry``, the only place where conventions are converted):

* SimpleITK images are in LPS millimetres; Slicer's world is RAS.
* MR is the fixed volume, TRUS the moving one. ``mr_to_trus_lps`` is the 4x4 *resampling* matrix that maps an
  MR point to the same anatomical point in TRUS space (what ITK transform files store).
* The output transform node holds Slicer's *modeling* matrix ("transform to parent", RAS) of the TRUS volume:
  ``geometry.lps_resampling_to_ras_modeling(mr_to_trus_lps)``.
* The TRUS image handed to the core is in its *local* frame (without its parent transform); the parent transform
  it is under (or a node the user picks) is the initial alignment. The MR image is in world coordinates (its
  own linear parent transform composed in).

No function here modifies an input volume node's voxels, geometry or parent transform unless its name says so
(``set_registration_result(..., apply_to_moving=True)``, ``show_alignment``, ``setup_fusion_display`` which
changes display settings only).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

from airreg import data, geometry
from airreg.errors import InputError
from airreg.fileio import write_text

#: Colour map for the TRUS foreground in the fusion view (falls back to the next ones if not in the scene).
FUSION_COLOR_NODE_IDS = (
    "vtkMRMLPETProceduralColorNodePET-Heat",
    "vtkMRMLColorTableNodeIron",
    "vtkMRMLColorTableNodeRainbow",
)

#: Attribute on the output transform node naming the transform the TRUS was under before registration.
PREVIOUS_PARENT_ATTRIBUTE = "AIRRegistration.PreviousParentTransformID"

#: Attribute Slicer's DICOM scalar-volume loader sets on a volume node: the SOP instance UIDs of its files.
DICOM_INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"

#: Looks up the PatientID of a DICOM instance UID (in Slicer: ``slicer.dicomDatabase.instanceValue``).
PatientLookup = Callable[[str], str]

#: Subject-hierarchy level of a patient item, and the attribute in which Slicer's DICOM import stores the
#: patient's PatientID on that item (``vtkMRMLSubjectHierarchyConstants``).
PATIENT_LEVEL = "Patient"
PATIENT_ID_ITEM_ATTRIBUTE = "DICOM.PatientID"

_ORTHONORMAL_TOL = 1e-4


# --- matrices ----------------------------------------------------------------------------------------


def array_from_vtk_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """4x4 numpy copy of a vtkMatrix4x4."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def vtk_matrix_from_array(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """New vtkMatrix4x4 holding a 4x4 array."""
    a = np.asarray(array, dtype=float)
    if a.shape != (4, 4):
        raise InputError(f"expected a 4x4 matrix, got shape {a.shape}")
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def _node_label(node, role: str) -> str:
    name = node.GetName() if node is not None else None
    return f"{role} volume '{name}'" if name else f"{role} volume"


def parent_to_world_ras(node, role: str = "node") -> np.ndarray:
    """4x4 RAS matrix mapping the node's local coordinates to world (its parent transform chain composed).

    Identity when the node is not under a transform. Raises InputError (a ValueError) for a non-linear chain.
    """
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    return transform_to_world_ras(parent, role)


def transform_to_world_ras(transform_node, role: str = "transform") -> np.ndarray:
    """4x4 RAS "to world" matrix of a transform node (its own parents composed in); linear transforms only."""
    if not transform_node.IsTransformToWorldLinear():
        raise InputError(
            f"{role}: transform '{transform_node.GetName()}' (or one of its parents) is not linear; "
            "harden or remove the non-linear transform first"
        )
    m = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(m)
    return array_from_vtk_matrix(m)


# --- volume node  <->  SimpleITK image -----------------------------------------------------------------


def check_volume_node(node, role: str = "volume") -> None:
    """Raise InputError (a ValueError) with a clear message if the node cannot be registered as a 3D volume."""
    label = _node_label(node, role)
    if node is None:
        raise InputError(f"Select the {role} volume")
    if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetAttribute("LabelMap") == "1":
        raise InputError(f"{label} is a label map (segmentation); select an intensity volume")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"{label} is not a scalar volume")
    image_data = node.GetImageData()
    if (
        image_data is None
        or image_data.GetNumberOfPoints() == 0
        or image_data.GetPointData().GetScalars() is None
    ):
        raise InputError(f"{label} is empty (no voxels)")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"{label} has {image_data.GetNumberOfScalarComponents()} components per voxel; "
            "a single-component (grey-level) volume is needed"
        )
    dims = image_data.GetDimensions()
    if min(dims) < 2:
        raise InputError(f"{label} is not 3D (size {dims[0]} x {dims[1]} x {dims[2]} voxels)")


def image_from_volume_node(node, include_parent: bool = True, role: str = "volume") -> sitk.Image:
    """A copy of the volume as a SimpleITK image in LPS with its full geometry.

    Origin, spacing and direction come from ``GetIJKToRASMatrix``; with ``include_parent`` the node's linear
    parent transform chain is composed in (the image is where Slicer shows it). Voxel type is kept.
    Raises InputError (a ValueError) for label maps, multi-component, 2D or empty volumes, a non-linear parent
    transform, or a parent transform with shear. The node is never modified.
    """
    check_volume_node(node, role)
    ijk_to_ras_vtk = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras_vtk)
    ijk_to_ras = array_from_vtk_matrix(ijk_to_ras_vtk)
    if include_parent:
        ijk_to_ras = parent_to_world_ras(node, _node_label(node, role)) @ ijk_to_ras
    ijk_to_lps = geometry.RAS_TO_LPS @ ijk_to_ras

    columns = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(columns)):
        raise InputError(f"{_node_label(node, role)} has a degenerate voxel spacing")
    direction = columns / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=_ORTHONORMAL_TOL):
        raise InputError(
            f"{_node_label(node, role)}: its parent transform shears the volume; harden it or use a rigid transform"
        )

    image_data = node.GetImageData()
    dims = image_data.GetDimensions()  # (I, J, K)
    voxels = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    voxels = np.array(voxels, copy=True).reshape(dims[2], dims[1], dims[0])  # (K, J, I)
    image = sitk.GetImageFromArray(voxels)  # sitk size (I, J, K)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    image.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    return image


def update_volume_node_from_image(node, image: sitk.Image) -> None:
    """Fill a scalar volume node with a 3D SimpleITK image (LPS), setting voxels and IJKToRAS geometry."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("expected a 3D single-component image")
    voxels = sitk.GetArrayFromImage(image)  # (K, J, I)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(image.GetSize())
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(voxels).ravel(), deep=True)
    image_data.GetPointData().SetScalars(scalars)

    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    ijk_to_lps = geometry.homogeneous(direction * np.asarray(image.GetSpacing()), image.GetOrigin())
    ijk_to_ras = geometry.RAS_TO_LPS @ ijk_to_lps
    node.SetIJKToRASMatrix(vtk_matrix_from_array(ijk_to_ras))
    node.SetAndObserveImageData(image_data)


def add_volume_node_from_image(scene, image: sitk.Image, name: str):
    """New vtkMRMLScalarVolumeNode in ``scene`` holding ``image``, with default display nodes."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    update_volume_node_from_image(node, image)
    node.CreateDefaultDisplayNodes()
    return node


# --- inputs --------------------------------------------------------------------------------------------


def validate_inputs(mr_node, trus_node) -> str | None:
    """Why registration cannot run with these nodes (text for the disabled button), or None when it can."""
    if mr_node is None or trus_node is None:
        return "Select MR and TRUS volumes"
    if mr_node is trus_node or mr_node.GetID() == trus_node.GetID():
        return "MR and TRUS must differ"
    for node, role in ((mr_node, "MR"), (trus_node, "TRUS")):
        try:
            check_volume_node(node, role)
        except InputError as exc:
            return str(exc)
    return None


def initial_transform_lps(trus_node, initial_transform_node=None) -> np.ndarray | None:
    """MR->TRUS LPS resampling matrix of the current (or chosen) placement of the TRUS volume.

    ``initial_transform_node`` (if given) is taken as the TRUS volume's "to world" transform; otherwise the
    transform the TRUS volume is under. None when there is neither. Non-linear chains raise InputError.
    """
    if initial_transform_node is not None:
        to_world = transform_to_world_ras(initial_transform_node, "initial transform")
    elif trus_node.GetParentTransformNode() is not None:
        to_world = parent_to_world_ras(trus_node, _node_label(trus_node, "TRUS"))
    else:
        return None
    return geometry.ras_modeling_to_lps_resampling(to_world)


def mr_to_trus_from_transform_node(transform_node) -> np.ndarray:
    """MR->TRUS LPS resampling matrix held by a registration transform node (its "to world", parents included)."""
    return geometry.ras_modeling_to_lps_resampling(transform_to_world_ras(transform_node, "output transform"))


# --- results -------------------------------------------------------------------------------------------


def set_registration_result(
    transform_node, mr_to_trus_lps: np.ndarray, mr_node, trus_node, apply_to_moving: bool = True
) -> np.ndarray:
    """Write a registration result into a linear transform node; return the RAS matrix written.

    The node gets the RAS modeling ("to parent") matrix so that, with the TRUS volume under it, TRUS is shown
    aligned with MR in world coordinates (if the transform node itself has a parent, that parent is undone).
    Fixed (MR) and moving (TRUS) node references are set with the standard roles. With ``apply_to_moving``
    the TRUS volume is put under the node; the transform it was under before is remembered for
    :func:`show_alignment`.
    """
    mr_to_trus = geometry.check_rigid(mr_to_trus_lps, "registration result")
    to_world = geometry.lps_resampling_to_ras_modeling(mr_to_trus)
    parent = transform_node.GetParentTransformNode()
    to_parent = to_world if parent is None else np.linalg.inv(transform_to_world_ras(parent)) @ to_world

    transform_node.SetMatrixTransformToParent(vtk_matrix_from_array(to_parent))
    transform_node.SetNodeReferenceID(transform_node.GetFixedNodeReferenceRole(), mr_node.GetID())
    transform_node.SetNodeReferenceID(transform_node.GetMovingNodeReferenceRole(), trus_node.GetID())
    if apply_to_moving:
        previous = trus_node.GetTransformNodeID()
        if previous != transform_node.GetID():
            transform_node.SetAttribute(PREVIOUS_PARENT_ATTRIBUTE, previous or "")
        trus_node.SetAndObserveTransformNodeID(transform_node.GetID())
    return to_parent


def subject_hierarchy_patient(node) -> str | None:
    """The patient a volume is filed under in Slicer's subject hierarchy (the Data module): the patient item's
    DICOM PatientID, else the item's name; None when the volume is under no patient item."""
    scene = node.GetScene()  # looked up, not created: reading who a volume belongs to changes no scene
    hierarchy = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode") if scene is not None else None
    if hierarchy is None:
        return None
    invalid = hierarchy.GetInvalidItemID()
    item = hierarchy.GetItemByDataNode(node)
    patient = invalid if item == invalid else hierarchy.GetItemAncestorAtLevel(item, PATIENT_LEVEL)
    if patient == invalid:
        return None
    identifier = hierarchy.GetItemAttribute(patient, PATIENT_ID_ITEM_ATTRIBUTE)
    return (identifier or hierarchy.GetItemName(patient)).strip() or None


def patient_id_of_node(node, lookup: PatientLookup | None) -> str | None:
    """Who a volume belongs to: the PatientID of its DICOM files (its first instance UID, looked up with
    ``lookup``), else the patient it is filed under in the subject hierarchy; None when neither is known."""
    uids = (node.GetAttribute(DICOM_INSTANCE_UIDS_ATTRIBUTE) or "").split()
    if lookup is not None and uids:
        identifier = (lookup(uids[0]) or "").strip()
        if identifier:
            return identifier
    return subject_hierarchy_patient(node)


def images_from_volume_nodes(
    mr_node, trus_node, patient_lookup: PatientLookup | None = None
) -> tuple[sitk.Image, sitk.Image]:
    """The validated (MR in world, TRUS in its local frame) image pair the core registers, each carrying its
    patient when known (:func:`patient_id_of_node`), so that the core can warn on two different patients."""
    reason = validate_inputs(mr_node, trus_node)
    if reason:
        raise InputError(reason)
    mr = image_from_volume_node(mr_node, include_parent=True, role="MR")
    trus = image_from_volume_node(trus_node, include_parent=False, role="TRUS")
    for node, image in ((mr_node, mr), (trus_node, trus)):
        identifier = patient_id_of_node(node, patient_lookup)
        if identifier is not None:
            data.set_patient_id(image, identifier)
    return mr, trus


def register_volume_nodes(
    registrar,
    mr_node,
    trus_node,
    output_transform_node=None,
    initial_transform_node=None,
    progress=None,
    patient_lookup: PatientLookup | None = None,
):
    """Register TRUS (moving) to MR (fixed) with an ``airreg`` Registrar; return ``(result, transform_node)``.

    Validates and converts the nodes (:func:`images_from_volume_nodes`), runs ``registrar.register(mr, trus,
    initial, progress)`` and only then writes the result (see :func:`set_registration_result`); a new linear
    transform node is added to the MR node's scene if ``output_transform_node`` is None. On any error no node
    has been changed.
    """
    mr, trus = images_from_volume_nodes(mr_node, trus_node, patient_lookup)
    initial = initial_transform_lps(trus_node, initial_transform_node)
    result = registrar.register(mr, trus, initial=initial, progress=progress)
    geometry.check_rigid(result.mr_to_trus, "registration result")
    if output_transform_node is None:
        scene = mr_node.GetScene()
        output_transform_node = scene.AddNewNodeByClass(
            "vtkMRMLLinearTransformNode", scene.GenerateUniqueName("AIR MR-TRUS transform")
        )
    set_registration_result(output_transform_node, result.mr_to_trus, mr_node, trus_node)
    return result, output_transform_node


def score_volume_nodes(registrar, mr_node, trus_node, patient_lookup: PatientLookup | None = None):
    """Quality verdict (``registrar.score``) of the alignment as Slicer shows it now; changes no node."""
    mr, trus = images_from_volume_nodes(mr_node, trus_node, patient_lookup)
    current = initial_transform_lps(trus_node)
    return registrar.score(mr, trus, np.eye(4) if current is None else current)


def show_alignment(trus_node, transform_node, after: bool) -> None:
    """Before/after toggle: put TRUS under the registration result (after) or back where it was (before)."""
    if after:
        trus_node.SetAndObserveTransformNodeID(transform_node.GetID())
    else:
        previous = transform_node.GetAttribute(PREVIOUS_PARENT_ATTRIBUTE) or None
        trus_node.SetAndObserveTransformNodeID(previous)


def setup_fusion_display(
    scene, mr_node, trus_node, opacity: float = 0.5, color_node_id: str | None = None
) -> int:
    """MR as background and TRUS as a colour-mapped foreground at ``opacity`` in every slice view.

    Works on the scene's vtkMRMLSliceCompositeNodes (MRML only); returns how many were set. The TRUS display
    node gets a colour map (the first of ``FUSION_COLOR_NODE_IDS`` present in the scene unless one is given).
    """
    if not 0.0 <= opacity <= 1.0:
        raise InputError(f"opacity must be within [0, 1], got {opacity}")
    if trus_node.GetDisplayNode() is None:
        trus_node.CreateDefaultDisplayNodes()
    display = trus_node.GetDisplayNode()
    candidates = (color_node_id,) if color_node_id else FUSION_COLOR_NODE_IDS
    for node_id in candidates:
        if display is not None and scene.GetNodeByID(node_id) is not None:
            display.SetAndObserveColorNodeID(node_id)
            break

    count = 0
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(mr_node.GetID())
        composite.SetForegroundVolumeID(trus_node.GetID())
        composite.SetForegroundOpacity(float(opacity))
        count += 1
    return count


# --- export --------------------------------------------------------------------------------------------


def _check_target(path: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose it explicitly to replace it")
    return path


def export_transform(path: str | os.PathLike, mr_to_trus_lps: np.ndarray, overwrite: bool = False) -> Path:
    """ITK transform file (.h5, .tfm, .txt, .mat) of the MR->TRUS LPS resampling matrix (biopsy planning)."""
    return geometry.write_transform(_check_target(path, overwrite), mr_to_trus_lps)


def export_matrix_text(path: str | os.PathLike, mr_to_trus_lps: np.ndarray, overwrite: bool = False) -> Path:
    """Plain 4x4 text matrix in Slicer's RAS modeling convention (TRUS -> MR, "to parent")."""
    return geometry.write_matrix_text(_check_target(path, overwrite), mr_to_trus_lps, ras_modeling=True)


def build_report(
    result_report: Mapping[str, Any],
    mr_node,
    trus_node,
    transform_node=None,
    transform_file: str | None = None,
) -> dict[str, Any]:
    """JSON-ready report: the core's report plus input node names, the transform node and the date (UTC)."""
    report = dict(result_report)
    if transform_file is not None:
        report["transform_file"] = str(transform_file)
    report["slicer"] = {
        "mr_volume": mr_node.GetName() if mr_node is not None else None,
        "trus_volume": trus_node.GetName() if trus_node is not None else None,
        "output_transform": transform_node.GetName() if transform_node is not None else None,
    }
    if transform_node is not None:
        with contextlib.suppress(InputError):
            report["to_parent_ras"] = transform_to_world_ras(transform_node).tolist()
    report["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return report


def write_report(path: str | os.PathLike, report: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Write a report as strict JSON (NaN or Inf refused: they are not JSON), atomically."""
    try:
        text = json.dumps(report, indent=2, sort_keys=True, default=_json_default, allow_nan=False)
    except ValueError as exc:
        raise InputError(f"{path}: refused to write NaN or Inf into a JSON report ({exc})") from None
    return write_text(_check_target(path, overwrite), text + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
