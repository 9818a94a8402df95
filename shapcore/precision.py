"""fp32 or bf16, chosen by measurement on the hardware at hand (the service's and the worker's forward).

bf16 autocast can run a ResNet-50 twice as fast where the hardware has native bf16 (CUDA,
CPUs with AVX512-BF16 or AMX), and slower where it has not. It also rounds: near-ties
between two classes can flip. So ``PRECISION=auto`` does not trust either: at load it times
both forms of the model at the batch size it will serve, measures how often bf16's top-1
agrees with fp32's on a validation sample stored with the version (its background images and
held-out images recorded at training time: :meth:`shapcore.registry.LoadedVersion.validation_sample`),
and keeps bf16 only when it is faster **and** agrees on at least :data:`MIN_AGREEMENT` of it.
``PRECISION=fp32`` / ``bf16`` skip the measurement and use what they name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

#: Top-1 agreement of bf16 with fp32 below which bf16 is refused, however fast.
MIN_AGREEMENT = 0.995
#: bf16 must be at least this much faster (fp32 time / bf16 time) to be worth its rounding.
MIN_SPEEDUP = 1.05

#: ``images -> scores``: one form of the model (its top-1 is compared; the timing runs it).
ForwardFn = Callable[[torch.Tensor], torch.Tensor]
Form = TypeVar("Form", bound=Callable[[torch.Tensor], torch.Tensor])


class BF16Autocast(nn.Module):
    """``inner`` run under bf16 autocast on ``device_type``, its output back in fp32."""

    def __init__(self, inner: nn.Module, device_type: str) -> None:
        super().__init__()
        self.inner = inner
        self.device_type = device_type

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16):
            return self.inner(images).float()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


@dataclass(frozen=True)
class PrecisionChoice:
    """What was asked for, what was chosen and why, with the figures that decided it."""

    requested: str
    chosen: str
    reason: str
    agreement: float | None = None
    sample_images: int = 0
    fp32_ms: float | None = None
    bf16_ms: float | None = None
    timed_batch: int | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def top1_agreement(fp32: ForwardFn, bf16: ForwardFn, images: torch.Tensor, batch_size: int = 64) -> float:
    """The share of ``images`` on which the two forms pick the same class."""
    same = 0
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        same += int((fp32(chunk).argmax(1) == bf16(chunk).argmax(1)).sum())
    return same / max(1, len(images))


def time_forms(forms: dict[str, ForwardFn], batch: torch.Tensor, rounds: int = 5) -> dict[str, float]:
    """Best seconds per call of each form on ``batch``, the forms taking turns (a burst of other
    work then slows each alike instead of deciding the choice); two untimed calls each first.

    A batch on a CUDA device is timed to the end of the GPU's work (CUDA kernels run
    asynchronously: a form that leaves its output there would otherwise time only its launches)."""

    def run(fn: ForwardFn) -> None:
        fn(batch)
        if batch.is_cuda:
            torch.cuda.synchronize(batch.device)

    for fn in forms.values():
        run(fn)
        run(fn)
    best = dict.fromkeys(forms, float("inf"))
    for _ in range(rounds):
        for name, fn in forms.items():
            start = time.perf_counter()
            run(fn)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def decide(fp32_s: float, bf16_s: float, agreement: float, *, min_agreement: float = MIN_AGREEMENT) -> tuple[str, str]:
    """(chosen precision, reason) from the measured times and agreement."""
    speedup = fp32_s / bf16_s if bf16_s > 0 else float("inf")
    if agreement < min_agreement:
        return "fp32", (f"bf16 agrees with fp32 on {100 * agreement:.2f} % of the validation sample, below "
                        f"{100 * min_agreement:.1f} %")  # fmt: skip
    if speedup < MIN_SPEEDUP:
        return "fp32", f"bf16 is not faster here ({speedup:.2f}x fp32's speed)"
    return "bf16", f"bf16 is {speedup:.2f}x faster and agrees on {100 * agreement:.2f} % of the validation sample"


def choose_precision(
    requested: str,
    device: torch.device | str,
    fp32: Form,
    bf16: Callable[[], Form],
    sample: torch.Tensor,
    batch_size: int,
    *,
    min_agreement: float = MIN_AGREEMENT,
) -> tuple[PrecisionChoice, Form]:
    """The precision to run with, and that form of the model. ``bf16`` builds the bf16 form
    (only when needed); ``sample``: validation images as the forms take them; ``batch_size``:
    the batch timed (the largest the caller runs)."""
    if requested in ("fp32", "bf16"):
        asked = f"set to {requested} (PRECISION / EXPLAIN_PRECISION), not measured"
        return PrecisionChoice(requested, requested, asked), (fp32 if requested == "fp32" else bf16())
    if not native_bf16(device):
        return PrecisionChoice(requested, "fp32", f"no native bf16 on {torch.device(device).type} here"), fp32
    if len(sample) == 0:
        return PrecisionChoice(requested, "fp32", "the version stores no validation sample to check bf16 on"), fp32
    fast = bf16()
    agreement = top1_agreement(fp32, fast, sample)
    reps = -(-batch_size // len(sample))
    batch = sample.repeat(reps, 1, 1, 1)[:batch_size]
    times = time_forms({"fp32": fp32, "bf16": fast}, batch)
    chosen, reason = decide(times["fp32"], times["bf16"], agreement, min_agreement=min_agreement)
    choice = PrecisionChoice(
        requested,
        chosen,
        reason,
        agreement=agreement,
        sample_images=len(sample),
        fp32_ms=1000 * times["fp32"],
        bf16_ms=1000 * times["bf16"],
        timed_batch=len(batch),
    )
    return choice, (fast if chosen == "bf16" else fp32)
