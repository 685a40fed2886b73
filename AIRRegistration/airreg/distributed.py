"""torch.distributed plumbing for ``airreg train`` under ``torchrun`` (one code path for 1..N processes).

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables; without them training runs as a
single process. NCCL is used on CUDA, Gloo on CPU.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import InputError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_device_name(requested: str) -> str:
    """Refuse a device that is not ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", requested):
        raise InputError(f"--device {requested!r}: expected auto, cpu, cuda or cuda:N")
    return requested


def select_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; asking for CUDA without it falls back to CPU with a message."""
    check_device_name(requested)
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        if requested.startswith("cuda:") and int(requested[5:]) >= torch.cuda.device_count():
            raise InputError(
                f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return (
            torch.device(f"cuda:{local_rank}") if requested in ("auto", "cuda") else torch.device(requested)
        )
    if requested != "auto":
        print(f"airreg: CUDA was requested ({requested}) but is not available; running on the CPU")
    return torch.device("cpu")


def init(requested_device: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun; otherwise a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(requested_device, local_rank)
    if world > 1 and device.type == "cuda":
        device = _rank_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world, device)


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK (an explicit cuda:N would put every rank on the same GPU, which NCCL
    rejects); cuda:0 when the launcher binds one visible GPU to each process."""
    count = torch.cuda.device_count()
    index = local_rank if local_rank < count else 0 if count == 1 else None
    if index is None:
        raise RuntimeError(
            f"LOCAL_RANK {local_rank} but only {count} CUDA devices: start one process per GPU"
        )
    if device.index not in (None, index):
        print(f"airreg: under torchrun each process uses its own GPU: cuda:{index}, not {device}")
    return torch.device(f"cuda:{index}")


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def wait_for_file(ctx: DistContext, path: Path, poll_seconds: float = 1.0) -> None:
    """Other ranks wait until rank 0 has written ``path`` (polling, so no collective timeout applies), then all
    ranks meet at a barrier. ``path`` must be on a file system that all nodes share."""
    if ctx.distributed:
        while not ctx.is_main and not Path(path).exists():
            time.sleep(poll_seconds)
        dist.barrier()


def all_reduce_sum(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op in a single process)."""
    if ctx.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
