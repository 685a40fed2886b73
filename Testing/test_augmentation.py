"""Training-time intensity augmentation: changes intensities, keeps geometry, one seeded draw per case."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from airreg import augmentation, distributed
from airreg.config import TrainConfig, preset
from airreg.preprocessing import cache_spec
from airreg.training import CaseCache, Trainer


def _cache(n: int = 5) -> CaseCache:
    """Random MR stacks and TRUS caches in [0, 1]; the TRUS is 0 outside a half-space 'fan'."""
    rng = np.random.default_rng(0)
    model = preset("tiny")
    mr = rng.uniform(0, 1, (n, *model.grid.size)).astype(np.float16)
    trus = rng.uniform(0.05, 1, (n, *cache_spec(model.grid, model.dof).size)).astype(np.float16)
    trus[:, :, : trus.shape[2] // 3] = 0
    points = rng.normal(0, 10, (n, 4, 3)).astype(np.float32)
    return CaseCache([f"c{i}" for i in range(n)], mr, trus, points)


def _trainer(augment: bool) -> Trainer:
    ctx = distributed.DistContext(0, 1, torch.device("cpu"))
    return Trainer(preset("tiny"), TrainConfig(batch_size=8, augment=augment), ctx)


def test_augmented_batch_keeps_geometry_and_changes_intensities():
    cache = _cache()
    plain = _trainer(False).draw_batch(cache, 1, 0, 0)
    augmented = _trainer(True).draw_batch(cache, 1, 0, 0)
    for name in ("points", "perturb", "target", "magnitude", "mix", "case"):
        assert torch.equal(getattr(plain, name), getattr(augmented, name)), name
    assert torch.all(augmented.trus[plain.trus == 0] == 0)
    for name in ("mr", "trus"):
        a, b = getattr(plain, name), getattr(augmented, name)
        assert a.shape == b.shape and b.min() >= 0 and b.max() <= 1
        per_case = (a - b).abs().flatten(1).mean(dim=1)
        assert torch.all(per_case > 1e-3), name  # every case is changed


def test_augmentation_is_seeded_and_off_by_default():
    cache = _cache()
    first, again = (_trainer(True).draw_batch(cache, 2, 3, 1) for _ in range(2))
    assert torch.equal(first.mr, again.mr) and torch.equal(first.trus, again.trus)
    other = _trainer(True).draw_batch(cache, 2, 4, 1)
    assert not torch.equal(first.mr, other.mr)
    assert TrainConfig().augment is False
    assert (
        TrainConfig.from_dict({k: v for k, v in TrainConfig().to_dict().items() if k != "augment"}).augment
        is False
    )


def test_a_share_of_the_batch_gets_the_same_augmentation_as_in_the_whole_batch():
    gen = torch.Generator().manual_seed(5)
    volume = torch.rand(4, 1, 6, 10, 10)
    params = augmentation.draw(gen, 4, augmentation.AugmentSpec(), invertible=True)
    whole = augmentation.apply(volume, params, fan=False)
    halves = [augmentation.apply(volume[s], params.select(s), fan=False) for s in (slice(0, 2), slice(2, 4))]
    assert torch.allclose(torch.cat(halves), whole)


def test_structures_stay_where_they_are():
    """Without noise (and a weak bias), a bright cube thresholded after gamma, bias, blur and inversion covers
    the same voxels."""
    volume = torch.full((3, 1, 8, 24, 24), 0.15)
    volume[:, :, 2:6, 6:16, 8:18] = 0.85
    spec = replace(augmentation.AugmentSpec(), noise=0.0, bias=0.05, invert_mr=1.0)
    params = augmentation.draw(torch.Generator().manual_seed(1), 3, spec, invertible=True)
    before = volume.clone()
    out = augmentation.apply(volume, params, fan=False)
    assert torch.equal(volume, before)  # input not modified
    cube = volume > 0.5
    for i in range(3):
        inside, outside = out[i][cube[i]], out[i][~cube[i]]
        threshold = 0.5 * (inside.median() + outside.median())
        assert torch.equal((out[i] < threshold) == cube[i], torch.ones_like(cube[i]))  # inverted contrast
        assert not torch.allclose(out[i], 1 - volume[i])  # gamma and bias changed the values too


def test_cli_general_preset_turns_augmentation_on(monkeypatch, tmp_path):
    from airreg import cli, training

    seen = []
    monkeypatch.setattr(
        training, "train", lambda data, out, model, cfg, *a, **k: seen.append((model, cfg)) or out
    )
    (tmp_path / "data").mkdir()
    base = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    for extra in ([], ["--preset", "general"], ["--preset", "general", "--no-augment"], ["--augment"]):
        assert cli.main(base + extra) == 0
    assert [cfg.augment for _, cfg in seen] == [False, True, False, True]
    assert seen[1][0] == preset("default")  # the same model as default
