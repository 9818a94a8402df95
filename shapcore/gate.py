"""The runtime gate: which form of the model runs, chosen by measurement on the hardware at hand.

Every faster form of the network (bf16 autocast, ``torch.compile``, ONNX Runtime, OpenVINO,
int8 post-training quantisation: :mod:`shapcore.runtimes`) computes something close to, never
exactly, what the fp32 TorchScript-frozen baseline computes, and is faster on some hardware and
slower on other. So ``RUNTIME=auto`` (``EXPLAIN_RUNTIME``) trusts none of them: at load it
measures how often each candidate's top-1 agrees with the baseline's on a validation sample
stored with the version (:meth:`shapcore.registry.LoadedVersion.validation_sample`), times the
agreeing ones against the baseline at the batch sizes the process serves, and keeps the fastest
that agrees on at least :data:`MIN_AGREEMENT` of the sample **and** is at least
:data:`MIN_SPEEDUP` times as fast. A candidate that cannot run here (a missing package, a CPU-only
runtime on CUDA) is skipped with its reason. ``RUNTIME=<name>`` skips the measurement and runs
that form, or fails when it cannot be built here.

bf16 is one candidate among the others: the precision gate this module replaced was this rule
with one candidate.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from shapcore.errors import UserError

log = logging.getLogger(__name__)

#: Top-1 agreement with the fp32 baseline below which a candidate is refused, however fast.
MIN_AGREEMENT = 0.995
#: A candidate must be at least this much faster than the baseline (its time / the candidate's).
MIN_SPEEDUP = 1.1

#: ``images -> scores``: one form of the model (its top-1 is compared; the timing runs it).
ForwardFn = Callable[[torch.Tensor], torch.Tensor]


class Unavailable(Exception):
    """A candidate that cannot run here; the message says why (shown in the choice's report)."""


@dataclass(frozen=True)
class Candidate:
    """A form of the model the gate may choose: ``build`` makes it (only when needed) or raises
    :class:`Unavailable`; ``precision``: the arithmetic it computes in (fp32, bf16, int8)."""

    name: str
    precision: str
    build: Callable[[], ForwardFn]
    #: why ``auto`` does not measure it (it runs only when named), or None: measured
    not_in_auto: str | None = None


@dataclass
class Measured:
    """One candidate's figures; ``status``: chosen | faster (not the fastest) | slow | refused (disagrees) |
    unavailable | failed | skipped (not measured by ``auto``), and ``reason`` says more."""

    name: str
    precision: str
    status: str
    reason: str = ""
    agreement: float | None = None
    ms: dict[int, float] = field(default_factory=dict)
    speedup: float | None = None


@dataclass(frozen=True)
class RuntimeChoice:
    """What was asked for, what was chosen and why, with the figures that decided it.

    ``speedup``: the chosen form's speed over the baseline's (geometric mean over ``timed_batches``;
    1.0 for the baseline, None when not measured); ``agreement``: its top-1 agreement with the
    baseline on the ``sample_images`` validation images."""

    requested: str
    chosen: str
    precision: str
    reason: str
    speedup: float | None = None
    agreement: float | None = None
    sample_images: int = 0
    timed_batches: tuple[int, ...] = ()
    baseline: str = "torchscript"
    candidates: tuple[Measured, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["timed_batches"] = list(self.timed_batches)
        out["candidates"] = [asdict(c) for c in self.candidates]
        return out

    def summary(self) -> dict[str, Any]:
        """The three figures every explanation result carries."""
        return {"name": self.chosen, "precision": self.precision, "speedup": self.speedup,
                "agreement": self.agreement}  # fmt: skip


def top1(form: ForwardFn, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The class each image gets from ``form`` (run in batches of ``batch_size``)."""
    with torch.inference_mode():
        return torch.cat([form(images[s : s + batch_size]).argmax(1).cpu() for s in range(0, len(images), batch_size)])


def top1_agreement(reference: ForwardFn, other: ForwardFn, images: torch.Tensor, batch_size: int = 64) -> float:
    """The share of ``images`` on which the two forms pick the same class."""
    return float((top1(reference, images, batch_size) == top1(other, images, batch_size)).float().mean())


def time_forms(forms: dict[str, ForwardFn], batch: torch.Tensor, rounds: int = 5) -> dict[str, float]:
    """Best seconds per call of each form on ``batch``, the forms taking turns (a burst of other
    work then slows each alike instead of deciding the choice); three untimed calls each first
    (TorchScript's profiling executor optimises a graph on its third call).

    A batch on a CUDA device is timed to the end of the GPU's work (CUDA kernels run
    asynchronously: a form that leaves its output there would otherwise time only its launches)."""

    def run(fn: ForwardFn) -> None:
        with torch.inference_mode():
            fn(batch)
        if batch.is_cuda:
            torch.cuda.synchronize(batch.device)

    for fn in forms.values():
        for _ in range(3):
            run(fn)
    best = dict.fromkeys(forms, float("inf"))
    for _ in range(rounds):
        for name, fn in forms.items():
            start = time.perf_counter()
            run(fn)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def batch_of(sample: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` images cut from ``sample`` (repeated when it holds fewer)."""
    reps = -(-size // max(1, len(sample)))
    return sample.repeat(reps, 1, 1, 1)[:size].contiguous()


def choose(
    requested: str,
    baseline: tuple[str, ForwardFn],
    candidates: Sequence[Candidate],
    sample: torch.Tensor,
    batch_sizes: Sequence[int],
    *,
    min_agreement: float = MIN_AGREEMENT,
    min_speedup: float = MIN_SPEEDUP,
    rounds: int = 5,
) -> tuple[RuntimeChoice, ForwardFn]:
    """The form to run and the report of why. ``baseline``: (name, the fp32 form every candidate is
    measured against); ``sample``: validation images as the forms take them; ``batch_sizes``: the
    batches the caller runs (each candidate is timed at each). ``requested``: ``auto``, the
    baseline's name or a candidate's (:class:`UserError` when that one cannot be built here)."""
    base_name, base_form = baseline
    by_name = {c.name: c for c in candidates}
    if requested == base_name:
        return RuntimeChoice(requested, base_name, "fp32", f"set to {requested} (RUNTIME), not measured",
                             baseline=base_name), base_form  # fmt: skip
    if requested != "auto":
        if requested not in by_name:
            known = ", ".join(["auto", base_name, *by_name])
            raise UserError(f"RUNTIME={requested!r} is not a runtime this process can run (known: {known})")
        try:
            form = by_name[requested].build()
        except Unavailable as exc:
            raise UserError(f"RUNTIME={requested} is unavailable here: {exc}") from None
        return RuntimeChoice(requested, requested, by_name[requested].precision,
                             f"set to {requested} (RUNTIME), not measured", baseline=base_name), form  # fmt: skip
    if len(sample) == 0:
        reason = "the version stores no validation sample to check a candidate on"
        return RuntimeChoice(requested, base_name, "fp32", reason, baseline=base_name), base_form
    return _measure(requested, base_name, base_form, candidates, sample, tuple(batch_sizes), min_agreement,
                    min_speedup, rounds)  # fmt: skip


def _measure(requested: str, base_name: str, base_form: ForwardFn, candidates: Sequence[Candidate],
             sample: torch.Tensor, sizes: tuple[int, ...], min_agreement: float, min_speedup: float,
             rounds: int) -> tuple[RuntimeChoice, ForwardFn]:  # fmt: skip
    reference = top1(base_form, sample)
    measured: dict[str, Measured] = {}
    forms: dict[str, ForwardFn] = {}
    for cand in candidates:
        m = measured[cand.name] = Measured(cand.name, cand.precision, "unavailable")
        if cand.not_in_auto:
            m.status, m.reason = "skipped", cand.not_in_auto
            continue
        try:
            form = cand.build()
            m.agreement = float((top1(form, sample) == reference).float().mean())
        except Unavailable as exc:
            m.reason = str(exc)
            continue
        except Exception as exc:  # a runtime that fails on this model or this machine is skipped, not fatal
            m.status, m.reason = "failed", f"{type(exc).__name__}: {exc}"
            log.warning("runtime candidate %s failed: %s", cand.name, m.reason)
            continue
        if m.agreement < min_agreement:
            m.status = "refused"
            m.reason = (f"agrees with {base_name} on {100 * m.agreement:.2f} % of the validation sample, below "
                        f"{100 * min_agreement:.1f} %")  # fmt: skip
            continue
        forms[cand.name] = form
    base_ms: dict[int, float] = {}
    for size in sizes:
        times = time_forms({base_name: base_form, **forms}, batch_of(sample, size), rounds=rounds)
        base_ms[size] = 1000 * times[base_name]
        for name in forms:
            measured[name].ms[size] = 1000 * times[name]
    for name in forms:
        m = measured[name]
        m.speedup = math.exp(sum(math.log(base_ms[s] / m.ms[s]) for s in sizes) / len(sizes))
        m.status = "slow" if m.speedup < min_speedup else "faster"
        m.reason = (f"{m.speedup:.2f}x {base_name}'s speed, agrees on {100 * (m.agreement or 0):.2f} %"
                    + (f" (needs {min_speedup:.2f}x)" if m.status == "slow" else ""))  # fmt: skip
    fast = [m for m in measured.values() if m.status == "faster"]
    base_entry = Measured(base_name, "fp32", "baseline", "the fp32 reference", 1.0, base_ms, 1.0)
    if not fast:
        reason = f"no candidate is >= {min_speedup:.2f}x faster and agrees on >= {100 * min_agreement:.1f} %"
        choice = RuntimeChoice(requested, base_name, "fp32", reason, 1.0, 1.0, len(sample), sizes, base_name,
                               (base_entry, *measured.values()))  # fmt: skip
        return choice, base_form
    best = max(fast, key=lambda m: m.speedup or 0.0)
    best.status = "chosen"
    agreed = 100 * (best.agreement or 0)
    reason = f"{best.name} is {best.speedup:.2f}x faster and agrees on {agreed:.2f} % of the validation sample"
    choice = RuntimeChoice(requested, best.name, best.precision, reason, best.speedup, best.agreement, len(sample),
                           sizes, base_name, (base_entry, *measured.values()))  # fmt: skip
    return choice, forms[best.name]
