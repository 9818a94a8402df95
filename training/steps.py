"""One training step, one validation pass and the batches they read: the pieces a run
repeats, shared with ``bench/train_throughput.py`` and the CUDA tests.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm import tqdm

from shapcore.model import Classifier
from shapcore.precision import native_bf16
from training import distributed
from training.presets import TrainConfig

log = logging.getLogger(__name__)


def autocast_for(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA and on CPUs with native bf16 (measured 1.5x there), else none."""
    if cfg.amp == "off":
        return nullcontext
    if device.type == "cuda" or cfg.amp == "on" or native_bf16("cpu"):
        # No cast cache: each weight is cast once per forward anyway, and CUDA graph capture
        # needs it off.
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return nullcontext


def graph_model(model: Classifier, cfg: TrainConfig, autocast, sample: torch.Tensor) -> bool:
    """Capture the model's training forward and backward as CUDA graphs, in place.

    At the paper's batch of 32 a ResNet-50 step is bound by the CPU launching ~1,000 small
    kernels one by one, not by the GPU (measured on an H100: 911 img/s, ~28 ms a step, and
    about the same ~30 ms a step at batch 128 and 32 px). A replayed graph launches them all
    at once. ``torch.cuda.make_graphed_callables`` patches ``model.forward`` for train mode
    only (eval mode runs eager); parameters keep their storage, so the optimizer, the
    checkpoints and ``load_state_dict`` are unaffected. Dropout stays random per step (graph-
    safe Philox RNG, reseeded by ``torch.manual_seed``). Batch-norm statistics touched by the
    capture's warm-up passes are put back. Returns False (and the run goes on eagerly) when
    the capture fails.
    """
    model.train()
    saved = {k: v.clone() for k, v in model.net.named_buffers()}
    try:
        with autocast():
            torch.cuda.make_graphed_callables(model, (sample,))
    except Exception as exc:  # capture is an optimisation: never worth failing a run for
        log.warning("CUDA graph capture failed, training eagerly: %s", exc)
        return False
    finally:
        with torch.no_grad():
            for k, v in model.net.named_buffers():
                v.copy_(saved[k])
    return True


def prepare_input(images: torch.Tensor, aug: torch.nn.Module, cfg: TrainConfig) -> torch.Tensor:
    """uint8 batch -> augmented float batch, in the model's memory format."""
    x = aug(to_input(images, False))
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


@dataclass
class Batches:
    """Shuffled mini-batches straight from an in-memory uint8 tensor on the device."""

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    shuffle: bool
    seed: int = 0
    drop_last: bool = False
    rank: int = 0  # under torchrun each rank reads its own equal share of every epoch
    world: int = 1

    def _shard_size(self) -> int:
        n = len(self.labels)
        return n // self.world if self.world > 1 else n

    def __len__(self) -> int:
        n = self._shard_size()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch(self, epoch: int):
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        else:
            order = torch.arange(n)
        if self.world > 1:
            order = order[: self._shard_size() * self.world][self.rank :: self.world]
        order = order.to(self.images.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.images[idx], self.labels[idx]


def to_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = images.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_step(model, aug, optimizer, cfg, autocast, images, labels):
    x = prepare_input(images, aug, cfg)
    with autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == labels).sum()


@torch.inference_mode()
def evaluate_loss(model, batches: Batches, autocast, channels_last: bool, progress: bool = True) -> tuple[float, float]:
    """Mean cross-entropy (no smoothing) and accuracy over ``batches``."""
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=batches.images.device)
    correct = torch.zeros((), dtype=torch.int64, device=batches.images.device)
    bar = tqdm(batches.epoch(0), total=len(batches), desc="validate", leave=False, unit="batch", disable=not progress)
    for images, labels in bar:
        with autocast():
            logits = model(to_input(images, channels_last))
        total_loss += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
    count = torch.tensor(batches._shard_size(), device=total_loss.device)
    sums = distributed.all_sum(torch.stack([total_loss, correct.double(), count.double()]))
    return sums[0].item() / sums[2].item(), sums[1].item() / sums[2].item()
