"""Tests of airreg.resampling: the batched spatial transformer against SimpleITK, and the rigid parametrisation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from airreg import geometry, resampling
from airreg.resampling import GridSpec


def smooth_volume(
    size_xyz=(30, 26, 14),
    spacing=(1.1, 0.8, 2.5),
    origin=(-31.0, 17.5, 40.0),
    angles=(8.0, -5.0, 23.0),
    seed=0,
) -> sitk.Image:
    """An oblique, anisotropic, off-origin volume with smooth content in [0, 1]."""
    rng = np.random.default_rng(seed)
    array = ndimage.gaussian_filter(rng.normal(size=size_xyz[::-1]), sigma=(1.5, 3.0, 3.0))
    array = (array - array.min()) / (array.max() - array.min())
    image = sitk.GetImageFromArray(array.astype(np.float64))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(geometry.rotation_matrix(angles).ravel().tolist())
    return image


def reference_image(spec: GridSpec, frame_to_world: np.ndarray) -> sitk.Image:
    """A SimpleITK image whose voxel grid is the network grid ``spec`` placed by ``frame_to_world``."""
    ref = sitk.Image(list(spec.size[::-1]), sitk.sitkFloat64)
    ref.SetOrigin(geometry.apply(frame_to_world @ spec.index_to_frame(), [0.0, 0.0, 0.0]).tolist())
    ref.SetDirection(frame_to_world[:3, :3].ravel().tolist())
    ref.SetSpacing(list(spec.spacing[::-1]))
    return ref


def grid_indices(spec: GridSpec) -> np.ndarray:
    """(N, 3) grid indices (i, j, k) in the order of a (Z, Y, X) array raveled."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in spec.size], indexing="ij")
    return np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float)


def interior_mask(full_map: np.ndarray, spec: GridSpec, volume: sitk.Image) -> np.ndarray:
    """(Z, Y, X) bool: grid voxels whose sample point is at least one voxel inside the volume."""
    idx = geometry.apply(full_map, grid_indices(spec))
    upper = np.asarray(volume.GetSize(), dtype=float) - 2
    inside = np.all((idx >= 1) & (idx <= upper), axis=1)
    return inside.reshape(spec.size)


def volume_tensor(image: sitk.Image, dtype=torch.float64) -> torch.Tensor:
    return torch.from_numpy(sitk.GetArrayFromImage(image))[None, None].to(dtype)


SPEC = GridSpec((9, 20, 17), (2.0, 1.3, 1.1))


def case_geometry(seed: int = 0):
    """(volume, frame, mr_to_volume, transform_in_frame): all oblique / non-trivial."""
    volume = smooth_volume(seed=seed)
    frame = geometry.frame(
        geometry.rotation_matrix((-6.0, 4.0, 15.0)), resampling.physical_center(volume) + [1.5, -2.0, 0.5]
    )
    mr_to_volume = geometry.RigidTransform((3.0, -2.0, 5.0), (1.0, 2.0, -1.5), (5.0, 5.0, 5.0)).matrix
    in_frame = geometry.RigidTransform.from_vector([2.0, -3.0, 11.0, 1.2, -0.7, 0.9], 6).matrix
    return volume, frame, mr_to_volume, in_frame


@pytest.mark.parametrize("with_transform", [False, True])
def test_sample_matches_simpleitk_resample(with_transform):
    volume, frame, mr_to_volume, in_frame = case_geometry()
    transform = in_frame if with_transform else np.eye(4)
    lmat = resampling.grid_to_volume(resampling.index_to_world(volume), mr_to_volume, frame)
    ours = resampling.sample(
        volume_tensor(volume),
        torch.as_tensor(lmat),
        SPEC,
        torch.as_tensor(transform)[None] if with_transform else None,
    )[0].numpy()

    world_map = mr_to_volume @ geometry.to_world(transform, frame)  # MR world -> volume world
    theirs = sitk.GetArrayFromImage(
        sitk.Resample(volume, reference_image(SPEC, frame), geometry.to_sitk(world_map), sitk.sitkLinear, 0.0)
    )
    mask = interior_mask(lmat @ transform @ SPEC.index_to_frame(), SPEC, volume)
    assert ours.shape == theirs.shape == SPEC.size
    assert mask.mean() > 0.5, "the test geometry should keep most of the grid inside the volume"
    np.testing.assert_allclose(ours[mask], theirs[mask], atol=1e-4)
    assert np.ptp(theirs[mask]) > 0.3  # the comparison is on varied data, not on a flat region


def test_sample_points_outside_read_zero():
    volume, frame, mr_to_volume, _ = case_geometry()
    far = frame.copy()
    far[:3, 3] += 500.0
    lmat = resampling.grid_to_volume(resampling.index_to_world(volume), mr_to_volume, far)
    out = resampling.sample(volume_tensor(volume), torch.as_tensor(lmat), SPEC)
    assert torch.count_nonzero(out) == 0


def test_identity_sampling_reproduces_the_volume():
    volume = smooth_volume(size_xyz=(16, 12, 7), spacing=(0.9, 1.2, 3.0), angles=(0.0, 0.0, 17.0))
    spec = GridSpec(volume.GetSize()[::-1], volume.GetSpacing()[::-1])
    frame = resampling.mr_frame(volume)
    lmat = resampling.grid_to_volume(resampling.index_to_world(volume), np.eye(4), frame)
    out = resampling.sample(volume_tensor(volume), torch.as_tensor(lmat), spec)[0].numpy()
    np.testing.assert_allclose(out, sitk.GetArrayFromImage(volume), atol=1e-5)


def test_batch_equals_per_item():
    vols, lmats, transforms = [], [], []
    for seed in range(3):
        volume, frame, mr_to_volume, in_frame = case_geometry(seed)
        vols.append(volume_tensor(volume))
        lmats.append(
            torch.as_tensor(resampling.grid_to_volume(resampling.index_to_world(volume), mr_to_volume, frame))
        )
        transforms.append(torch.as_tensor(in_frame) if seed != 1 else torch.eye(4, dtype=torch.float64))
    batch = resampling.sample(torch.cat(vols), torch.stack(lmats), SPEC, torch.stack(transforms))
    assert batch.shape == (3, *SPEC.size)
    for b in range(3):
        single = resampling.sample(vols[b], lmats[b], SPEC, transforms[b][None])
        torch.testing.assert_close(batch[b], single[0], rtol=0, atol=1e-6)
    # one volume broadcast over a batch of transforms
    broadcast = resampling.sample(vols[0], lmats[0], SPEC, torch.stack(transforms))
    for b in range(3):
        single = resampling.sample(vols[0], lmats[0], SPEC, transforms[b][None])
        torch.testing.assert_close(broadcast[b], single[0], rtol=0, atol=1e-6)
    assert not torch.allclose(broadcast[0], broadcast[1])


def test_input_not_modified_in_place():
    volume, frame, mr_to_volume, in_frame = case_geometry()
    vol = volume_tensor(volume)
    lmat = torch.as_tensor(resampling.grid_to_volume(resampling.index_to_world(volume), mr_to_volume, frame))
    transform = torch.as_tensor(in_frame)[None]
    copies = [vol.clone(), lmat.clone(), transform.clone()]
    resampling.sample(vol, lmat, SPEC, transform)
    for before, after in zip(copies, [vol, lmat, transform], strict=True):
        assert torch.equal(before, after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_is_kept(dtype):
    volume, frame, mr_to_volume, in_frame = case_geometry()
    lmat = torch.as_tensor(resampling.grid_to_volume(resampling.index_to_world(volume), mr_to_volume, frame))
    reference = resampling.sample(
        volume_tensor(volume, torch.float64), lmat, SPEC, torch.as_tensor(in_frame)[None]
    )
    out = resampling.sample(volume_tensor(volume, dtype), lmat, SPEC, torch.as_tensor(in_frame)[None])
    assert out.dtype == dtype
    assert out.shape == reference.shape
    # bfloat16 also quantises the sampling coordinates (8-bit mantissa): only roughly right
    atol = 0.1 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=atol)


@pytest.mark.parametrize("dof", [3, 6])
def test_gradient_wrt_parameters_is_finite_and_nonzero(dof):
    volume, frame, mr_to_volume, _ = case_geometry()
    lmat = torch.as_tensor(resampling.grid_to_volume(resampling.index_to_world(volume), mr_to_volume, frame))
    target = resampling.sample(volume_tensor(volume, torch.float32), lmat, SPEC)
    start = [4.0, 1.0, -1.0] if dof == 3 else [2.0, -1.5, 4.0, 1.0, -1.0, 0.5]
    params = torch.tensor([start], requires_grad=True)
    out = resampling.sample(
        volume_tensor(volume, torch.float32), lmat, SPEC, resampling.rigid_matrices(params, dof)
    )
    loss = ((out - target) ** 2).mean()
    loss.backward()
    assert params.grad is not None
    assert torch.isfinite(params.grad).all()
    assert (params.grad.abs() > 0).all(), params.grad


def random_params(rng: np.random.Generator, dof: int, n: int) -> np.ndarray:
    rot = rng.uniform(-80, 80, size=(n, 1 if dof == 3 else 3))
    trans = rng.uniform(-20, 20, size=(n, 2 if dof == 3 else 3))
    return np.concatenate([rot, trans], axis=1)


@pytest.mark.parametrize("dof", [3, 6])
def test_rigid_matrices_agree_with_geometry(dof):
    params = random_params(np.random.default_rng(dof), dof, 20)
    ours = resampling.rigid_matrices(torch.as_tensor(params), dof).numpy()
    for p, m in zip(params, ours, strict=True):
        np.testing.assert_allclose(m, geometry.RigidTransform.from_vector(p, dof).matrix, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    dof=st.sampled_from([3, 6]),
    values=st.lists(st.floats(-85, 85), min_size=6, max_size=6),
)
def test_matrix_params_inverts_rigid_matrices(dof, values):
    params = torch.tensor([values[:dof]], dtype=torch.float64)
    back = resampling.matrix_params(resampling.rigid_matrices(params, dof), dof)
    torch.testing.assert_close(back, params, rtol=0, atol=1e-8)


def test_matrix_params_of_3dof_drops_nothing_it_needs():
    params = torch.tensor([[30.0, 4.0, -2.0]], dtype=torch.float64)
    m = resampling.rigid_matrices(params, 3)
    assert torch.allclose(m[0, 2, :3], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    assert m[0, 2, 3] == 0.0  # no through-plane shift in the axial model


@pytest.mark.parametrize("dof", [3, 6])
def test_invert_rigid(dof):
    params = torch.as_tensor(random_params(np.random.default_rng(10 + dof), dof, 8))
    m = resampling.rigid_matrices(params, dof)
    inv = resampling.invert_rigid(m)
    eye = torch.eye(4, dtype=torch.float64).expand(8, 4, 4)
    torch.testing.assert_close(m @ inv, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(inv @ m, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(inv, torch.linalg.inv(m), rtol=0, atol=1e-10)


def test_rigid_matrices_rejects_other_dof():
    with pytest.raises(ValueError):
        resampling.rigid_matrices(torch.zeros(1, 4), 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():  # pragma: no cover - no GPU on the CI machine
    volume, frame, mr_to_volume, in_frame = case_geometry()
    lmat = torch.as_tensor(resampling.grid_to_volume(resampling.index_to_world(volume), mr_to_volume, frame))
    transform = torch.as_tensor(in_frame)[None]
    vol = volume_tensor(volume, torch.float32)
    cpu = resampling.sample(vol, lmat, SPEC, transform)
    gpu = resampling.sample(vol.cuda(), lmat.cuda(), SPEC, transform.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(9, 20, 17), (2, 3, 2)])
def test_affine_grid_equals_torch_and_keeps_the_gradient(size):
    theta = torch.randn(4, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.affine_grid(theta, [4, 1, *size], align_corners=True)
    ours = resampling.affine_grid(theta.requires_grad_(), size)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    ours.sum().backward()
    assert torch.count_nonzero(theta.grad) > 0


@pytest.mark.parametrize("offset", [0.0, 9.0, 15.0, 500.0])
def test_sampling_the_footprint_equals_sampling_the_volume(offset):
    """The crop that the grid's samples can read gives what the whole volume gives; far away: nothing to read."""
    volume, frame, mr_to_volume, _ = case_geometry(2)
    frame = frame.copy()
    frame[:3, 3] += offset  # 9 and 15 mm: the grid partly outside the volume
    lmat = resampling.grid_to_volume(resampling.index_to_world(volume), mr_to_volume, frame)
    array = sitk.GetArrayFromImage(volume)
    box = resampling.footprint(lmat @ SPEC.index_to_frame(), SPEC, array.shape)
    whole = resampling.sample(volume_tensor(volume), torch.as_tensor(lmat), SPEC)
    if box is None:
        assert offset == 500.0 and torch.count_nonzero(whole) == 0
        return
    assert offset != 500.0 and np.prod([s.stop - s.start for s in box]) < array.size
    shift = geometry.homogeneous(np.eye(3), [-box[2].start, -box[1].start, -box[0].start])
    crop = torch.from_numpy(array[box].copy())[None, None]
    cropped = resampling.sample(crop, torch.as_tensor(shift @ lmat), SPEC)
    torch.testing.assert_close(cropped, whole, rtol=0, atol=1e-5)  # float32 sample coordinates
    assert torch.count_nonzero(whole) > 0


def test_footprint_keeps_two_voxels_per_axis():
    """A grid flat along an axis still reads two voxels there (grid_sample reads a 1-voxel axis at its only one)."""
    spec = GridSpec((2, 3, 3), (1e-6, 1.0, 1.0))
    box = resampling.footprint(np.eye(4), spec, (10, 10, 10))
    assert all(s.stop - s.start >= 2 for s in box)


@pytest.mark.parametrize("offset", [0.0, 12.0])
def test_sample_points_equals_sampling_the_transferred_volume(offset):
    """Reading each point's 8 neighbours gives grid_sample's values of the transferred (here: squared) volume."""
    volume, frame, mr_to_volume, _ = case_geometry(4)
    frame = frame.copy()
    frame[:3, 3] += offset  # 12 mm: part of the grid outside the volume reads 0
    lmat = resampling.grid_to_volume(resampling.index_to_world(volume), mr_to_volume, frame)
    array = sitk.GetArrayViewFromImage(volume)
    ours = resampling.sample_points(
        array, lmat @ SPEC.index_to_frame(), SPEC, lambda v: (v**2).astype(np.float32)
    )
    squared = torch.from_numpy(sitk.GetArrayFromImage(volume) ** 2)[None, None]
    expected = resampling.sample(squared, torch.as_tensor(lmat), SPEC)[0].numpy()
    assert ours.dtype == np.float32 and ours.shape == SPEC.size
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert np.ptp(expected) > 0.3 and ((expected == 0).mean() > 0.05 or not offset)
