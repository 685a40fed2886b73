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
(``set_registration_result(..., apply_to_moving=True)``, ``show_alignment``, ``setup_fusion_display`` and
``show_label_layer`` which change display settings only); the target functions make or update only nodes of
their own (marked with ``SPACE_ATTRIBUTE``).
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

from airreg import data, geometry, targets
from airreg.errors import InputError
from airreg.fileio import write_text

#: Colour map for the TRUS foreground in the fusion view (falls back to the next ones if not in the scene).
FUSION_COLOR_NODE_IDS = (
    "vtkMRMLPETProceduralColorNodePET-Heat",
    "vtkMRMLColorTableNodeIron",
    "vtkMRMLColorTableNodeRainbow",
)

#: Node-reference role on the output transform: the transform the TRUS was under before registration. A node
#: reference (not an ID in an attribute) follows the node when a scene is imported and its IDs are renamed.
PREVIOUS_PARENT_ROLE = "airRegistrationPreviousParent"

#: Attribute marking a transform node written by this module's registration (see :func:`check_output_transform`).
OUTPUT_ATTRIBUTE = "AIRRegistration.Output"

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


def validate_inputs(
    mr_node, trus_node, output_transform_node=None, initial_transform_node=None
) -> str | None:
    """Why registration cannot run with these nodes (text for the panel), or None when it can."""
    if mr_node is None or trus_node is None:
        return "Select MR and TRUS volumes"
    if mr_node is trus_node or mr_node.GetID() == trus_node.GetID():
        return "MR and TRUS must differ"
    for node, role in ((mr_node, "MR"), (trus_node, "TRUS")):
        try:
            check_volume_node(node, role)
        except InputError as exc:
            return str(exc)
    return check_output_transform(output_transform_node, mr_node, trus_node, initial_transform_node)


def transform_ancestors(node) -> list:
    """The transform nodes a node is under, nearest first (its parent, the parent's parent, ...)."""
    chain = []
    parent = node.GetParentTransformNode()
    while parent is not None and parent not in chain:
        chain.append(parent)
        parent = parent.GetParentTransformNode()
    return chain


def check_output_transform(
    output_transform_node, mr_node, trus_node, initial_transform_node=None
) -> str | None:
    """Why a transform node cannot receive the result, or None when it can (None: a new node is made).

    Writing the result into a transform the MR is under would move the MR too; writing it into the TRUS's
    current parent (or one of its ancestors), or into the chosen initial transform (or one it is under), would
    overwrite the "before" placement or the starting alignment. The output of an earlier registration of this
    TRUS (marked with :data:`OUTPUT_ATTRIBUTE`) may be reused, if the TRUS is under it, directly.
    """
    if output_transform_node is None:
        return None
    name = output_transform_node.GetName()
    if output_transform_node in transform_ancestors(mr_node):
        return (
            f"Output transform '{name}' would move the MR volume (the MR is under it); "
            "choose another output transform or 'Create new transform'"
        )
    own_result = (
        output_transform_node.GetAttribute(OUTPUT_ATTRIBUTE) == "1"
        and output_transform_node.GetNodeReferenceID(output_transform_node.GetMovingNodeReferenceRole())
        == trus_node.GetID()
    )
    trus_chain = transform_ancestors(trus_node)
    if output_transform_node in trus_chain and not (own_result and trus_chain[0] is output_transform_node):
        return (
            f"Output transform '{name}' holds the TRUS volume's current placement (the TRUS is under it); "
            "choose another output transform or 'Create new transform'"
        )
    if initial_transform_node is not None and not own_result:
        initial_chain = [initial_transform_node, *transform_ancestors(initial_transform_node)]
        if output_transform_node in initial_chain:
            return (
                f"Output transform '{name}' would overwrite the initial transform (the starting alignment); "
                "choose another output transform or 'Create new transform'"
            )
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


def mr_to_trus_from_transform_node(transform_node, mr_node=None) -> np.ndarray:
    """MR->TRUS LPS resampling matrix held by a registration transform node (its "to world", parents included).

    With ``mr_node`` the matrix starts from the MR volume's own (file) coordinates, that is, the MR's parent
    transforms are undone: it maps a point of the MR file to the same point of the TRUS file. Without it, from
    Slicer's world coordinates.
    """
    trus_to_world = transform_to_world_ras(transform_node, "output transform")
    if mr_node is not None:
        trus_to_world = (
            np.linalg.inv(parent_to_world_ras(mr_node, _node_label(mr_node, "MR"))) @ trus_to_world
        )
    return geometry.ras_modeling_to_lps_resampling(trus_to_world)


def fixed_volume_of(transform_node):
    """The MR (fixed) volume a registration transform node refers to, or None."""
    return transform_node.GetNodeReference(transform_node.GetFixedNodeReferenceRole())


# --- results -------------------------------------------------------------------------------------------


def set_registration_result(
    transform_node, mr_to_trus_lps: np.ndarray, mr_node, trus_node, apply_to_moving: bool = True
) -> np.ndarray:
    """Write a registration result into a linear transform node; return the RAS matrix written.

    The node gets the RAS modeling ("to parent") matrix so that, with the TRUS volume under it, TRUS is shown
    aligned with MR in world coordinates (if the transform node itself has a parent, that parent is undone).
    Fixed (MR) and moving (TRUS) node references are set with the standard roles. With ``apply_to_moving``
    the TRUS volume is put under the node; the transform it was under before is kept as a node reference
    (:data:`PREVIOUS_PARENT_ROLE`) for :func:`show_alignment`.
    """
    mr_to_trus = geometry.check_rigid(mr_to_trus_lps, "registration result")
    to_world = geometry.lps_resampling_to_ras_modeling(mr_to_trus)
    parent = transform_node.GetParentTransformNode()
    to_parent = to_world if parent is None else np.linalg.inv(transform_to_world_ras(parent)) @ to_world

    transform_node.SetMatrixTransformToParent(vtk_matrix_from_array(to_parent))
    transform_node.SetNodeReferenceID(transform_node.GetFixedNodeReferenceRole(), mr_node.GetID())
    transform_node.SetNodeReferenceID(transform_node.GetMovingNodeReferenceRole(), trus_node.GetID())
    transform_node.SetAttribute(OUTPUT_ATTRIBUTE, "1")
    if apply_to_moving:
        previous = trus_node.GetTransformNodeID()
        if previous != transform_node.GetID():
            transform_node.SetNodeReferenceID(PREVIOUS_PARENT_ROLE, previous)
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
    reason = check_output_transform(output_transform_node, mr_node, trus_node, initial_transform_node)
    if reason:
        raise InputError(reason)
    initial = initial_transform_lps(trus_node, initial_transform_node)
    result = registrar.register(mr, trus, initial=initial, progress=progress)
    geometry.check_rigid(result.mr_to_trus, "registration result")
    check_still_in_scene(mr_node, trus_node, output_transform_node)
    if output_transform_node is None:
        scene = mr_node.GetScene()
        output_transform_node = scene.AddNewNodeByClass(
            "vtkMRMLLinearTransformNode", scene.GenerateUniqueName("AIR MR-TRUS transform")
        )
    set_registration_result(output_transform_node, result.mr_to_trus, mr_node, trus_node)
    return result, output_transform_node


def check_still_in_scene(*nodes) -> None:
    """Raise InputError if a node (None is skipped) left its scene while the registration ran (e.g. the scene
    was closed, or the node deleted, from the event loop the progress callback runs)."""
    for node in nodes:
        if node is not None and node.GetScene() is None:
            raise InputError(
                f"'{node.GetName()}' was removed from the scene during the registration; nothing was changed"
            )


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
        trus_node.SetAndObserveTransformNodeID(transform_node.GetNodeReferenceID(PREVIOUS_PARENT_ROLE))


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


def show_label_layer(scene, labelmap_node) -> int:
    """A label map as the label layer of every slice view (the scene's vtkMRMLSliceCompositeNodes, MRML only);
    returns how many were set."""
    count = 0
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode").SetLabelVolumeID(labelmap_node.GetID())
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


#: What the exported transform, the RAS matrix text and the report's ``mr_to_trus_lps`` map.
EXPORT_FRAME = (
    "MR file coordinates -> TRUS file coordinates (LPS mm): the volumes' own coordinates, without the "
    "transforms they are under in Slicer"
)


def build_report(
    result_report: Mapping[str, Any],
    mr_node,
    trus_node,
    transform_node=None,
    transform_file: str | None = None,
) -> dict[str, Any]:
    """JSON-ready report: the core's report plus input node names, the transform node and the date (UTC).

    ``mr_to_trus_lps`` is given in :data:`EXPORT_FRAME` (what *Save transform* writes); the core's matrix, from
    Slicer's world coordinates, is kept as ``mr_world_to_trus_lps`` when the MR is under a transform.
    ``to_parent_ras`` is the transform node's "to world" matrix the scores refer to.
    """
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
            if mr_node is not None and mr_node.GetParentTransformNode() is not None:
                report["mr_world_to_trus_lps"] = report.get("mr_to_trus_lps")
                report["mr_to_world_ras"] = parent_to_world_ras(mr_node).tolist()
            report["mr_to_trus_lps"] = mr_to_trus_from_transform_node(transform_node, mr_node).tolist()
            report["transform_frame"] = EXPORT_FRAME
    report.setdefault("adjusted_manually", False)
    report["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return report


#: Report keys describing the alignment after a manual adjustment (see :func:`record_manual_adjustment`).
ADJUSTED_KEYS = ("d_score", "estimated_tre_mm", "p_error_above_tolerance", "quality", "warning")


def record_manual_adjustment(
    report: Mapping[str, Any], verdict, transform_node, mr_node, warning: str | None = None
) -> dict[str, Any]:
    """The report after the output transform was re-scored (``verdict``, a ``QualityResult``) as it is now.

    ``adjusted_manually`` says whether the transform differs from the registration's; if it does, the verdict
    is stored as ``d_score_adjusted``, ``estimated_tre_mm_adjusted`` ... and the matrices describe the adjusted
    transform (the registration's stays in ``registered_to_parent_ras``). ``warning`` replaces the verdict's
    warning (e.g. without PatientIDs).
    """
    updated = dict(report)
    registered = np.asarray(updated.setdefault("registered_to_parent_ras", updated["to_parent_ras"]))
    current = transform_to_world_ras(transform_node, "output transform")
    adjusted = not np.allclose(current, registered, atol=1e-6)
    updated["adjusted_manually"] = adjusted
    updated["to_parent_ras"] = current.tolist()
    updated["mr_to_trus_lps"] = mr_to_trus_from_transform_node(transform_node, mr_node).tolist()
    values = {
        "d_score": verdict.d_score,
        "estimated_tre_mm": verdict.estimated_tre_mm,
        "p_error_above_tolerance": verdict.p_failure,
        "quality": verdict.quality,
        "warning": verdict.warning if warning is None else warning,
    }
    for key in ADJUSTED_KEYS:
        updated.pop(f"{key}_adjusted", None)
        if adjusted:
            updated[f"{key}_adjusted"] = values[key]
    return updated


def report_matches_transform(report: Mapping[str, Any], transform_node) -> bool:
    """Whether the report's scores refer to the transform node as it is now (not moved since it was scored)."""
    scored = report.get("to_parent_ras")
    if scored is None or transform_node is None:
        return False
    try:
        current = transform_to_world_ras(transform_node)
    except InputError:
        return False
    return bool(np.allclose(current, np.asarray(scored), atol=1e-6))


#: The patient warning as the module shows and stores it: saved scenes should not carry PatientIDs.
DIFFERENT_PATIENTS_WARNING = (
    "the MR and the TRUS belong to different patients (their DICOM PatientIDs or their patients in the "
    "Data module differ)"
)


def warning_without_patient_ids(
    warning: str | None, mr_node, trus_node, lookup: PatientLookup | None
) -> str | None:
    """The core's warning, or :data:`DIFFERENT_PATIENTS_WARNING` when it is the patient mismatch (which names
    both PatientIDs): text the panel shows and the scene saves."""
    ids = [patient_id_of_node(node, lookup) for node in (mr_node, trus_node)]
    if warning and None not in ids and ids[0] != ids[1]:
        return DIFFERENT_PATIENTS_WARNING
    return warning


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


# --- biopsy targets ------------------------------------------------------------------------------------
#
# MR targets (a point list, a segmentation or a label map on the MR) are read where Slicer shows them (world,
# parent transforms composed in, like the MR image the core registers) and mapped with the MR->TRUS LPS
# resampling matrix into the TRUS volume's *local* coordinates: the TRUS file's coordinates, in which biopsy
# systems expect them. The new nodes are put under the TRUS volume's parent transform, so that they are shown
# where the TRUS is shown (on the MR targets once the TRUS is under the registration result); their own
# coordinates, which Slicer saves and the exports below write, are TRUS coordinates. Input nodes are never
# modified.

#: Slicer's control-point position status for a placed point (``vtkMRMLMarkupsNode::PositionDefined``).
_POSITION_DEFINED = 2
#: Attribute naming the space of the coordinates of a node made by this module ("TRUS").
SPACE_ATTRIBUTE = "AIRRegistration.Space"
_BINARY_LABELMAP = "Binary labelmap"


def targets_from_markups_node(markups_node, world: bool = True) -> targets.Targets:
    """The control points of a point list as LPS targets: world positions (as Slicer shows them) or, with
    ``world=False``, the node's own coordinates. Points not placed yet are refused, not skipped."""
    if markups_node is None or not markups_node.IsA("vtkMRMLMarkupsNode"):
        raise InputError("Select a markups point list of targets")
    name = markups_node.GetName()
    labels, points = [], []
    for i in range(markups_node.GetNumberOfControlPoints()):
        label = markups_node.GetNthControlPointLabel(i)
        if markups_node.GetNthControlPointPositionStatus(i) != _POSITION_DEFINED:
            raise InputError(f"point list '{name}': point {i + 1} ('{label}') is not placed")
        position = [0.0, 0.0, 0.0]
        if world:
            markups_node.GetNthControlPointPositionWorld(i, position)
        else:
            markups_node.GetNthControlPointPosition(i, position)
        labels.append(label)
        points.append(targets.ras_to_lps(np.array(position)))
    if not labels:
        raise InputError(f"point list '{name}' has no points")
    return targets.Targets(tuple(labels), np.array(points))


def _follow_trus(node, trus_node) -> None:
    """Put a new node under the TRUS volume's parent transform (shown where the TRUS is shown)."""
    if trus_node is not None:
        node.SetAndObserveTransformNodeID(trus_node.GetTransformNodeID())


def map_markups_to_trus(
    markups_node, mr_to_trus_lps: np.ndarray, trus_node=None, name: str | None = None, node=None
):
    """Point list (in the markups node's scene) holding the MR targets in TRUS coordinates.

    Labels and descriptions are copied; with ``trus_node`` the list goes under its parent transform. With
    ``node`` (a point list this module mapped, see :func:`reusable_mapped_node`) its points are replaced instead
    of making a new list; nothing is changed when the input is refused.
    """
    mr_targets = targets_from_markups_node(markups_node)
    mapped = mr_targets.mapped(mr_to_trus_lps)
    scene = markups_node.GetScene()
    if node is None:
        node = scene.AddNewNodeByClass(
            "vtkMRMLMarkupsFiducialNode", name or scene.GenerateUniqueName(f"{markups_node.GetName()} (TRUS)")
        )
    was_modifying = node.StartModify()
    node.RemoveAllControlPoints()
    for i, (label, point) in enumerate(zip(mapped.labels, mapped.points_ras, strict=True)):
        index = node.AddControlPoint([float(v) for v in point], label)
        node.SetNthControlPointDescription(index, markups_node.GetNthControlPointDescription(i))
    node.SetAttribute(SPACE_ATTRIBUTE, "TRUS")
    node.EndModify(was_modifying)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    _follow_trus(node, trus_node)
    return node


def _label_image(voxels: np.ndarray, ijk_to_ras: np.ndarray, what: str) -> sitk.Image:
    """SimpleITK label image (LPS) from voxels (K, J, I) and the 4x4 RAS matrix mapping their indices (i, j, k)
    to world (the first voxel at index 0); refuses degenerate or sheared geometry."""
    ijk_to_lps = geometry.RAS_TO_LPS @ ijk_to_ras
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(ijk_to_lps)):
        raise InputError(f"{what} has a degenerate voxel spacing")
    direction = ijk_to_lps[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=_ORTHONORMAL_TOL):
        raise InputError(f"{what}: its parent transform shears it; harden it or use a rigid transform")
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    image.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    return image


def _voxels(image_data) -> np.ndarray:
    """A copy of a vtkImageData's single-component scalars as an array (K, J, I)."""
    i0, i1, j0, j1, k0, k1 = image_data.GetExtent()
    scalars = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    return np.array(scalars, copy=True).reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)


def label_image_from_labelmap_node(node, include_parent: bool = True) -> sitk.Image:
    """A copy of a label-map volume node as a SimpleITK label image (LPS), parent transforms composed in."""
    what = f"label map '{node.GetName()}'" if node is not None else "label map"
    if node is None or not node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"{what}: select a label map volume or a segmentation")
    image_data = node.GetImageData()
    if (
        image_data is None
        or image_data.GetNumberOfPoints() == 0
        or image_data.GetNumberOfScalarComponents() != 1
    ):
        raise InputError(f"{what} is empty or has several components per voxel")
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = array_from_vtk_matrix(matrix)
    if include_parent:
        ijk_to_ras = parent_to_world_ras(node, what) @ ijk_to_ras
    return _label_image(_voxels(image_data), ijk_to_ras, what)


def _segment_images(segmentation_node) -> list[tuple[str, sitk.Image | None]]:
    """Per segment (in order): its name and its binary label map in world LPS (None when it is empty)."""
    name = segmentation_node.GetName()
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        raise InputError(f"segmentation '{name}' has no segments")
    if not segmentation.ContainsRepresentation(_BINARY_LABELMAP):
        raise InputError(
            f"segmentation '{name}' has no binary label map; create one in the Segmentations module first"
        )
    parent = parent_to_world_ras(segmentation_node, f"segmentation '{name}'")
    images = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        oriented = _oriented_image()
        segment_name = segmentation.GetSegment(segment_id).GetName()
        if not segmentation_node.GetBinaryLabelmapRepresentation(segment_id, oriented):
            raise InputError(f"segmentation '{name}': segment '{segment_name}' has no binary label map")
        extent = oriented.GetExtent()
        if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
            images.append((segment_name, None))
            continue
        matrix = vtk.vtkMatrix4x4()
        oriented.GetImageToWorldMatrix(matrix)
        first_voxel = geometry.homogeneous(np.eye(3), [extent[0], extent[2], extent[4]])
        ijk_to_ras = parent @ array_from_vtk_matrix(matrix) @ first_voxel
        images.append(
            (segment_name, _label_image(_voxels(oriented), ijk_to_ras, f"segment '{segment_name}'"))
        )
    return images


def _oriented_image():
    """A new vtkOrientedImageData (Slicer's segmentation core class; imported here, where it is needed)."""
    from slicer import vtkOrientedImageData

    return vtkOrientedImageData()


def _new_labelmap_node(scene, image: sitk.Image, name: str, trus_node):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName(name))
    update_volume_node_from_image(node, image)
    node.SetAttribute(SPACE_ATTRIBUTE, "TRUS")
    node.CreateDefaultDisplayNodes()
    _follow_trus(node, trus_node)
    return node


def segment_labels(segmentation_node) -> dict[int, str]:
    """Label value -> segment name, as :func:`map_segmentation_to_trus` numbers segments (in order, from 1)."""
    segmentation = segmentation_node.GetSegmentation()
    return {
        i + 1: segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
        for i in range(segmentation.GetNumberOfSegments())
    }


def _segment_color_table(scene, segmentation_node, table=None):
    """Colour table naming and colouring the labels of a mapped segmentation (value i + 1 = segment i): a new
    one, or ``table`` refilled when it is one this module made (:data:`OUTPUT_ATTRIBUTE`)."""
    segmentation = segmentation_node.GetSegmentation()
    if table is None or not table.IsA("vtkMRMLColorTableNode") or table.GetAttribute(OUTPUT_ATTRIBUTE) != "1":
        table = scene.AddNewNodeByClass(
            "vtkMRMLColorTableNode", scene.GenerateUniqueName(f"{segmentation_node.GetName()} (TRUS) colours")
        )
        table.SetAttribute(OUTPUT_ATTRIBUTE, "1")
    table.SetTypeToUser()
    table.SetNumberOfColors(segmentation.GetNumberOfSegments() + 1)
    table.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
    for value, segment_name in segment_labels(segmentation_node).items():
        red, green, blue = segmentation.GetSegment(segmentation.GetNthSegmentID(value - 1)).GetColor()
        table.SetColor(value, segment_name, red, green, blue, 1.0)
    return table


def map_segmentation_to_trus(
    source_node, mr_to_trus_lps: np.ndarray, trus_node, name: str | None = None, node=None
):
    """Label-map volume on the TRUS volume's grid holding a segmentation or label map of the MR.

    Nearest neighbour, so label values are kept: a label-map node keeps its values (and its colour table);
    segment i of a segmentation becomes label i + 1 (as Slicer's own export numbers them; a colour table
    names them) and a later segment wins where segments overlap. The node is on the TRUS grid, under the
    TRUS volume's parent transform: a new one, or ``node`` (a label map this module mapped) with its voxels
    replaced. Nothing is changed when the input is refused.
    """
    trus_grid = image_from_volume_node(trus_node, include_parent=False, role="TRUS")
    is_segmentation = source_node is not None and source_node.IsA("vtkMRMLSegmentationNode")
    if is_segmentation:
        voxels = np.zeros(sitk.GetArrayViewFromImage(trus_grid).shape, np.uint16)
        for value, (_, image) in enumerate(_segment_images(source_node), start=1):
            if image is not None:
                mapped = targets.map_label_image(image, mr_to_trus_lps, trus_grid)
                voxels[sitk.GetArrayViewFromImage(mapped) != 0] = value
        on_trus = sitk.GetImageFromArray(voxels)
        on_trus.CopyInformation(trus_grid)
    else:
        labels = label_image_from_labelmap_node(source_node)
        on_trus = targets.map_label_image(labels, mr_to_trus_lps, trus_grid)
    scene = trus_node.GetScene()
    if node is None:
        node = _new_labelmap_node(scene, on_trus, name or f"{source_node.GetName()} (TRUS)", trus_node)
    else:
        update_volume_node_from_image(node, on_trus)
        _follow_trus(node, trus_node)
    if is_segmentation:
        color_node_id = _segment_color_table(scene, source_node, node.GetDisplayNode().GetColorNode()).GetID()
    else:
        source_display = source_node.GetDisplayNode()
        color_node_id = source_display.GetColorNodeID() if source_display is not None else None
    if color_node_id:
        node.GetDisplayNode().SetAndObserveColorNodeID(color_node_id)
    return node


def export_targets(path: str | os.PathLike, markups_node, overwrite: bool = False) -> Path:
    """Write the TRUS coordinates of a point list made by :func:`map_markups_to_trus` (its own coordinates)
    as CSV (LPS and RAS columns) or ``.mrk.json``; other point lists are refused (their space is unknown)."""
    mapped = targets_from_markups_node(markups_node, world=False)
    if markups_node.GetAttribute(SPACE_ATTRIBUTE) != "TRUS":
        raise InputError(f"point list '{markups_node.GetName()}' is not in TRUS space; map it to TRUS first")
    return targets.write_targets(
        _check_target(path, overwrite), mapped, space="TRUS", name=markups_node.GetName()
    )


def export_labelmap(path: str | os.PathLike, labelmap_node, overwrite: bool = False) -> Path:
    """Write a label-map volume on its own grid (the TRUS grid for one made by :func:`map_segmentation_to_trus`)
    as NRRD or NIfTI, keeping its label values."""
    image = label_image_from_labelmap_node(labelmap_node, include_parent=False)
    return targets.write_label_image(_check_target(path, overwrite), image)


def add_targets_to_report(
    report: Mapping[str, Any],
    targets_source=None,
    targets_file: str | os.PathLike | None = None,
    segmentation_source=None,
    segmentation_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The report with the exported target files recorded under the keys ``airreg register --report`` uses:
    the MR-side node's name (``file``), the file written, and what that file holds (count, label values, and
    for a segmentation the segment name of each label)."""
    out = dict(report)
    if targets_file is not None:
        written = targets.read_targets(targets_file, space="TRUS")
        out["targets"] = {
            "file": targets_source.GetName() if targets_source is not None else None,
            "output_file": str(targets_file),
            "count": len(written),
        }
    if segmentation_file is not None:
        labels = targets.label_values(targets.read_label_image(segmentation_file))
        out["segmentation"] = {
            "file": segmentation_source.GetName() if segmentation_source is not None else None,
            "output_file": str(segmentation_file),
            "labels": labels,
        }
        if segmentation_source is not None and segmentation_source.IsA("vtkMRMLSegmentationNode"):
            names = segment_labels(segmentation_source)
            out["segmentation"]["label_names"] = {str(v): names[v] for v in labels if v in names}
    return out


# --- which MR node a mapped node comes from, and with which alignment ------------------------------------

#: Node-reference role on a mapped node: the MR point list, segmentation or label map it was mapped from.
MAPPED_FROM_ROLE = "airRegistrationMappedFrom"
#: Attribute on a mapped node: the registration transform's "to world" RAS matrix it was mapped with (JSON).
MAPPED_WITH_ATTRIBUTE = "AIRRegistration.MappedWith"


def mark_mapped(node, source_node, transform_node) -> None:
    """Record on a mapped node its MR source and the alignment used, and put it under the registration
    transform (so it is shown on the MR targets, also while the TRUS shows its "before" placement)."""
    node.SetNodeReferenceID(MAPPED_FROM_ROLE, source_node.GetID())
    node.SetAttribute(MAPPED_WITH_ATTRIBUTE, json.dumps(transform_to_world_ras(transform_node).tolist()))
    node.SetAndObserveTransformNodeID(transform_node.GetID())


def reusable_mapped_node(node, source_node):
    """``node`` when it is a node this module mapped from ``source_node`` and still in its scene (to update on
    the next mapping), else None (a new node is made)."""
    scene = source_node.GetScene() if source_node is not None else None
    if node is None or scene is None or not scene.IsNodePresent(node):
        return None
    same_source = node.GetNodeReferenceID(MAPPED_FROM_ROLE) == source_node.GetID()
    return node if same_source and node.GetAttribute(SPACE_ATTRIBUTE) == "TRUS" else None


def is_mapped_with(node, source_node, transform_node) -> bool:
    """Whether ``node`` was mapped from ``source_node`` with ``transform_node`` as it is now."""
    if reusable_mapped_node(node, source_node) is None or transform_node is None:
        return False
    used = node.GetAttribute(MAPPED_WITH_ATTRIBUTE)
    try:
        current = transform_to_world_ras(transform_node)
    except InputError:
        return False
    return used is not None and bool(np.allclose(np.asarray(json.loads(used)), current, atol=1e-6))
