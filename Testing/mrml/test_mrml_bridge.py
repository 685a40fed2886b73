"""The Qt-free MRML bridge on real MRML nodes (``slicer-core`` package, no Slicer application)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):  # the unrelated PyPI package named "slicer"
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

import vtk  # noqa: E402

from airreg import data, geometry  # noqa: E402
from airreg.errors import InputError  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parents[2] / "AIRRegistration"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from AIRRegistrationLib import mrml_bridge as bridge  # noqa: E402

pytestmark = pytest.mark.slicer


# --- fixtures and helpers ------------------------------------------------------------------------------


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene  # slicer.util helpers look here
    yield scene
    scene.Clear(1)


def make_image(
    size=(24, 20, 16), spacing=(1.0, 1.2, 1.5), origin=(-10.0, 5.0, 3.0), angles=(0, 0, 0), seed=0
):
    rng = np.random.default_rng(seed)
    voxels = rng.normal(100, 20, size=size[::-1]).astype(np.float32)
    voxels[4:10, 5:12, 6:14] += 80  # an asymmetric blob, so axis mix-ups show
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(geometry.rotation_matrix(angles).ravel().tolist())
    return image


def add_transform(scene, to_parent: np.ndarray, name="T"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(bridge.vtk_matrix_from_array(to_parent))
    return node


def snapshot(node) -> dict:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return {
        "voxels": slicer.util.arrayFromVolume(node).copy(),
        "ijk_to_ras": bridge.array_from_vtk_matrix(m),
        "parent": node.GetTransformNodeID(),
        "mtime_image": node.GetImageData().GetMTime(),
    }


def assert_unchanged(node, before: dict, parent_may_change: bool = False) -> None:
    after = snapshot(node)
    np.testing.assert_array_equal(after["voxels"], before["voxels"])
    np.testing.assert_array_equal(after["ijk_to_ras"], before["ijk_to_ras"])
    assert after["mtime_image"] == before["mtime_image"]
    if not parent_may_change:
        assert after["parent"] == before["parent"]


def rigid(angles=(5.0, -3.0, 10.0), translation=(4.0, -6.0, 2.5)) -> np.ndarray:
    return geometry.RigidTransform(angles, translation).matrix


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-9)


# --- the coordinate fact -------------------------------------------------------------------------------


def test_storage_node_writes_itk_convention(scene, tmp_path):
    """A ToParent RAS translation (10, 20, 30) is written as ITK parameters ... 10 20 -30."""
    node = add_transform(scene, geometry.homogeneous(np.eye(3), (10, 20, 30)))
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    path = tmp_path / "t.tfm"
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    params = next(line for line in path.read_text().splitlines() if line.startswith("Parameters:"))
    np.testing.assert_allclose(
        [float(v) for v in params.split()[1:]], [1, 0, 0, 0, 1, 0, 0, 0, 1, 10, 20, -30]
    )


@pytest.mark.parametrize("suffix", [".tfm", ".h5"])
def test_node_file_geometry_round_trip(scene, tmp_path, suffix):
    """node -> storage node file -> geometry.read_transform, and geometry.write_transform -> storage node -> node."""
    mr_to_trus = rigid()
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "result")
    mr = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "mr")
    trus = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "trus")
    bridge.set_registration_result(node, mr_to_trus, mr, trus)

    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    written = tmp_path / f"slicer{suffix}"
    storage.SetFileName(str(written))
    assert storage.WriteData(node)
    np.testing.assert_allclose(geometry.read_transform(written), mr_to_trus, atol=1e-9)

    ours = geometry.write_transform(tmp_path / f"ours{suffix}", mr_to_trus)
    loaded = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "loaded")
    reader = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    reader.SetFileName(str(ours))
    assert reader.ReadData(loaded)
    np.testing.assert_allclose(bridge.mr_to_trus_from_transform_node(loaded), mr_to_trus, atol=1e-9)
    np.testing.assert_allclose(
        bridge.transform_to_world_ras(loaded), geometry.lps_resampling_to_ras_modeling(mr_to_trus), atol=1e-9
    )


# --- volume node -> image ------------------------------------------------------------------------------


@pytest.mark.parametrize("angles", [(0, 0, 0), (10, -20, 30)])
def test_image_round_trip_keeps_geometry_and_voxels(scene, angles):
    image = make_image(angles=angles)
    node = bridge.add_volume_node_from_image(scene, image, "vol")
    back = bridge.image_from_volume_node(node)
    assert_same_geometry(back, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert back.GetPixelID() == image.GetPixelID()


def test_image_matches_slicer_ijk_to_ras(scene):
    """A voxel's LPS position from the image equals RAS_TO_LPS @ IJKToRAS of the node."""
    node = bridge.add_volume_node_from_image(scene, make_image(angles=(0, 15, -40)), "vol")
    image = bridge.image_from_volume_node(node)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk = (3, 7, 11)
    ras = bridge.array_from_vtk_matrix(m) @ np.array([*ijk, 1.0])
    np.testing.assert_allclose(
        image.TransformIndexToPhysicalPoint(ijk), (geometry.RAS_TO_LPS @ ras)[:3], atol=1e-9
    )
    # and the (K, J, I) voxel order of slicer.util agrees
    arr = slicer.util.arrayFromVolume(node)
    assert image[ijk] == arr[ijk[2], ijk[1], ijk[0]]


def test_linear_parent_chain_is_composed_in(scene):
    node = bridge.add_volume_node_from_image(scene, make_image(), "vol")
    local = bridge.image_from_volume_node(node)
    outer = add_transform(scene, rigid((0, 0, 20), (5, 0, 0)), "outer")
    inner = add_transform(scene, rigid((10, 0, 0), (0, -3, 7)), "inner")
    inner.SetAndObserveTransformNodeID(outer.GetID())
    node.SetAndObserveTransformNodeID(inner.GetID())
    before = snapshot(node)

    world = bridge.image_from_volume_node(node)
    to_world_lps = geometry.RAS_TO_LPS @ bridge.transform_to_world_ras(inner) @ geometry.RAS_TO_LPS
    ijk = (2, 9, 5)
    np.testing.assert_allclose(
        world.TransformIndexToPhysicalPoint(ijk),
        geometry.apply(to_world_lps, local.TransformIndexToPhysicalPoint(ijk)),
        atol=1e-9,
    )
    assert_same_geometry(bridge.image_from_volume_node(node, include_parent=False), local)
    assert_unchanged(node, before)


def test_non_linear_parent_is_refused(scene):
    node = bridge.add_volume_node_from_image(scene, make_image(), "vol")
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    grid_transform = slicer.vtkOrientedGridTransform()
    field = vtk.vtkImageData()
    field.SetDimensions(3, 3, 3)
    field.AllocateScalars(vtk.VTK_DOUBLE, 3)
    grid_transform.SetDisplacementGridData(field)
    grid.SetAndObserveTransformFromParent(grid_transform)
    node.SetAndObserveTransformNodeID(grid.GetID())
    before = snapshot(node)
    with pytest.raises(ValueError, match="not linear"):
        bridge.image_from_volume_node(node, role="TRUS")
    with pytest.raises(ValueError, match="not linear"):
        bridge.initial_transform_lps(node)
    assert_unchanged(node, before)


def test_shearing_parent_is_refused(scene):
    node = bridge.add_volume_node_from_image(scene, make_image(), "vol")
    shear = np.eye(4)
    shear[0, 1] = 0.3
    node.SetAndObserveTransformNodeID(add_transform(scene, shear).GetID())
    with pytest.raises(ValueError, match="shears"):
        bridge.image_from_volume_node(node)


def test_bad_volumes_are_refused(scene):
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "seg")
    bridge.update_volume_node_from_image(label, sitk.Cast(make_image() > 150, sitk.sitkUInt8))
    with pytest.raises(ValueError, match="label map"):
        bridge.image_from_volume_node(label)

    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(ValueError, match="empty"):
        bridge.image_from_volume_node(empty)

    flat = bridge.add_volume_node_from_image(scene, make_image(size=(30, 20, 1)), "slice")
    with pytest.raises(ValueError, match="not 3D"):
        bridge.image_from_volume_node(flat)

    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    data = vtk.vtkImageData()
    data.SetDimensions(4, 4, 4)
    data.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    vector.SetAndObserveImageData(data)
    with pytest.raises(ValueError, match="components"):
        bridge.image_from_volume_node(vector)


def test_validate_inputs_messages(scene):
    mr = bridge.add_volume_node_from_image(scene, make_image(seed=1), "MR")
    trus = bridge.add_volume_node_from_image(scene, make_image(seed=2), "TRUS")
    assert bridge.validate_inputs(None, None) == "Select MR and TRUS volumes"
    assert bridge.validate_inputs(mr, None) == "Select MR and TRUS volumes"
    assert bridge.validate_inputs(mr, mr) == "MR and TRUS must differ"
    assert bridge.validate_inputs(mr, trus) is None
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "nothing")
    assert "empty" in bridge.validate_inputs(mr, empty)
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "seg")
    bridge.update_volume_node_from_image(label, sitk.Cast(make_image() > 150, sitk.sitkUInt8))
    assert "label map" in bridge.validate_inputs(label, trus)


# --- initial transform and results ---------------------------------------------------------------------


def test_initial_transform_from_parent_or_chosen_node(scene):
    trus = bridge.add_volume_node_from_image(scene, make_image(), "TRUS")
    assert bridge.initial_transform_lps(trus) is None
    mr_to_trus = rigid()
    parent = add_transform(scene, geometry.lps_resampling_to_ras_modeling(mr_to_trus), "manual")
    trus.SetAndObserveTransformNodeID(parent.GetID())
    np.testing.assert_allclose(bridge.initial_transform_lps(trus), mr_to_trus, atol=1e-9)

    other = rigid((0, 0, -7), (1, 2, 3))
    chosen = add_transform(scene, geometry.lps_resampling_to_ras_modeling(other), "chosen")
    np.testing.assert_allclose(bridge.initial_transform_lps(trus, chosen), other, atol=1e-9)


def test_initial_transform_is_what_slicer_shows(scene):
    """The LPS initial matrix maps an MR world point onto the TRUS local point Slicer displays there."""
    trus = bridge.add_volume_node_from_image(scene, make_image(angles=(0, 0, 25)), "TRUS")
    parent = add_transform(scene, rigid((3, 4, 5), (10, -20, 30)), "manual")
    trus.SetAndObserveTransformNodeID(parent.GetID())
    local = bridge.image_from_volume_node(trus, include_parent=False)
    world = bridge.image_from_volume_node(trus)
    mr_to_trus = bridge.initial_transform_lps(trus)
    ijk = (5, 6, 7)
    np.testing.assert_allclose(
        geometry.apply(mr_to_trus, world.TransformIndexToPhysicalPoint(ijk)),
        local.TransformIndexToPhysicalPoint(ijk),
        atol=1e-9,
    )


def test_set_registration_result(scene):
    mr = bridge.add_volume_node_from_image(scene, make_image(seed=1), "MR")
    trus = bridge.add_volume_node_from_image(scene, make_image(seed=2), "TRUS")
    manual = add_transform(scene, rigid((0, 0, 3), (1, 1, 1)), "manual")
    trus.SetAndObserveTransformNodeID(manual.GetID())
    mr_before, trus_before = snapshot(mr), snapshot(trus)
    out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "AIR result")
    mr_to_trus = rigid()

    written = bridge.set_registration_result(out, mr_to_trus, mr, trus)
    np.testing.assert_allclose(written, geometry.lps_resampling_to_ras_modeling(mr_to_trus), atol=1e-12)
    np.testing.assert_allclose(slicer.util.arrayFromTransformMatrix(out), written, atol=1e-12)
    assert out.GetNodeReferenceID(out.GetFixedNodeReferenceRole()) == mr.GetID()
    assert out.GetNodeReferenceID(out.GetMovingNodeReferenceRole()) == trus.GetID()
    assert trus.GetTransformNodeID() == out.GetID()
    np.testing.assert_allclose(bridge.initial_transform_lps(trus), mr_to_trus, atol=1e-9)
    assert_unchanged(mr, mr_before)
    assert_unchanged(trus, trus_before, parent_may_change=True)

    bridge.show_alignment(trus, out, after=False)
    assert trus.GetTransformNodeID() == manual.GetID()
    bridge.show_alignment(trus, out, after=True)
    assert trus.GetTransformNodeID() == out.GetID()


def test_set_registration_result_without_applying(scene):
    mr = bridge.add_volume_node_from_image(scene, make_image(seed=1), "MR")
    trus = bridge.add_volume_node_from_image(scene, make_image(seed=2), "TRUS")
    out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "AIR result")
    bridge.set_registration_result(out, rigid(), mr, trus, apply_to_moving=False)
    assert trus.GetTransformNodeID() is None


def test_set_registration_result_under_a_parented_output(scene):
    """If the output transform itself sits under a transform, the world placement is still the result."""
    mr = bridge.add_volume_node_from_image(scene, make_image(seed=1), "MR")
    trus = bridge.add_volume_node_from_image(scene, make_image(seed=2), "TRUS")
    out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "AIR result")
    out.SetAndObserveTransformNodeID(add_transform(scene, rigid((0, 9, 0), (3, 2, 1)), "outer").GetID())
    mr_to_trus = rigid()
    bridge.set_registration_result(out, mr_to_trus, mr, trus)
    np.testing.assert_allclose(bridge.mr_to_trus_from_transform_node(out), mr_to_trus, atol=1e-9)
    np.testing.assert_allclose(bridge.initial_transform_lps(trus), mr_to_trus, atol=1e-9)


def test_non_rigid_result_is_refused(scene):
    mr = bridge.add_volume_node_from_image(scene, make_image(seed=1), "MR")
    trus = bridge.add_volume_node_from_image(scene, make_image(seed=2), "TRUS")
    out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "AIR result")
    with pytest.raises(InputError):
        bridge.set_registration_result(out, np.diag([2.0, 1, 1, 1]), mr, trus)
    assert trus.GetTransformNodeID() is None
    np.testing.assert_array_equal(slicer.util.arrayFromTransformMatrix(out), np.eye(4))


# --- display -------------------------------------------------------------------------------------------


def test_fusion_display(scene):
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(scene)  # adds the default colour nodes (logs a harmless warning without the app)
    composites = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    mr = bridge.add_volume_node_from_image(scene, make_image(seed=1), "MR")
    trus = bridge.add_volume_node_from_image(scene, make_image(seed=2), "TRUS")
    before = snapshot(trus)
    assert bridge.setup_fusion_display(scene, mr, trus) == 3
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == mr.GetID()
        assert composite.GetForegroundVolumeID() == trus.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.5)
    assert trus.GetDisplayNode().GetColorNodeID() == bridge.FUSION_COLOR_NODE_IDS[0]
    assert mr.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeGrey"
    assert_unchanged(trus, before)
    colors.SetMRMLScene(None)


# --- export --------------------------------------------------------------------------------------------


def test_exports_and_no_silent_overwrite(scene, tmp_path):
    mr = bridge.add_volume_node_from_image(scene, make_image(seed=1), "MR")
    trus = bridge.add_volume_node_from_image(scene, make_image(seed=2), "TRUS")
    out = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "AIR result")
    mr_to_trus = rigid()
    bridge.set_registration_result(out, mr_to_trus, mr, trus)

    h5 = bridge.export_transform(tmp_path / "t.h5", mr_to_trus)
    np.testing.assert_allclose(geometry.read_transform(h5), mr_to_trus, atol=1e-9)
    txt = bridge.export_matrix_text(tmp_path / "ras.txt", mr_to_trus)
    rows = np.loadtxt(txt, comments="#")
    np.testing.assert_allclose(rows, slicer.util.arrayFromTransformMatrix(out), atol=1e-8)
    np.testing.assert_allclose(geometry.read_transform(txt), mr_to_trus, atol=1e-8)

    report = bridge.build_report({"d_score": 0.9, "quality": "ok"}, mr, trus, out, transform_file=str(h5))
    path = bridge.write_report(tmp_path / "report.json", report)
    loaded = json.loads(path.read_text())
    assert loaded["slicer"] == {"mr_volume": "MR", "trus_volume": "TRUS", "output_transform": "AIR result"}
    assert loaded["transform_file"] == str(h5) and loaded["quality"] == "ok" and "date" in loaded

    for writer, target in (
        (lambda p, **kw: bridge.export_transform(p, mr_to_trus, **kw), h5),
        (lambda p, **kw: bridge.export_matrix_text(p, mr_to_trus, **kw), txt),
        (lambda p, **kw: bridge.write_report(p, report, **kw), path),
    ):
        content = target.read_bytes()
        with pytest.raises(FileExistsError):
            writer(target)
        assert target.read_bytes() == content
        writer(target, overwrite=True)  # the user chose the file in a save dialog


# --- end to end: files -> storage nodes -> registration -> transform file -> SimpleITK ------------------


class RecordingRegistrar:
    """Stand-in for airreg.registration.Registrar: records what it is given and returns a fixed answer."""

    def __init__(self, answer: np.ndarray):
        self.answer = answer
        self.calls: list[dict] = []

    def register(self, mr, trus, initial=None, progress=None):
        self.calls.append({"mr": mr, "trus": trus, "initial": initial})
        if progress:
            progress(1.0, "done")
        return type("Result", (), {"mr_to_trus": self.answer})()

    def score(self, mr, trus, transform):
        self.calls.append({"mr": mr, "trus": trus, "transform": transform})
        return "verdict"


def load_volume(scene, path: Path, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def load_phantom_pair(scene, folder: Path, seed: int):
    """A generated phantom case written as NRRD and loaded through storage nodes: ``(case, mr_node, trus_node)``."""
    phantom = pytest.importorskip("airreg.phantom")
    case = phantom.generate_case(seed)
    sitk.WriteImage(case.mr, str(folder / "mr.nrrd"))
    sitk.WriteImage(case.trus, str(folder / "trus.nrrd"))
    return (
        case,
        load_volume(scene, folder / "mr.nrrd", "MR"),
        load_volume(scene, folder / "trus.nrrd", "TRUS"),
    )


def write_and_read_back(scene, transform_node, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Write a transform node with vtkMRMLTransformStorageNode; read it back with SimpleITK and a storage node."""
    writer = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    writer.SetFileName(str(path))
    assert writer.WriteData(transform_node)
    via_sitk = geometry.from_sitk(sitk.ReadTransform(str(path)))
    loaded = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "read back")
    reader = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    reader.SetFileName(str(path))
    assert reader.ReadData(loaded)
    return via_sitk, bridge.mr_to_trus_from_transform_node(loaded)


def test_pipeline_on_files_with_recording_registrar(scene, tmp_path):
    """The bridge hands the core LPS images that match the files, the TRUS parent as the initial transform,
    and writes a result that reads back identically through Slicer's storage node and SimpleITK."""
    mr_image = make_image(size=(40, 36, 30), angles=(0, 0, 10), seed=1)
    trus_image = make_image(size=(32, 32, 28), spacing=(0.8, 0.8, 0.8), angles=(20, 0, -5), seed=2)
    sitk.WriteImage(mr_image, str(tmp_path / "mr.nrrd"))
    sitk.WriteImage(trus_image, str(tmp_path / "trus.nii.gz"))
    mr = load_volume(scene, tmp_path / "mr.nrrd", "MR")
    trus = load_volume(scene, tmp_path / "trus.nii.gz", "TRUS")
    manual_lps = rigid((0, 0, 4), (2, -1, 3))
    manual = add_transform(scene, geometry.lps_resampling_to_ras_modeling(manual_lps), "manual")
    trus.SetAndObserveTransformNodeID(manual.GetID())
    mr_before, trus_before = snapshot(mr), snapshot(trus)

    answer = rigid()
    registrar = RecordingRegistrar(answer)
    result, out = bridge.register_volume_nodes(registrar, mr, trus)
    call = registrar.calls[0]
    assert_same_geometry(call["mr"], mr_image)
    assert_same_geometry(call["trus"], trus_image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(call["mr"]), sitk.GetArrayFromImage(mr_image))
    np.testing.assert_allclose(call["initial"], manual_lps, atol=1e-9)

    assert out.GetName().startswith("AIR MR-TRUS transform")
    assert trus.GetTransformNodeID() == out.GetID()
    assert_unchanged(mr, mr_before)
    assert_unchanged(trus, trus_before, parent_may_change=True)
    np.testing.assert_array_equal(
        slicer.util.arrayFromTransformMatrix(manual), geometry.lps_resampling_to_ras_modeling(manual_lps)
    )

    for suffix in (".h5", ".tfm"):
        via_sitk, via_node = write_and_read_back(scene, out, tmp_path / f"result{suffix}")
        np.testing.assert_allclose(via_sitk, answer, atol=1e-12)
        np.testing.assert_allclose(via_node, answer, atol=1e-12)

    registrar.calls.clear()
    assert bridge.score_volume_nodes(registrar, mr, trus) == "verdict"
    np.testing.assert_allclose(registrar.calls[0]["transform"], answer, atol=1e-9)


def test_pipeline_refuses_bad_input_without_touching_nodes(scene):
    mr = bridge.add_volume_node_from_image(scene, make_image(seed=1), "MR")
    registrar = RecordingRegistrar(rigid())
    n_transforms = scene.GetNumberOfNodesByClass("vtkMRMLTransformNode")
    with pytest.raises(ValueError, match="must differ"):
        bridge.register_volume_nodes(registrar, mr, mr)
    flat = bridge.add_volume_node_from_image(scene, make_image(size=(30, 20, 1)), "2D")
    with pytest.raises(ValueError, match="not 3D"):
        bridge.register_volume_nodes(registrar, mr, flat)
    assert registrar.calls == []
    assert scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == n_transforms
    assert flat.GetTransformNodeID() is None


@pytest.fixture(scope="module")
def bundled_registrar():
    registration = pytest.importorskip("airreg.registration")
    from airreg.errors import ModelError

    try:
        return registration.Registrar.from_checkpoint(None, device="cpu", iterations=3, tolerance_mm=5.0)
    except (ModelError, FileNotFoundError) as exc:
        pytest.skip(f"no bundled model yet: {exc}")


@pytest.mark.slow
def test_phantom_end_to_end_with_bundled_model(scene, tmp_path, bundled_registrar):
    """Phantom pair on disk -> storage nodes -> AIR-net -> transform file; TRE against the landmarks.

    The TRUS starts under a transform made like the paper's evaluation starts (the ground truth perturbed by up to
    25 degrees about the slice normal and 5 mm in-plane), the alignment a fusion system would hand over.
    """
    from airreg.evaluation import random_start

    case, mr, trus = load_phantom_pair(scene, tmp_path, 0)
    start = random_start(case, 3, np.random.default_rng(7))
    start_node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "start")
    start_node.SetMatrixTransformToParent(
        bridge.vtk_matrix_from_array(geometry.lps_resampling_to_ras_modeling(start))
    )
    trus.SetAndObserveTransformNodeID(start_node.GetID())
    mr_before, trus_before = snapshot(mr), snapshot(trus)

    result, out = bridge.register_volume_nodes(bundled_registrar, mr, trus)
    np.testing.assert_allclose(result.initial, start, atol=1e-9)  # the TRUS's parent transform is the start
    assert_unchanged(mr, mr_before)
    assert_unchanged(trus, trus_before, parent_may_change=True)
    assert out.GetNodeReferenceID(out.GetMovingNodeReferenceRole()) == trus.GetID()

    via_sitk, via_node = write_and_read_back(scene, out, tmp_path / "result.h5")
    np.testing.assert_allclose(via_sitk, result.mr_to_trus, atol=1e-12)
    np.testing.assert_allclose(via_node, result.mr_to_trus, atol=1e-12)

    def tre(matrix):
        errors = [
            np.linalg.norm(geometry.apply(matrix, mr_xyz) - np.asarray(trus_xyz))
            for _, mr_xyz, trus_xyz in case.landmarks
        ]
        return float(np.sqrt(np.mean(np.square(errors))))

    assert tre(result.mr_to_trus) < tre(result.initial)
    assert tre(result.mr_to_trus) < 5.0
    assert 0.0 <= result.d_score <= 1.0 and result.quality in ("ok", "warning")

    report = bridge.build_report(result.report(str(tmp_path / "result.h5")), mr, trus, out)
    loaded = json.loads(bridge.write_report(tmp_path / "report.json", report).read_text())
    assert loaded["model_sha256"] == result.model_sha256 and loaded["slicer"]["trus_volume"] == "TRUS"


@pytest.mark.slow
def test_phantom_end_to_end_with_real_registrar(scene, tmp_path, tiny_model):
    """Real core on MRML nodes (tiny 2-epoch model from conftest, so no accuracy claim): the phantom pair is
    loaded through vtkMRMLVolumeArchetypeStorageNode, the result written through vtkMRMLTransformStorageNode
    reads back identically with SimpleITK, the landmarks agree with the matrix and the inputs are unchanged."""
    registration = pytest.importorskip("airreg.registration")
    case, mr, trus = load_phantom_pair(scene, tmp_path, 1)
    assert_same_geometry(bridge.image_from_volume_node(mr), case.mr)
    assert_same_geometry(bridge.image_from_volume_node(trus), case.trus)
    # a manual start 6 mm off the truth, as the user would leave it
    start = geometry.RigidTransform((0, 0, 0), (6.0, 0, 0)).matrix @ case.gt
    manual = add_transform(scene, geometry.lps_resampling_to_ras_modeling(start), "manual")
    trus.SetAndObserveTransformNodeID(manual.GetID())
    mr_before, trus_before = snapshot(mr), snapshot(trus)

    registrar = registration.Registrar.from_checkpoint(
        tiny_model, device="cpu", iterations=2, tolerance_mm=5.0
    )
    seen = []
    result, out = bridge.register_volume_nodes(registrar, mr, trus, progress=lambda f, m: seen.append(f))
    assert seen and seen[-1] == 1.0
    np.testing.assert_allclose(result.initial, start, atol=1e-9)
    assert_unchanged(mr, mr_before)
    assert_unchanged(trus, trus_before, parent_may_change=True)
    np.testing.assert_allclose(
        slicer.util.arrayFromTransformMatrix(manual),
        geometry.lps_resampling_to_ras_modeling(start),
        atol=1e-12,
    )
    np.testing.assert_allclose(slicer.util.arrayFromTransformMatrix(out), result.to_parent_ras, atol=1e-12)

    via_sitk, via_node = write_and_read_back(scene, out, tmp_path / "result.h5")
    np.testing.assert_allclose(via_sitk, result.mr_to_trus, atol=1e-12)
    np.testing.assert_allclose(via_node, result.mr_to_trus, atol=1e-12)

    # TRE of the start against the landmarks is the 6 mm we put in; the result's TRE is finite and reported
    mr_points = np.array([p for _, p, _ in case.landmarks])
    trus_points = np.array([p for _, _, p in case.landmarks])
    np.testing.assert_allclose(np.linalg.norm(geometry.apply(start, mr_points) - trus_points, axis=1), 6.0)
    assert np.all(np.isfinite(geometry.apply(result.mr_to_trus, mr_points)))
    assert 0.0 <= result.d_score <= 1.0 and result.quality in ("ok", "warning")
    quality = bridge.score_volume_nodes(registrar, mr, trus)  # TRUS is now under the result
    # scoring resamples the TRUS through the result directly, registration through the start and then the
    # estimate: the same alignment, a slightly different interpolation path
    assert quality.d_score == pytest.approx(result.d_score, abs=0.1)


def test_dicom_patient_ids_reach_the_core_and_unknown_ones_do_not(scene):
    """Volumes loaded from DICOM carry their instance UIDs; the lookup's PatientIDs go onto the images the core
    gets (which warns when they differ), and nothing is invented for other volumes or without a lookup."""
    mr = bridge.add_volume_node_from_image(scene, make_image(seed=1), "MR")
    trus = bridge.add_volume_node_from_image(scene, make_image(seed=2), "TRUS")
    mr.SetAttribute(bridge.DICOM_INSTANCE_UIDS_ATTRIBUTE, "1.2.3.1 1.2.3.2")
    trus.SetAttribute(bridge.DICOM_INSTANCE_UIDS_ATTRIBUTE, "1.2.4.1")
    patients = {"1.2.3.1": "PAT-001", "1.2.3.2": "PAT-001", "1.2.4.1": " PAT-002 "}
    mr_before, trus_before = snapshot(mr), snapshot(trus)
    registrar = RecordingRegistrar(rigid())
    bridge.register_volume_nodes(registrar, mr, trus, patient_lookup=patients.get)
    call = registrar.calls[0]
    assert data.patient_id(call["mr"]) == "PAT-001" and data.patient_id(call["trus"]) == "PAT-002"
    assert "different patients" in data.patient_mismatch(call["mr"], call["trus"])
    assert_unchanged(mr, mr_before)
    assert_unchanged(trus, trus_before, parent_may_change=True)
    assert mr.GetAttribute(bridge.DICOM_INSTANCE_UIDS_ATTRIBUTE) == "1.2.3.1 1.2.3.2"
    registrar.calls.clear()
    bridge.score_volume_nodes(registrar, mr, trus)  # no lookup: nothing to compare
    assert data.patient_id(registrar.calls[0]["mr"]) is None
    trus.RemoveAttribute(bridge.DICOM_INSTANCE_UIDS_ATTRIBUTE)  # not from DICOM
    assert bridge.patient_id_of_node(trus, patients.get) is None
    assert bridge.patient_id_of_node(mr, {}.get) is None  # a UID the database does not know


def file_under_patient(scene, node, patient_name: str, patient_id: str | None = None) -> int:
    """File a volume under a (new) patient item and study of the subject hierarchy, as the Data module does."""
    hierarchy = scene.GetSubjectHierarchyNode()
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), patient_name)
    if patient_id is not None:
        hierarchy.SetItemAttribute(patient, bridge.PATIENT_ID_ITEM_ATTRIBUTE, patient_id)
    study = hierarchy.CreateStudyItem(patient, "Study")
    item = hierarchy.GetItemByDataNode(node)
    if item == hierarchy.GetInvalidItemID():
        hierarchy.CreateItem(study, node)
    else:
        hierarchy.SetItemParent(item, study)
    return patient


def test_subject_hierarchy_patients_reach_the_core(scene):
    """Volumes filed under patients in the subject hierarchy carry that patient (its DICOM PatientID, else its
    name) to the core; the DICOM database's PatientID comes first; volumes under no patient carry none."""
    mr = bridge.add_volume_node_from_image(scene, make_image(seed=1), "MR")
    trus = bridge.add_volume_node_from_image(scene, make_image(seed=2), "TRUS")
    assert bridge.patient_id_of_node(mr, None) is None  # not in the hierarchy at all
    hierarchy = scene.GetSubjectHierarchyNode()
    hierarchy.CreateItem(hierarchy.GetSceneItemID(), trus)
    assert bridge.subject_hierarchy_patient(trus) is None  # at the top level, under no patient
    patient_a = file_under_patient(scene, mr, "Doe^John", patient_id="PAT-007")
    file_under_patient(scene, trus, " Roe^Richard ")
    mr_before, trus_before = snapshot(mr), snapshot(trus)
    registrar = RecordingRegistrar(rigid())
    bridge.register_volume_nodes(registrar, mr, trus)
    call = registrar.calls[0]
    assert data.patient_id(call["mr"]) == "PAT-007" and data.patient_id(call["trus"]) == "Roe^Richard"
    warning = data.patient_mismatch(call["mr"], call["trus"])
    assert "different patients ('PAT-007' and 'Roe^Richard')" in warning
    assert_unchanged(mr, mr_before)
    assert_unchanged(trus, trus_before, parent_may_change=True)
    # the TRUS is moved to the MR's patient
    hierarchy.SetItemParent(hierarchy.GetItemByDataNode(trus), patient_a)
    registrar.calls.clear()
    bridge.score_volume_nodes(registrar, mr, trus)
    assert data.patient_mismatch(registrar.calls[0]["mr"], registrar.calls[0]["trus"]) is None
    trus.SetAttribute(bridge.DICOM_INSTANCE_UIDS_ATTRIBUTE, "1.2.4.1")
    assert bridge.patient_id_of_node(trus, {"1.2.4.1": "PAT-002"}.get) == "PAT-002"  # the database first
    assert bridge.patient_id_of_node(trus, {}.get) == "PAT-007"  # unknown UID: the hierarchy
