"""Multi-process training under ``torchrun``: DistributedDataParallel over the process group
that torchrun's environment describes (NCCL on GPUs, gloo on CPUs).

Rank 0 decides everything that depends on a clock or a random draw (the version id, the
time-budget plan, the schedule's progress) and broadcasts it, so that every rank takes
the same number of steps with the same learning rate; only rank 0 writes to the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from shapcore.inference import resolve_device
from training.settings import TrainingSettings


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return TrainingSettings().world_size > 1


def setup(requested: str) -> tuple[Dist, torch.device]:
    """Join torchrun's process group (if any) and pick this rank's device: ``--device`` resolved as
    the service's ``DEVICE`` is (:func:`shapcore.inference.resolve_device`); under torchrun a CUDA
    choice means the GPU of this process's ``LOCAL_RANK``."""
    device = resolve_device(requested, setting="--device")
    if not launched_by_torchrun():
        return Dist(), device
    local = TrainingSettings().local_rank
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local), device


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast_floats(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's values on every rank (a no-op outside torchrun)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()


def broadcast_str(text: str, device: torch.device, size: int = 64) -> str:
    if not active():
        return text
    raw = text.encode()[:size].ljust(size, b"\0")
    t = torch.tensor(list(raw), dtype=torch.uint8, device=device)
    dist.broadcast(t, src=0)
    return bytes(t.tolist()).rstrip(b"\0").decode()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if active():
        dist.barrier()


def cleanup() -> None:
    if active():
        dist.destroy_process_group()
