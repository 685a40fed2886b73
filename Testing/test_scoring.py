"""The D statistics behind the D-score: probes, and the contrast that cancels a case's critic offset."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from airreg import resampling, scoring
from airreg.resampling import GridSpec

GRID = GridSpec((4, 20, 20), (3.0, 1.5, 1.5))


class MatchCritic(torch.nn.Module):
    """A stand-in critic: higher when TRUS matches MR, plus a per-instance offset (like a case's offset)."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, mr: torch.Tensor, trus: torch.Tensor) -> torch.Tensor:
        return self.offset - ((mr - trus) ** 2).mean(dim=(1, 2, 3))


def _volume_and_mr():
    rng = np.random.default_rng(0)
    blob = ndimage.gaussian_filter(rng.random((4, 40, 40)), (0, 3, 3)).astype(np.float32)
    volume = torch.from_numpy(blob)[None, None]  # a volume on a 2x finer grid than GRID in-plane
    fine = GridSpec((4, 40, 40), (3.0, 0.75, 0.75))
    from_frame = torch.linalg.inv(torch.as_tensor(fine.index_to_frame())).float()
    mr = resampling.sample(volume, from_frame, GRID)
    return volume, from_frame, mr


def test_probes_are_rigid_and_come_in_inverse_pairs():
    for dof, count in ((3, 6), (6, 12)):
        probes = scoring.probe_matrices(dof)
        assert probes.shape == (count, 4, 4)
        rot = probes[:, :3, :3]
        assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(count, 3, 3), atol=1e-6)
        assert torch.allclose(probes[0::2] @ probes[1::2], torch.eye(4).expand(count // 2, 4, 4), atol=1e-5)


def test_contrast_ignores_a_constant_offset_that_shifts_the_raw_critic():
    volume, from_frame, mr = _volume_and_mr()
    eye = torch.eye(4)[None]
    low = scoring.judge(MatchCritic(0.0), mr, volume, from_frame, eye, GRID, 3)
    high = scoring.judge(MatchCritic(5.0), mr, volume, from_frame, eye, GRID, 3)
    assert torch.allclose(high["critic"] - low["critic"], torch.tensor([5.0]))
    assert torch.allclose(high["contrast"], low["contrast"], atol=1e-6)


def test_contrast_is_highest_at_the_alignment_and_falls_with_misalignment():
    volume, from_frame, mr = _volume_and_mr()
    shifts = [0.0, 2.0, 6.0]
    transforms = resampling.rigid_matrices(torch.tensor([[0.0, s, 0.0] for s in shifts]), 3)
    stats = scoring.judge(
        MatchCritic(0.0),
        mr.expand(3, -1, -1, -1),
        volume.expand(3, -1, -1, -1, -1),
        from_frame,
        transforms,
        GRID,
        3,
    )
    contrast = stats["contrast"].numpy()
    assert contrast[0] > 0  # a correct alignment is a local peak of this critic
    assert contrast[0] > contrast[1] > contrast[2]


def test_only_the_requested_statistics_are_computed():
    volume, from_frame, mr = _volume_and_mr()
    calls = []

    class Counting(MatchCritic):
        def forward(self, mr, trus):
            calls.append(len(mr))
            return super().forward(mr, trus)

    eye = torch.eye(4)[None]
    raw = scoring.judge(Counting(0.0), mr, volume, from_frame, eye, GRID, 3, ("critic",))
    assert set(raw) == {"critic"} and len(calls) == 1  # no probes
    both = scoring.judge(Counting(0.0), mr, volume, from_frame, eye, GRID, 3)
    assert set(both) == {"critic", "contrast"} and calls[1:] == [1, 6]  # one volume: the 6 probes in one pass
    assert torch.equal(raw["critic"], both["critic"])
    with pytest.raises(ValueError, match="unknown D statistics"):
        scoring.judge(Counting(0.0), mr, volume, from_frame, eye, GRID, 3, ("mean",))


def test_probes_in_one_pass_match_probes_one_at_a_time():
    """One volume for the batch (registration) takes all probes in one critic pass; distinct volumes (calibration)
    take them one at a time. Both give the same statistics."""
    volume, from_frame, mr = _volume_and_mr()
    transforms = resampling.rigid_matrices(torch.tensor([[0.0, 1.0, 0.0], [5.0, -2.0, 1.0]]), 3)
    calls = []

    class Counting(MatchCritic):
        def forward(self, mr, trus):
            calls.append(len(mr))
            return super().forward(mr, trus)

    mrs = mr.expand(2, -1, -1, -1)
    shared = scoring.judge(
        Counting(0.3), mrs, volume.expand(2, -1, -1, -1, -1), from_frame, transforms, GRID, 3
    )
    assert calls == [2, 12]
    calls.clear()
    separate = scoring.judge(
        Counting(0.3), mrs, volume.repeat(2, 1, 1, 1, 1), from_frame, transforms, GRID, 3
    )
    assert calls == [2] * 7
    torch.testing.assert_close(shared["contrast"], separate["contrast"], atol=1e-6, rtol=0)
    torch.testing.assert_close(shared["critic"], separate["critic"])
