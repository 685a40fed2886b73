"""Adversarial training of AIR-net (paper section 2.2), one code path for 1..N processes (torchrun).

Per iteration, for a batch of cases with their TRUS cached in MR space (see :mod:`airreg.preprocessing`):

* draw a random rigid perturbation ``P`` in the grid frame (±25°, ±5 mm; 3-DOF axial or 6-DOF) on the device;
  the start pair is ``x_start = (MR, TRUS ∘ P)``, the aligned pair ``x_gt = (MR, TRUS)``;
* G estimates θ from ``x_start``; the estimate pair is ``x_est = (MR, TRUS ∘ P ∘ M(θ))``, resampled inside the
  graph (spatial transformer), so G's loss is differentiable through the resampling;
* the critic D is updated ``n_critic`` (2) times with ``L_D = mean D(fakes) - mean D(x_gt)`` and its weights
  clipped to ±0.01 (WGAN); fakes are G's estimates and, with ``d_fakes=all`` (our default, see
  :class:`~airreg.config.DiscriminatorFakes`), also misalignments of random size and gross failures (another
  case's TRUS, swapped modalities, blank TRUS), so that the D-score grades errors and flags gross failures;
* G is updated with ``L_G = -w_adv · mean D(x_est) + λ · ‖θ - θ*‖²``, θ* = parameters of ``P⁻¹``, where the
  rotation error (radians) is multiplied by ``rotation_radius_mm`` so that every term is a distance in mm.

Perturbations and batches are drawn from a generator seeded by (seed, epoch, step) for the *global* batch and
then split by rank, so the same seed gives the same perturbations for any world size and ``--resume`` continues
exactly. Only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import augmentation, data, distributed, preprocessing, resampling, scoring
from . import checkpoint as ckpt
from .config import (
    CriticConstraint,
    CriticObjective,
    DiscriminatorFakes,
    ModelConfig,
    OtherPatientPairs,
    TrainConfig,
)
from .errors import InputError, ModelError
from .fileio import atomic_write, write_text, written_at_once
from .geometry import apply, invert
from .intensity import NormalizationSpec
from .networks import Discriminator, Generator
from .quality import Calibration, auroc

#: TRE recorded for calibration pairs with no meaningful alignment (other patient, blank TRUS).
GROSS_FAILURE_TRE_MM = 30.0
#: TRE (mm) above which an alignment counts as poor when the calibration picks its statistic.
QUALITY_REFERENCE_MM = 5.0
#: Number of target points per case for transform-derived TRE when a case has no landmarks.
MASK_POINTS = 16


# --- the preprocessed-case cache ---------------------------------------------------------------------


@dataclass
class CaseCache:
    """Preprocessed cases as (memory-mapped) arrays shared by all ranks.

    ``mr``: (N, S, H, W) float16; ``trus``: (N, Zc, Yc, Xc) float16 (TRUS aligned into the grid frame by the
    ground truth); ``points``: (N, K, 3) float32 target points in the grid frame (mm), NaN-padded.
    """

    ids: list[str]
    mr: np.ndarray
    trus: np.ndarray
    points: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def batch(
        self, index: np.ndarray, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mr (B,S,H,W), trus (B,1,Zc,Yc,Xc), points (B,K,3)) as float32 tensors on ``device``."""
        order = np.sort(index)  # memmaps read faster in order; restore the requested order afterwards
        back = np.argsort(np.argsort(index))
        mr = torch.from_numpy(np.asarray(self.mr[order], dtype=np.float32)[back])
        trus = torch.from_numpy(np.asarray(self.trus[order], dtype=np.float32)[back])
        pts = torch.from_numpy(np.asarray(self.points[order], dtype=np.float32)[back])
        return mr.to(device), trus[:, None].to(device), pts.to(device)


def target_points(case: data.Case, frame: np.ndarray, seed: int) -> np.ndarray:
    """(K, 3) TRE target points in the grid frame: the MR landmarks, else points in the MR gland mask."""
    if case.landmarks_mr is not None and len(case.landmarks_mr):
        world = case.landmarks_mr
    elif case.mr_mask is not None:
        world = data.points_in_mask(case.mr_mask, MASK_POINTS, seed)
    else:  # no landmarks, no mask: points on a 20 mm sphere around the grid centre
        rng = np.random.default_rng(seed)
        v = rng.normal(size=(MASK_POINTS, 3))
        return (20.0 * v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    return apply(invert(frame), world).astype(np.float32)


def build_cache(
    cases: Sequence[data.Case],
    model: ModelConfig,
    normalization: NormalizationSpec,
    folder: Path,
    progress: bool,
) -> CaseCache:
    """Preprocess cases (ground truth as start) and write them as .npy files in ``folder``; returns the memmaps."""
    folder.mkdir(parents=True, exist_ok=True)
    mr_list, trus_list, pts_list = [], [], []
    for i, case in enumerate(tqdm(cases, desc="preprocessing", disable=not progress, unit="case")):
        if case.gt is None:
            raise InputError(
                f"{case.folder or case.case_id}: training needs a ground-truth transform (gt.tfm)"
            )
        pair = preprocessing.prepare_pair(case.mr, case.trus, case.gt, model.grid, model.dof, normalization)
        mr_list.append(pair.mr.numpy().astype(np.float16))
        trus_list.append(pair.trus_cache.numpy().astype(np.float16))
        pts_list.append(target_points(case, pair.frame, seed=i))
    k = max(len(p) for p in pts_list)
    points = np.full((len(cases), k, 3), np.nan, dtype=np.float32)
    for i, p in enumerate(pts_list):
        points[i, : len(p)] = p
    arrays = {"mr": np.stack(mr_list), "trus": np.stack(trus_list), "points": points}
    (folder / "ids.json").unlink(missing_ok=True)  # ids.json marks a complete cache: written last
    with written_at_once(remove_on_failure=False):  # a working file, kept even when the run's outputs are not
        for name, array in arrays.items():
            atomic_write(folder / f"{name}.npy", lambda tmp, a=array: np.save(tmp, a))
        write_text(folder / "ids.json", json.dumps([c.case_id for c in cases], allow_nan=False))
    return open_cache(folder)


def open_cache(folder: Path) -> CaseCache:
    """Memory-map a cache written by :func:`build_cache` (no copy per rank); a damaged cache is an InputError."""
    try:
        ids = json.loads((folder / "ids.json").read_text())
        load = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("mr", "trus", "points")}
    except (OSError, ValueError) as exc:  # truncated or missing .npy, bad JSON
        raise InputError(
            f"{folder}: damaged training cache ({exc}); delete the folder to rebuild it"
        ) from None
    if not isinstance(ids, list) or any(len(a) != len(ids) for a in load.values()):
        raise InputError(
            f"{folder}: damaged training cache (arrays and ids differ in length); delete the folder"
        )
    return CaseCache(ids, load["mr"], load["trus"], load["points"])


def usable_cache(folder: Path) -> bool:
    """Whether ``folder`` holds a complete cache that opens (a damaged one is rebuilt)."""
    if not (folder / "ids.json").exists():
        return False
    try:
        open_cache(folder)
    except InputError:
        return False
    return True


def content_fingerprint(cases: Sequence[Path]) -> str:
    """A hash of the name, size, modification time and content of every file the cases are read from."""
    digest = hashlib.sha256()
    for case in cases:
        for path in data.case_files(case):
            stat = path.stat()
            name = os.fsencode(path.relative_to(case.parent))  # bytes: a name need not be UTF-8
            digest.update(name + f"|{stat.st_size}|{stat.st_mtime_ns}|".encode())
            with path.open("rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def cache_key(
    model: ModelConfig, normalization: NormalizationSpec, ids: Sequence[str], content: str = ""
) -> str:
    """A short hash of what a cache depends on (``content``: :func:`content_fingerprint` of the cases' files),
    so a stale cache is never reused."""
    text = json.dumps([model.to_dict(), normalization.to_dict(), list(ids), content], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- perturbations, batches and losses ---------------------------------------------------------------


def step_generator(seed: int, epoch: int, step: int, sub: int = 0) -> torch.Generator:
    """A CPU generator for one (epoch, step, sub-step): identical on every rank and on resume."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch * 10_007 + step * 17 + sub)


def draw_perturbations(
    gen: torch.Generator, n: int, dof: int, rotation_deg: float, translation_mm: float
) -> torch.Tensor:
    """(n, dof) parameters uniform in ±rotation_deg / ±translation_mm (3-DOF: γ, tx, ty)."""
    u = torch.rand(n, dof, generator=gen) * 2 - 1
    scale = torch.tensor([rotation_deg] * (1 if dof == 3 else 3) + [translation_mm] * (2 if dof == 3 else 3))
    return u * scale


def shard(values: torch.Tensor | np.ndarray, ctx: distributed.DistContext):
    """This rank's contiguous share of a global batch (equal shares; the global batch is a multiple of world)."""
    per_rank = len(values) // ctx.world_size
    return values[ctx.rank * per_rank : (ctx.rank + 1) * per_rank]


def parameter_distance(theta: torch.Tensor, target: torch.Tensor, dof: int, radius_mm: float) -> torch.Tensor:
    """Mean over the batch of the squared parameter error, rotations converted to mm at ``radius_mm``."""
    n_rot = 1 if dof == 3 else 3
    weight = torch.tensor(
        [math.radians(1.0) * radius_mm] * n_rot + [1.0] * (dof - n_rot), device=theta.device
    )
    return (((theta - target) * weight) ** 2).sum(dim=1).mean()


def tre_in_frame(error: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(B,) mean distance (mm) that (B, 4, 4) residual transforms move (B, K, 3) target points (NaN ignored)."""
    moved = points @ error[:, :3, :3].transpose(1, 2) + error[:, None, :3, 3]
    dist = (moved - points).norm(dim=2)
    return torch.nanmean(dist, dim=1)


@dataclass
class Batch:
    """One training batch on the device; ``perturb``: (B,4,4) matrices P; ``target``: params of P⁻¹."""

    mr: torch.Tensor
    trus: torch.Tensor
    points: torch.Tensor
    perturb: torch.Tensor
    target: torch.Tensor
    magnitude: torch.Tensor  # (B,) in [0, 2): size of the graded misalignments shown to D
    mix: torch.Tensor  # (B,) in [0, 1): interpolation weights of the gradient penalty
    case: torch.Tensor  # (B,) cache indices of the cases (a draw may repeat a case)


class Trainer:
    """Holds the networks, optimisers and cache of one training run."""

    def __init__(
        self,
        model: ModelConfig,
        train: TrainConfig,
        ctx: distributed.DistContext,
        normalization: NormalizationSpec | None = None,
    ) -> None:
        self.model, self.cfg, self.ctx = model, train, ctx
        self.normalization = normalization or NormalizationSpec()
        torch.manual_seed(train.seed)  # identical initial weights on every rank
        self.g = Generator(model).to(ctx.device)
        self.d = Discriminator(model).to(ctx.device)
        self.g_ddp: nn.Module = self.g
        self.d_ddp: nn.Module = self.d
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.g_ddp = DistributedDataParallel(self.g, device_ids=ids)
            self.d_ddp = DistributedDataParallel(self.d, device_ids=ids)
        if train.compile:
            self.g_ddp, self.d_ddp = torch.compile(self.g_ddp), torch.compile(self.d_ddp)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=train.lr_g, betas=(0.5, 0.999))
        self.opt_d = (
            torch.optim.Adam(self.d.parameters(), lr=train.lr_d, betas=(0.5, 0.9))
            if train.critic_constraint == CriticConstraint.GP
            else torch.optim.RMSprop(self.d.parameters(), lr=train.lr_d)
        )
        self.epoch = 0
        self.history: list[dict] = []
        self.calibration: Calibration | None = None
        self.init_from: dict | None = None  # the model a fine-tune started from (name, sha256)

    # -- batches

    def draw_batch(self, cache: CaseCache, epoch: int, step: int, sub: int) -> Batch:
        """This rank's share of the seeded global batch, with perturbations, on the device."""
        gen = step_generator(self.cfg.seed, epoch, step, sub)
        global_bs = self.global_batch_size
        index = torch.randint(len(cache), (global_bs,), generator=gen).numpy()
        params = draw_perturbations(
            gen, global_bs, self.model.dof, self.cfg.rotation_deg, self.cfg.translation_mm
        )
        magnitude = shard(torch.rand(global_bs, generator=gen) * 2, self.ctx).to(self.ctx.device)
        mix = shard(torch.rand(global_bs, generator=gen), self.ctx).to(self.ctx.device)
        index, params = shard(index, self.ctx), shard(params, self.ctx).to(self.ctx.device)
        mr, trus, pts = cache.batch(index, self.ctx.device)
        if self.cfg.augment:
            mr, trus = self.augment(gen, mr, trus)
        perturb = resampling.rigid_matrices(params, self.model.dof)
        target = resampling.matrix_params(resampling.invert_rigid(perturb), self.model.dof)
        case = torch.as_tensor(index, device=self.ctx.device)
        return Batch(mr, trus, pts, perturb, target, magnitude, mix, case)

    def augment(self, gen: torch.Generator, mr: torch.Tensor, trus: torch.Tensor):
        """This rank's share of one intensity-augmentation draw per case of the global batch (MR, TRUS cache)."""
        n, spec = self.global_batch_size, augmentation.AugmentSpec()
        share = slice(self.ctx.rank * len(mr), (self.ctx.rank + 1) * len(mr))
        mr_draw = augmentation.draw(gen, n, spec, invertible=True).select(share)
        trus_draw = augmentation.draw(gen, n, spec, invertible=False).select(share)
        return augmentation.apply(mr, mr_draw, fan=False), augmentation.apply(trus, trus_draw, fan=True)

    @property
    def global_batch_size(self) -> int:
        w = self.ctx.world_size
        return max(w, (self.cfg.batch_size // w) * w)

    def sample(self, trus: torch.Tensor, transform: torch.Tensor | None) -> torch.Tensor:
        return preprocessing.sample_trus(trus, self.model.grid, self.model.dof, transform)

    def autocast(self):
        # torch.autocast raises on CUDA devices without bf16 (pre-Ampere); they run in float32
        enabled = self.cfg.amp and self.ctx.device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=enabled)

    # -- updates

    def estimates(self, b: Batch, count: int) -> torch.Tensor:
        """TRUS stacks resampled through G's estimates from the perturbed starts, for the first ``count`` items."""
        trus, start = b.trus[:count], b.perturb[:count]
        return self.sample(trus, start @ self.estimate(b.mr[:count], trus, start))

    def estimate(
        self, mr: torch.Tensor, trus: torch.Tensor, start: torch.Tensor, generator: nn.Module | None = None
    ) -> torch.Tensor:
        """G's correction (B,4,4) of the ``start`` transforms that register the TRUS volumes to ``mr``;
        ``generator`` (default: the training wrapper of G) lets one rank run the plain G alone."""
        theta = (generator or self.g_ddp)(mr, self.sample(trus, start)).float()
        return resampling.rigid_matrices(theta, self.model.dof)

    def fakes(self, b: Batch, x_gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(MR, TRUS) stacks shown to D as misaligned (see :class:`DiscriminatorFakes`); ``x_gt`` is the aligned TRUS.

        ``all``: a quarter G's estimates, half misalignments of random size (0 to 2x the perturbation range, so
        the critic learns a graded score rather than a yes/no), a quarter gross failures cycling through another
        case's TRUS, swapped modalities and a blank TRUS. Only the stacks that are shown are computed.
        """
        n = b.mr.shape[0]
        if self.cfg.d_fakes == DiscriminatorFakes.ESTIMATES:
            return b.mr, self.estimates(b, n)
        n_est, n_graded = max(1, n // 4), max(1, n // 2)
        graded = slice(n_est, n_est + n_graded)
        misalign = resampling.rigid_matrices(b.target[graded] * b.magnitude[graded, None], self.model.dof)
        mr_parts = [b.mr[:n_est], b.mr[graded]]
        trus_parts = [self.estimates(b, n_est), self.sample(b.trus[graded], misalign)]
        other = torch.roll(x_gt, 1, dims=0)
        for i in range(n_est + n_graded, n):
            kind = i % 3  # another case's TRUS, swapped modalities, blank TRUS
            mr_parts.append(x_gt[i : i + 1] if kind == 1 else b.mr[i : i + 1])
            trus_parts.append((other, b.mr, torch.zeros_like(x_gt))[kind][i : i + 1])
        return torch.cat(mr_parts), torch.cat(trus_parts)

    def critic_step(self, b: Batch) -> dict:
        """One critic update, Lipschitz by weight clipping or a gradient penalty; returns its losses."""
        with torch.no_grad(), self.autocast():
            x_gt = self.sample(b.trus, None)
            fake_mr, fake_trus = self.fakes(b, x_gt)
        n = b.mr.shape[0]
        mr, trus = [b.mr, fake_mr], [x_gt, fake_trus]
        penalised = self.cfg.critic_constraint == CriticConstraint.GP
        if penalised:  # interpolates go through the same (single) forward pass, as DDP expects
            w = b.mix[:, None, None, None]
            mixed = (
                (w * b.mr + (1 - w) * fake_mr).requires_grad_(),
                (w * x_gt + (1 - w) * fake_trus).requires_grad_(),
            )
            mr.append(mixed[0])
            trus.append(mixed[1])
        with self.autocast():
            critic = self.d_ddp(torch.cat(mr), torch.cat(trus)).float()
        distance = critic[n : 2 * n].mean() - critic[:n].mean()
        logs = {"wasserstein": -distance.item()}
        loss = distance
        if penalised:
            grads = torch.autograd.grad(critic[2 * n :].sum(), mixed, create_graph=True)
            norm = torch.sqrt(sum(g.float().pow(2).flatten(1).sum(1) for g in grads) + 1e-12)
            penalty = ((norm - 1) ** 2).mean()
            loss = distance + self.cfg.gp_weight * penalty
            logs["gradient_penalty"] = penalty.item()
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        if not penalised:
            with torch.no_grad():
                for p in self.d.parameters():
                    p.clamp_(-self.cfg.clip, self.cfg.clip)
        return {"loss_d": loss.item(), **logs}

    def ranking_pairs(
        self, b: Batch, other_patient: OtherPatientPairs = OtherPatientPairs.AS_GIVEN
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The pairs of alignments the ranking step orders: ((MR, TRUS) stacks, a's then b's; TRE a; TRE b).

        Pair k is mostly case k's graded misalignment (0 to 2x the perturbation range) against the perturbed
        start of case k-1. Another patient's TRUS counts as a TRE of ``GROSS_FAILURE_TRE_MM`` (ranked below
        every real alignment; if the draw repeated the case, its true TRE): one pair in eight holds case k-2's
        TRUS as given against case k-1's MR. With ``other_patient="registered"`` one pair in four also holds case
        k's MR with case k-1's TRUS registered by G from its perturbed start, against case k's graded
        misalignment or (every other one) G's registration of case k's own TRUS (see
        :class:`~airreg.config.OtherPatientPairs`).
        """
        n = b.mr.shape[0]
        k = torch.arange(n, device=b.mr.device)
        if other_patient == OtherPatientPairs.REGISTERED:
            as_given, registered = k[1::8], k[3::4]
        else:
            as_given, registered = k[7::8], k[:0]
        moved_a = resampling.rigid_matrices(b.target * b.magnitude[:, None], self.model.dof)
        mr_b, trus_b = (k - 1) % n, (k - 1) % n  # the batch items whose MR and TRUS make pair b
        moved_b = b.perturb[trus_b]
        trus_b[as_given] = (as_given - 2) % n
        moved_b[as_given] = torch.eye(4, device=k.device)
        if len(registered):
            own = registered[::2]
            mr_b[registered] = registered
            start = moved_b[registered]
            moved_b[registered] = start @ self.estimate(b.mr[registered], b.trus[registered - 1], start)
            moved_a[own] = b.perturb[own] @ self.estimate(b.mr[own], b.trus[own], b.perturb[own])
        tre_a = tre_in_frame(moved_a, b.points)
        tre_b = tre_in_frame(moved_b, b.points[trus_b])
        tre_b[b.case[mr_b] != b.case[trus_b]] = GROSS_FAILURE_TRE_MM
        stacks = (
            torch.cat([b.mr, b.mr[mr_b]]),
            torch.cat([self.sample(b.trus, moved_a), self.sample(b.trus[trus_b], moved_b)]),
        )
        return stacks, tre_a, tre_b

    def ranking_step(self, b: Batch, other_patient: OtherPatientPairs = OtherPatientPairs.AS_GIVEN) -> dict:
        """One critic update that orders alignments by TRE across cases (RankNet, pairs from
        :meth:`ranking_pairs`); returns loss and accuracy. The loss is the cross-entropy of
        ``sigmoid(D(a) - D(b))`` against ``TRE(a) < TRE(b)``, so a higher D means a smaller error whatever the
        case."""
        n = b.mr.shape[0]
        with torch.no_grad(), self.autocast():
            (mr, trus), tre_a, tre_b = self.ranking_pairs(b, other_patient)
        with self.autocast():
            critic = self.d_ddp(mr, trus).float()
        margin, better = critic[:n] - critic[n:], (tre_a < tre_b).float()
        loss = F.binary_cross_entropy_with_logits(margin, better)
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        accuracy = ((margin > 0).float() == better).float().mean()
        return {"loss_d": loss.item(), "rank_accuracy": accuracy.item()}

    def generator_step(self, b: Batch) -> dict:
        """One generator update through the spatial transformer; returns its losses and the batch TRE."""
        self.d.requires_grad_(False)
        try:
            with self.autocast():
                x_start = self.sample(b.trus, b.perturb)
                theta = self.g_ddp(b.mr, x_start).float()
                estimate = resampling.rigid_matrices(theta, self.model.dof)
                x_est = self.sample(b.trus, b.perturb @ estimate)
                adversarial = -self.d(b.mr, x_est).float().mean()
            param = parameter_distance(theta, b.target, self.model.dof, self.cfg.rotation_radius_mm)
            loss = self.cfg.adversarial_weight * adversarial + self.cfg.lambda_param * param
            self.opt_g.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_g.step()
        finally:
            self.d.requires_grad_(True)
        tre = tre_in_frame(b.perturb @ estimate.detach(), b.points).mean()
        return {
            "loss_g": loss.item(),
            "loss_adv": adversarial.item(),
            "loss_param": param.item(),
            "train_tre": tre.item(),
        }

    def set_learning_rates(self, epoch: int) -> None:
        """Cosine decay from the configured rates to 5 % of them at the last epoch (or constant rates), times a
        linear warm-up over the first ``lr_warmup_epochs``."""
        factor = 1.0
        if self.cfg.cosine_lr and self.cfg.epochs > 1:
            factor = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / (self.cfg.epochs - 1)))
        if epoch <= self.cfg.lr_warmup_epochs:
            factor *= epoch / (self.cfg.lr_warmup_epochs + 1)
        for opt, base in ((self.opt_g, self.cfg.lr_g), (self.opt_d, self.cfg.lr_d)):
            for group in opt.param_groups:
                group["lr"] = base * factor

    def train_epoch(self, cache: CaseCache, epoch: int, steps: int, progress: bool) -> dict:
        """Run one epoch; returns the epoch's mean losses (averaged over ranks) and timing."""
        self.g.train()
        self.d.train()
        self.set_learning_rates(epoch)
        sums: dict[str, float] = {}
        wait = 0.0
        start = time.perf_counter()
        bar = tqdm(
            range(steps), desc=f"epoch {epoch}", disable=not (progress and self.ctx.is_main), unit="it"
        )
        for step in bar:
            logs: dict[str, float] = {}
            for sub in range(self.cfg.n_critic + 1):
                t0 = time.perf_counter()
                b = self.draw_batch(cache, epoch, step, sub)
                wait += time.perf_counter() - t0
                logs.update(self.critic_step(b) if sub < self.cfg.n_critic else self.generator_step(b))
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(tre=f"{logs['train_tre']:.2f}", d=f"{logs['loss_d']:.4f}")
        keys = sorted(sums)
        totals = distributed.all_reduce_sum(
            self.ctx, torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        )
        out = {k: float(v) / (steps * self.ctx.world_size) for k, v in zip(keys, totals, strict=True)}
        seconds = time.perf_counter() - start
        out.update(seconds=seconds, data_wait_fraction=wait / max(seconds, 1e-9))
        return out

    # -- validation and calibration

    @torch.no_grad()
    def validate(self, cache: CaseCache, per_case: int = 4) -> dict:
        """One G pass from seeded perturbations on the validation cases: TRE and critic before/after."""
        self.g.eval()
        self.d.eval()
        n = len(cache)
        gen = step_generator(self.cfg.seed + 1, 0, 0)
        index = np.repeat(np.arange(n), per_case)
        params = draw_perturbations(
            gen, len(index), self.model.dof, self.cfg.rotation_deg, self.cfg.translation_mm
        )
        stats = torch.zeros(5, dtype=torch.float64)
        mine = np.arange(len(index))[self.ctx.rank :: self.ctx.world_size]
        for chunk in np.array_split(mine, max(1, math.ceil(len(mine) / 64))):
            if len(chunk) == 0:
                continue
            mr, trus, pts = cache.batch(index[chunk], self.ctx.device)
            perturb = resampling.rigid_matrices(params[chunk].to(self.ctx.device), self.model.dof)
            x_start = self.sample(trus, perturb)
            estimate = resampling.rigid_matrices(self.g(mr, x_start), self.model.dof)
            x_est = self.sample(trus, perturb @ estimate)
            stats += (
                torch.stack(
                    [
                        tre_in_frame(perturb, pts).sum(),
                        tre_in_frame(perturb @ estimate, pts).sum(),
                        self.d(mr, self.sample(trus, None)).sum(),
                        self.d(mr, x_est).sum(),
                        torch.tensor(float(len(chunk))),
                    ]
                )
                .double()
                .cpu()
            )
        stats = distributed.all_reduce_sum(self.ctx, stats)
        count = stats[4].item()
        return {
            "val_tre_before": stats[0].item() / count,
            "val_tre_after": stats[1].item() / count,
            "val_critic_aligned": stats[2].item() / count,
            "val_critic_estimate": stats[3].item() / count,
        }

    @torch.no_grad()
    def calibrate(
        self,
        cache: CaseCache,
        per_case: int = 24,
        other_patient: OtherPatientPairs = OtherPatientPairs.AS_GIVEN,
        statistic: str | None = None,
    ) -> Calibration:
        """Quality statistics and TRE on validation cases over misalignments from none to twice the training
        range, G's estimates and gross failures (with ``other_patient="registered"`` also another patient's
        TRUS registered by G); keeps ``statistic``, or (None) the one that best flags TRE > 5 mm (scoring.py)."""
        if statistic is not None and statistic not in scoring.STATISTICS:
            raise InputError(f"statistic must be one of {', '.join(scoring.STATISTICS)}, got {statistic!r}")
        self.g.eval()
        self.d.eval()
        grid, dof = self.model.grid, self.model.dof
        from_cache = torch.as_tensor(preprocessing.cache_to_index(grid, dof), device=self.ctx.device)
        from_stack = torch.linalg.inv(torch.as_tensor(grid.index_to_frame(), device=self.ctx.device))
        gen = step_generator(self.cfg.seed + 2, 0, 0)
        values: dict[str, list] = {name: [] for name in scoring.STATISTICS}
        tre = []

        def record(mr, volume, lmat, transforms, errors) -> None:
            stats = scoring.judge(self.d, mr, volume, lmat.float(), transforms, grid, dof)
            for name in scoring.STATISTICS:
                values[name].append(stats[name].cpu())
            tre.append(errors.cpu())

        with torch.no_grad():
            for i in range(len(cache)):
                mr, trus, pts = cache.batch(np.full(per_case, i), self.ctx.device)
                magnitude = torch.linspace(0.0, 2.0, per_case)[:, None]
                params = draw_perturbations(
                    gen, per_case, dof, self.cfg.rotation_deg, self.cfg.translation_mm
                )
                perturb = resampling.rigid_matrices((params * magnitude).to(self.ctx.device), dof)
                estimate = perturb @ self.estimate(mr, trus, perturb, self.g)
                for transform in (perturb, estimate):
                    record(mr, trus, from_cache, transform, tre_in_frame(transform, pts))
                eye = torch.eye(4, device=self.ctx.device)[None]
                gross_tre = torch.tensor([GROSS_FAILURE_TRE_MM])
                other = cache.batch(np.array([(i + 1) % len(cache)]), self.ctx.device)[1]
                record(mr[:1], other, from_cache, eye, gross_tre)  # another patient's TRUS
                if other_patient == OtherPatientPairs.REGISTERED:
                    start = perturb[per_case // 2 :][:1]  # ... registered by G from a perturbed start
                    moved = start @ self.estimate(mr[:1], other, start, self.g)
                    record(mr[:1], other, from_cache, moved, gross_tre)
                record(mr[:1], torch.zeros_like(trus[:1]), from_cache, eye, gross_tre)  # blank TRUS
                swapped_mr = self.sample(trus[:1], None)  # TRUS given as MR and MR as TRUS
                record(swapped_mr, mr[:1, None], from_stack, eye, gross_tre)
        t = torch.cat(tre).numpy()
        choices = {}
        for name in scoring.STATISTICS:
            c = torch.cat(values[name]).numpy()
            keep = np.isfinite(c) & np.isfinite(t)
            choices[name] = (auroc(-c[keep], t[keep] > QUALITY_REFERENCE_MM), c[keep], t[keep])
        name = statistic or max(choices, key=lambda k: choices[k][0])
        _, c, t = choices[name]
        return Calibration(tuple(c.tolist()), tuple(t.tolist()), statistic=name)

    # -- checkpoints

    def state(self, extra: dict | None = None, with_optimizers: bool = True) -> dict:
        """A checkpoint dict (see :mod:`airreg.checkpoint`)."""
        state = {
            "model_config": self.model.to_dict(),
            "train_config": self.cfg.to_dict(),
            "preprocessing": {
                "normalization": self.normalization.to_dict(),
                "grid_center": "mr_volume_center",
            },
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "generator": self.g.state_dict(),
            "discriminator": self.d.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "metadata": extra or {},
        }
        if with_optimizers:
            state.update(optimizer_g=self.opt_g.state_dict(), optimizer_d=self.opt_d.state_dict())
        return state

    def load_state(self, state: dict, where: str) -> None:
        """Resume from a training checkpoint of the same model configuration."""
        if state["model_config"] != self.model.to_dict():
            raise ModelError(
                f"{where}: checkpoint was trained with another model configuration (preset, grid or dof)"
            )
        self.g.load_state_dict(state["generator"])
        self.d.load_state_dict(state["discriminator"])
        if "optimizer_g" not in state:
            raise ModelError(
                f"{where}: checkpoint has no optimiser state (an exported model cannot be resumed)"
            )
        try:  # the schema checked types, not whether the optimiser state fits these parameters
            self.opt_g.load_state_dict(state["optimizer_g"])
            self.opt_d.load_state_dict(state["optimizer_d"])
            self.epoch = int(state["epoch"])
            self.history = list(state["history"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ModelError(
                f"{where}: the optimiser state or epoch cannot be resumed ({type(exc).__name__})"
            ) from exc
        self.normalization = NormalizationSpec.from_dict(state["preprocessing"]["normalization"])
        self.init_from = state.get("metadata", {}).get("init_from")

    def initialize_from(self, state: dict, where: str) -> None:
        """Start from a trained model's G, D and normalisation (a fine-tune); not its optimisers, epoch or
        calibration: the run is a new one."""
        where = state.get("path", where)
        if state["model_config"] != self.model.to_dict():
            raise ModelError(
                f"{where}: the model to start from has another model configuration (preset, grid or dof) than "
                "this run; pass the --preset and --dof it was trained with"
            )
        self.g.load_state_dict(state["generator"])
        self.d.load_state_dict(state["discriminator"])
        self.normalization = NormalizationSpec.from_dict(state["preprocessing"]["normalization"])
        self.init_from = {"model": Path(where).name, "sha256": state.get("sha256", "")}


# --- the whole run -----------------------------------------------------------------------------------


def split_caches(
    root: Path, out: Path, trainer: Trainer, progress: bool, subsets: tuple[str, ...] = ("train", "val")
) -> list[CaseCache]:
    """Read the dataset, split it by case (seeded 5:1), and build or reuse the caches of the named subsets."""
    ctx, cfg = trainer.ctx, trainer.cfg
    folders = data.list_cases(root)
    if len(folders) < 2:
        raise InputError(f"{root}: training needs at least 2 cases, found {len(folders)}")
    ids = [f.name for f in folders]
    train_ids, val_ids = data.split_cases(ids, cfg.val_fraction, cfg.seed)
    caches = []
    for name, subset in (("train", train_ids), ("val", val_ids)):
        if name not in subsets:
            continue
        chosen = [f for f in folders if f.name in set(subset)]
        key = cache_key(trainer.model, trainer.normalization, subset, content_fingerprint(chosen))
        folder = out / "cache" / f"{name}-{key}"
        if ctx.is_main and not usable_cache(folder):
            cases = [
                data.read_case(f, require_gt=True)
                for f in tqdm(chosen, desc=f"reading {name}", disable=not progress)
            ]
            build_cache(cases, trainer.model, trainer.normalization, folder, progress)
        # not a bare barrier: building a large cache may outlast the process group's timeout
        distributed.wait_for_file(ctx, folder / "ids.json")
        caches.append(open_cache(folder))
    return caches


def write_history_csv(path: Path, history: list[dict]) -> None:
    """Per-epoch (or per-step) metric rows as one CSV, written atomically."""
    keys = sorted({k for row in history for k in row})

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)


def write_logs(out: Path, history: list[dict]) -> None:
    """Training log as CSV and the loss curves (paper Fig. 2) as PNG."""
    from .plotting import loss_curves

    write_history_csv(out / "log.csv", history)
    loss_curves(history, out / "loss_curves.png")


def train(
    data_root: Path,
    out: Path,
    model: ModelConfig,
    cfg: TrainConfig,
    resume: Path | None = None,
    device: str = "auto",
    progress: bool = True,
    init_from: Path | str | None = None,
) -> Path:
    """Train AIR-net on a dataset of case folders; returns the path of the exported model (rank 0's file).

    ``init_from`` (a model file or a bundled model's name) starts from that model's weights, for fine-tuning
    (see :func:`airreg.config.fine_tune_schedule`); ``resume`` continues a run, fine-tune or not, and wins.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    ctx = distributed.init(device)
    try:
        trainer = Trainer(model, cfg, ctx)
        if resume is not None:
            trainer.load_state(ckpt.load(resume, map_location=ctx.device), str(resume))
        elif init_from is not None:
            trainer.initialize_from(ckpt.load(init_from, map_location=ctx.device), str(init_from))
        out.mkdir(parents=True, exist_ok=True)
        train_cache, val_cache = split_caches(Path(data_root), out, trainer, progress)
        steps = cfg.steps_per_epoch or max(1, math.ceil(len(train_cache) / trainer.global_batch_size))
        best = min((row["val_tre_after"] for row in trainer.history), default=math.inf)
        for epoch in range(trainer.epoch + 1, cfg.epochs + 1):
            row = {"epoch": epoch, **trainer.train_epoch(train_cache, epoch, steps, progress)}
            row.update(trainer.validate(val_cache))
            trainer.epoch = epoch
            trainer.history.append(row)
            if ctx.is_main:
                meta = {"train_cases": len(train_cache), "val_cases": len(val_cache)}
                if trainer.init_from is not None:
                    meta["init_from"] = trainer.init_from
                ckpt.save(out / "last.pt", trainer.state(meta))
                if row["val_tre_after"] < best:
                    best = row["val_tre_after"]
                    ckpt.save(out / "best.pt", trainer.state(meta))
                write_logs(out, trainer.history)
                tqdm.write(
                    f"epoch {epoch}: val TRE {row['val_tre_before']:.2f} -> {row['val_tre_after']:.2f} mm, "
                    f"loss_d {row['loss_d']:.4f}, {row['seconds']:.0f} s"
                )
        distributed.barrier(ctx)
        final = out / "model.pt"
        if ctx.is_main:
            best_path = out / "best.pt" if (out / "best.pt").exists() else out / "last.pt"
            state = ckpt.load(best_path, map_location=ctx.device)
            trainer.g.load_state_dict(state["generator"])
            trainer.d.load_state_dict(state["discriminator"])
            trainer.calibration = trainer.calibrate(val_cache)
            exported = trainer.state(
                {**state["metadata"], "selected_epoch": state["epoch"]}, with_optimizers=False
            )
            exported["epoch"], exported["history"] = state["epoch"], trainer.history
            ckpt.save(final, exported)
        distributed.barrier(ctx)
        return final
    finally:
        distributed.shutdown(ctx)


def trainer_from_state(
    state: dict, ctx: distributed.DistContext, cfg: TrainConfig | None = None, load_critic: bool = True
) -> Trainer:
    """A trainer with a checkpoint's model, normalisation and G (and D unless ``load_critic`` is False: the
    trainer's seeded new critic); ``cfg`` replaces the checkpoint's training configuration."""
    trainer = Trainer(
        ModelConfig.from_dict(state["model_config"]),
        cfg or TrainConfig.from_dict(state["train_config"]),
        ctx,
        NormalizationSpec.from_dict(state["preprocessing"]["normalization"]),
    )
    trainer.g.load_state_dict(state["generator"])
    if load_critic:
        trainer.d.load_state_dict(state["discriminator"])
    return trainer


def frozen_generator_trainer(state: dict, device: str, load_critic: bool = True, **changes) -> Trainer:
    """A one-process trainer with a checkpoint's networks and G frozen, for training what judges G's
    registrations (the critic refinement, the patient check); ``changes`` replace training settings."""
    cfg = replace(TrainConfig.from_dict(state["train_config"]), **changes)
    ctx = distributed.DistContext(0, 1, distributed.select_device(device))
    trainer = trainer_from_state(state, ctx, cfg, load_critic)
    trainer.g.requires_grad_(False)
    return trainer


def recalibrate(
    model: Path,
    data_root: Path,
    out: Path,
    split: str = "val",
    device: str = "auto",
    progress: bool = True,
    statistic: str | None = None,
) -> Path:
    """Recompute a model's quality calibration and write the model with it to ``out``.

    ``split="val"`` uses the validation cases of the training split of ``data_root`` (the same seeded 5:1 split,
    so no training case is used); ``split="all"`` uses every case, for a separate calibration set. The cache is
    kept beside ``out``. ``statistic`` fixes D's statistic (``critic``: D's raw value, one critic pass per
    alignment); None keeps the one that flags best.
    """
    if split not in ("val", "all"):
        raise InputError(f"split must be 'val' or 'all', got {split!r}")
    state = ckpt.load(model)
    trainer = trainer_from_state(state, distributed.DistContext(0, 1, distributed.select_device(device)))
    if split == "val":
        cache = split_caches(
            Path(data_root), out.parent / f"{out.stem}-calibration", trainer, progress, ("val",)
        )[0]
    else:
        cases = data.load_dataset(Path(data_root), require_gt=True, progress=progress)
        content = content_fingerprint(data.list_cases(Path(data_root)))
        key = cache_key(trainer.model, trainer.normalization, [c.case_id for c in cases], content)
        folder = out.parent / f"{out.stem}-calibration" / "cache" / f"all-{key}"
        cache = (
            open_cache(folder)
            if usable_cache(folder)
            else build_cache(cases, trainer.model, trainer.normalization, folder, progress)
        )
    calibration = trainer.calibrate(cache, other_patient=refined_other_patient(state), statistic=statistic)
    exported = ckpt.export_for_inference(state)
    exported["calibration"] = calibration.to_dict()
    exported["metadata"] = {
        **state.get("metadata", {}),
        "calibration_cases": len(cache),
        "calibration_split": split,
    }
    return ckpt.save(out, exported)


def refined_other_patient(state: dict) -> OtherPatientPairs:
    """How a model's critic refinement showed D another patient's TRUS (as given if it had none), so that a
    recalibration uses the same gross failures."""
    refinement = state.get("metadata", {}).get("critic_refinement") or {}
    return OtherPatientPairs(refinement.get("other_patient", OtherPatientPairs.AS_GIVEN.value))


def quality_auroc(calibration: Calibration) -> float:
    """AUROC with which a calibration's statistic flags TRE > 5 mm (higher statistic = better alignment)."""
    c, t = np.array(calibration.critic), np.array(calibration.tre_mm)
    return auroc(-c, t > QUALITY_REFERENCE_MM)


def refine_critic(
    model: Path,
    data_root: Path,
    out: Path,
    steps: int,
    objective: CriticObjective = CriticObjective.RANK,
    constraint: CriticConstraint = CriticConstraint.GP,
    lr_d: float = 1e-4,
    batch_size: int = 32,
    fresh: bool = False,
    check_every: int = 500,
    device: str = "auto",
    progress: bool = True,
    other_patient: OtherPatientPairs = OtherPatientPairs.AS_GIVEN,
) -> Path:
    """Train D alone against the frozen G of a trained model, recalibrate it, and write the model to ``out``.

    The adversarially trained critic separates aligned pairs from G's outputs, but nothing in its loss makes
    its values comparable across cases, which a quality flag needs. Trained afterwards with G fixed (same
    train/validation split, draws never used in training) on ``objective`` (see
    :class:`~airreg.config.CriticObjective`; ``constraint`` applies to ``wgan``, ``other_patient`` to ``rank``
    and the calibration, see :class:`~airreg.config.OtherPatientPairs`), it becomes a better judge of
    alignment; G, and so the registration, is unchanged. ``fresh`` starts from new critic weights instead of
    the model's. Every ``check_every`` steps the AUROC of the quality statistic on the validation cases is
    logged. Caches go in ``out``'s folder (a training run folder reuses the run's caches).
    """
    if steps < 1:
        raise InputError(f"critic refinement needs at least 1 step, got {steps}")
    model = ckpt.resolve(model)  # a bundled model's name works too
    state = ckpt.load(model)
    trainer = frozen_generator_trainer(
        state, device, load_critic=not fresh, critic_constraint=constraint, lr_d=lr_d, batch_size=batch_size
    )
    cfg = trainer.cfg
    update = trainer.critic_step
    if objective == CriticObjective.RANK:  # a ranking loss needs no Lipschitz constraint: Adam, no clipping
        trainer.opt_d = torch.optim.Adam(trainer.d.parameters(), lr=lr_d, betas=(0.5, 0.9))
        update = functools.partial(trainer.ranking_step, other_patient=other_patient)
    out.parent.mkdir(parents=True, exist_ok=True)
    train_cache, val_cache = split_caches(Path(data_root), out.parent, trainer, progress)
    history: list[dict] = []
    start = time.perf_counter()
    epoch = cfg.epochs + 1  # batch draws never used in adversarial training
    for step in tqdm(range(1, steps + 1), desc="critic", disable=not progress, unit="it"):
        trainer.g.eval()
        trainer.d.train()
        row = {"step": step, **update(trainer.draw_batch(train_cache, epoch, step, 0))}
        if step % check_every == 0 or step == steps:
            calibration = trainer.calibrate(val_cache, per_case=8, other_patient=other_patient)
            row.update(val_auroc=quality_auroc(calibration), statistic=calibration.statistic)
            tqdm.write(f"step {step}: validation AUROC {row['val_auroc']:.3f} ({calibration.statistic})")
        history.append(row)
    calibration = trainer.calibrate(val_cache, other_patient=other_patient)
    exported = ckpt.export_for_inference(state)
    exported["discriminator"] = trainer.d.state_dict()
    exported["calibration"] = calibration.to_dict()
    exported["metadata"] = {
        **state.get("metadata", {}),
        "critic_refinement": {
            "objective": objective.value,
            "constraint": constraint.value if objective == CriticObjective.WGAN else None,
            "other_patient": other_patient.value,
            "steps": steps,
            "lr_d": lr_d,
            "batch_size": batch_size,
            "fresh_critic": fresh,
            "seconds": round(time.perf_counter() - start, 1),
            "validation_auroc": quality_auroc(calibration),
            "from_model_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
        },
    }
    write_refinement_log(out.parent / f"{out.stem}-critic", history)
    return ckpt.save(out, exported)


def write_refinement_log(prefix: Path, history: list[dict]) -> None:
    """The critic refinement's log as CSV and its curves (critic loss, validation AUROC) as PNG."""
    from .plotting import critic_curves

    write_history_csv(prefix.with_name(prefix.name + "-log.csv"), history)
    critic_curves(history, prefix.with_name(prefix.name + "-curves.png"))
