"""Training and calibration of the patient check (``airreg train-patient-check``).

The network and its use at inference are in :mod:`airreg.patient_check`.

``P`` is trained with G frozen on one question only: is this G's registration of the case's own TRUS, or of
another case's TRUS? Binary cross-entropy, pairs drawn like training batches from the training cases. Its
threshold is set on the validation cases of the same split so that a chosen share of same-patient registrations
(``false_alarm``, default 5 %) is flagged; the detection rate measured there is stored with it in the model file.

Training side: uses :mod:`airreg.training` and tqdm; never imported by the inference path.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint as ckpt
from .errors import InputError
from .networks import Discriminator
from .quality import PatientCheckCalibration
from .training import Batch, CaseCache, Trainer, frozen_generator_trainer, split_caches, write_history_csv

#: Share of same-patient registrations the default threshold flags (on the validation cases).
DEFAULT_FALSE_ALARM = 0.05
#: Batch draws of the validation cases used to set the threshold.
CALIBRATION_DRAWS = 8


def check_pairs(trainer: Trainer, b: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(MR, TRUS) stacks and labels (1: same patient): each case's own TRUS registered by G from its perturbed
    start, and the previous batch item's TRUS registered by G to this MR from that item's start. Where the
    draw repeated a case the second pair is not another patient's and is left out."""
    with torch.no_grad():
        own = b.perturb @ trainer.estimate(b.mr, b.trus, b.perturb, trainer.g)
        other_trus, other_start = torch.roll(b.trus, 1, 0), torch.roll(b.perturb, 1, 0)
        other = other_start @ trainer.estimate(b.mr, other_trus, other_start, trainer.g)
        trus = torch.cat([trainer.sample(b.trus, own), trainer.sample(other_trus, other)])
    n = b.mr.shape[0]
    keep = torch.cat(
        [torch.ones(n, dtype=torch.bool, device=b.mr.device), b.case != torch.roll(b.case, 1, 0)]
    )
    labels = torch.cat([torch.ones(n), torch.zeros(n)]).to(b.mr.device)
    return torch.cat([b.mr, b.mr])[keep], trus[keep], labels[keep]


@torch.no_grad()
def calibrate(
    trainer: Trainer,
    net: torch.nn.Module,
    cache: CaseCache,
    false_alarm: float,
    draws: int = CALIBRATION_DRAWS,
) -> PatientCheckCalibration:
    """Threshold for ``false_alarm`` on same-patient pairs of ``cache``, from seeded draws of an "epoch" after
    those of training (``epochs``), the critic refinement (+1) and the check's own training (+2)."""
    net.eval()
    same, other = [], []
    for draw in range(draws):
        mr, trus, labels = check_pairs(trainer, trainer.draw_batch(cache, trainer.cfg.epochs + 3, draw, 0))
        logits = net(mr, trus).flatten().float()
        same.append(logits[labels == 1].cpu().numpy())
        other.append(logits[labels == 0].cpu().numpy())
    return PatientCheckCalibration.fit(np.concatenate(same), np.concatenate(other), false_alarm)


def train_patient_check(
    model: Path,
    data_root: Path,
    out: Path,
    steps: int,
    false_alarm: float = DEFAULT_FALSE_ALARM,
    lr: float = 1e-4,
    batch_size: int = 32,
    check_every: int = 500,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Train the patient check of a trained model (G and D unchanged), calibrate it, write the model to ``out``.

    Uses the training data's split (the model's seed and validation fraction); caches go in ``out``'s folder.
    Every ``check_every`` steps the validation AUROC (same against another patient) is logged.
    """
    if steps < 1:
        raise InputError(f"the patient check needs at least 1 step, got {steps}")
    if not 0.0 < false_alarm < 0.5:
        raise InputError(f"the false-alarm rate must be in (0, 0.5), got {false_alarm}")
    model = ckpt.resolve(model)
    state = ckpt.load(model)
    trainer = frozen_generator_trainer(state, device, batch_size=batch_size)
    trainer.g.eval()
    cfg, ctx = trainer.cfg, trainer.ctx
    out.parent.mkdir(parents=True, exist_ok=True)
    train_cache, val_cache = split_caches(Path(data_root), out.parent, trainer, progress)
    if len(val_cache) < 2:
        raise InputError(
            f"{data_root}: the patient check needs at least 2 validation cases to set its threshold (another "
            f"patient for each), the model's split has {len(val_cache)}"
        )
    torch.manual_seed(cfg.seed + 1)
    net = Discriminator(trainer.model).to(ctx.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.5, 0.9))
    history: list[dict] = []
    start = time.perf_counter()
    epoch = cfg.epochs + 2  # batch draws used neither in training nor in the critic refinement
    for step in tqdm(range(1, steps + 1), desc="patient check", disable=not progress, unit="it"):
        net.train()
        mr, trus, labels = check_pairs(trainer, trainer.draw_batch(train_cache, epoch, step, 0))
        loss = F.binary_cross_entropy_with_logits(net(mr, trus).flatten().float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        row = {"step": step, "loss": loss.item()}
        if step % check_every == 0 or step == steps:
            row["val_auroc"] = calibrate(trainer, net, val_cache, false_alarm, draws=2).auroc
            tqdm.write(f"step {step}: validation AUROC {row['val_auroc']:.3f} (same patient vs another)")
        history.append(row)
    calibration = calibrate(trainer, net, val_cache, false_alarm)
    exported = ckpt.export_for_inference(state)
    exported["patient_check"] = net.state_dict()
    exported["patient_check_calibration"] = calibration.to_dict()
    exported["metadata"] = {
        **state.get("metadata", {}),
        "patient_check": {
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "false_alarm": false_alarm,
            "seconds": round(time.perf_counter() - start, 1),
            "from_model_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
        },
    }
    write_history_csv(out.parent / f"{out.stem}-patient-check-log.csv", history)
    from .plotting import patient_check_curves

    patient_check_curves(history, out.parent / f"{out.stem}-patient-check-curves.png")
    return ckpt.save(out, exported)
