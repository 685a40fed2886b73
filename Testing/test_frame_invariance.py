"""The network frame depends on the anatomy, not on how a file orders its voxel axes (issue 13, item 1).

The same physical MR and TRUS are re-stored in all 48 axis orders and flips (array permuted and flipped, direction
and origin adjusted so that every voxel keeps its LPS position), with oblique directions up to 30°; the frame,
the registration of the bundled 3-DOF model and its D-score must not change.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from airreg import geometry, resampling
from airreg.registration import Registrar
from conftest import make_case

#: (axis order, flips) of the 48 storages; storage m's axis m is the original axis order[m], reversed if flipped.
STORAGES = [
    (order, flips)
    for order in itertools.permutations(range(3))
    for flips in itertools.product((False, True), repeat=3)
]


def restored(image: sitk.Image, order, flips) -> sitk.Image:
    """The same physical image with its voxel axes stored in another ``order`` and reversed where ``flips``."""
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # indexed (i, j, k)
    array = array.transpose(order)
    array = np.flip(array, axis=[m for m in range(3) if flips[m]])
    out = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    signs = np.where(flips, -1.0, 1.0)
    out.SetDirection((direction[:, list(order)] * signs).ravel().tolist())
    out.SetSpacing([image.GetSpacing()[a] for a in order])
    size = np.asarray(image.GetSize())
    first = np.zeros(3)
    for m, a in enumerate(order):
        first[a] = size[a] - 1 if flips[m] else 0
    out.SetOrigin(geometry.apply(resampling.index_to_world(image), first).tolist())
    return out


def obliqued(image: sitk.Image, rotation: np.ndarray, center: np.ndarray) -> sitk.Image:
    """The image turned rigidly about ``center`` (direction and origin rotated, voxels unchanged)."""
    out = sitk.Image(image)
    out.SetDirection((rotation @ np.asarray(image.GetDirection()).reshape(3, 3)).ravel().tolist())
    out.SetOrigin((center + rotation @ (np.asarray(image.GetOrigin()) - center)).tolist())
    return out


def test_restoring_keeps_every_voxel_in_place():
    image = make_case(3).mr
    order, flips = (2, 0, 1), (True, False, True)
    other = restored(image, order, flips)
    index = np.array([5, 17, 9])
    new_index = [
        int(image.GetSize()[a] - 1 - index[a]) if f else int(index[a])
        for a, f in zip(order, flips, strict=True)
    ]
    assert other.GetPixel(new_index) == image.GetPixel(index.tolist())
    np.testing.assert_allclose(
        other.TransformIndexToPhysicalPoint(new_index), image.TransformIndexToPhysicalPoint(index.tolist())
    )


def rotation_up_to(degrees: float, seed: int) -> np.ndarray:
    """A rotation by ``degrees`` about a random axis."""
    axis = np.random.default_rng(seed).normal(size=3)
    axis /= np.linalg.norm(axis)
    return Rotation.from_rotvec(np.radians(degrees) * axis).as_matrix()


@settings(max_examples=25, deadline=None)
@given(
    degrees=st.floats(0.0, 30.0),
    seed=st.integers(0, 10_000),
    spacing=st.sampled_from([(0.7, 0.7, 3.3), (0.5, 0.4, 1.5), (0.9, 0.9, 0.9), (0.8, 0.85, 0.9)]),
)
def test_frame_is_the_same_for_every_storage(degrees, seed, spacing):
    image = sitk.Image([7, 6, 5], sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(rotation_up_to(degrees, seed).ravel().tolist())
    reference = resampling.mr_frame(image)
    for order, flips in STORAGES:
        np.testing.assert_allclose(resampling.mr_frame(restored(image, order, flips)), reference, atol=1e-9)
    axes = reference[:3, :3]
    assert np.linalg.det(axes) == pytest.approx(1.0)
    if spacing[2] > 1.2 * max(
        spacing[:2]
    ):  # anisotropic: the slices are the coarse axis, as GridSpec expects
        stored_slice_axis = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
        assert abs(axes[:, 2] @ stored_slice_axis) == pytest.approx(1.0)
    else:  # near-isotropic: the axis closest to inferior-superior, pointing superior
        assert axes[2, 2] >= np.cos(np.radians(30)) - 1e-9


def test_frame_of_an_axial_mr_is_its_own_axes():
    """Direction near the identity (the phantoms, the bundled models' training data): the file's own axes."""
    image = sitk.Image([7, 6, 5], sitk.sitkFloat32)
    image.SetSpacing((0.7, 0.7, 3.2))
    direction = geometry.rotation_matrix((2.0, -3.0, 1.5))
    image.SetDirection(direction.ravel().tolist())
    np.testing.assert_array_equal(
        resampling.mr_frame(image)[:3, :3], geometry.orthonormalized(direction)[:3, :3]
    )


def test_slices_follow_the_coarse_axis_whichever_way_it_is_stored():
    """An MR whose 3 mm axis is stored first is sampled with that axis as the grid's slices."""
    image = make_case(4).mr
    first = restored(image, (2, 1, 0), (False, True, False))  # the 3 mm axis is now stored as x
    spec = resampling.GridSpec(image.GetSize()[::-1], image.GetSpacing()[::-1])
    for stored in (image, first):
        axes = resampling.mr_frame(stored)[:3, :3]
        assert abs(axes[:, 2] @ np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]) == pytest.approx(1.0)
    assert spec.spacing[0] == max(image.GetSpacing())


@pytest.fixture(scope="module")
def oblique_pair():
    """A synthetic MR-TRUS pair turned 30° about an oblique axis, a start 3 mm and 8° off, the bundled model."""
    case = make_case(7)
    center = resampling.physical_center(case.mr)
    rotation = rotation_up_to(30.0, 11)
    turn = geometry.homogeneous(rotation, center - rotation @ center)
    mr, trus = obliqued(case.mr, rotation, center), obliqued(case.trus, rotation, center)
    gt = turn @ case.gt @ geometry.invert(turn)
    start = gt @ geometry.RigidTransform((3.0, -2.0, 8.0), (2.0, -2.0, 1.0), center).matrix
    registrar = Registrar.from_checkpoint(None, "cpu", iterations=2)
    registrar.input_check = (
        None  # these images are unlike the phantoms: let the second pass (the refiner) run
    )
    return mr, trus, start, registrar


def test_registration_and_d_score_do_not_depend_on_storage(oblique_pair):
    mr, trus, start, registrar = oblique_pair
    reference = registrar.register(mr, trus, start)
    assert len(reference.steps) == 2 and reference.selected_step == 2  # the refiner's pass is the result
    center = resampling.physical_center(mr)
    points = center + 30.0 * np.array(list(itertools.product((-1.0, 1.0), repeat=3)))  # a 60 mm box
    assert (
        np.linalg.norm(
            geometry.apply(reference.mr_to_trus, points) - geometry.apply(start, points), axis=1
        ).max()
        > 1
    )
    for n, (order, flips) in enumerate(STORAGES):
        trus_order, trus_flips = STORAGES[(7 * n + 5) % len(STORAGES)]  # the TRUS stored another way
        result = registrar.register(restored(mr, order, flips), restored(trus, trus_order, trus_flips), start)
        moved = geometry.apply(result.mr_to_trus, points) - geometry.apply(reference.mr_to_trus, points)
        assert np.linalg.norm(moved, axis=1).max() <= 0.01, (order, flips)
        assert result.d_score == pytest.approx(reference.d_score, abs=1e-4)
        assert result.d_score_before == pytest.approx(reference.d_score_before, abs=1e-4)
