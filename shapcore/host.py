"""The model host: a registry version loaded onto a device, in the form its caller runs, with
its runtime chosen (:mod:`shapcore.gate` over the candidates of :mod:`shapcore.runtimes`) and
warmed up.

Two callers, two forms of the same network, one host:

- **serving** (``service/engine.py``, which adds dynamic batching and hot swapping): a
  :class:`shapcore.inference.Forward`, uint8 images -> class probabilities on the CPU, with a
  TorchScript-frozen variant on the CPU, warmed up at every batch size up to the largest batch;
- **explaining** (``worker/runtime.py``, which adds the fills and the fork discipline): the
  network the value function evaluates, float images in [0, 1] -> logits, batch norms folded
  and frozen on the CPU (:func:`shapcore.inference.prepare_for_explaining`), with the eager
  network beside it for the gradient methods. Not warmed up: the worker's parent must not run
  a multi-threaded op before it forks (``worker/runtime.py``); tracing runs one batch-1 pass.

In both, ``RUNTIME=auto`` (``EXPLAIN_RUNTIME``) times the candidates against fp32 TorchScript
at the caller's batch sizes and checks their top-1 on the version's validation sample.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shapcore.errors import UserError
from shapcore.gate import Candidate, ForwardFn, RuntimeChoice, choose
from shapcore.inference import Forward, build_forward, fold_batch_norms, prepare_for_explaining, warm_up
from shapcore.precision import BF16Autocast
from shapcore.registry import LoadedVersion, Registry
from shapcore.runtimes import BASELINE, FORK_UNSAFE, ExportSource, as_unit_float, candidates

log = logging.getLogger(__name__)

#: Longest the serving warm-up spends on extra batch sizes (sizes 1 and the largest are always warmed).
WARMUP_BUDGET_S = 20.0


@dataclass
class HostedModel:
    """One version on the host's device: ``model`` is the form the caller runs (for serving, a
    :class:`shapcore.inference.Forward`), the one ``runtime`` chose."""

    loaded: LoadedVersion
    device: torch.device
    runtime: RuntimeChoice
    model: Any
    #: the network with autograd (batch norms folded, eval mode): the gradient methods' (explaining only)
    autograd_model: nn.Module | None = None
    #: reading the weights, preparing, choosing the runtime and warming up
    load_seconds: float = 0.0

    @property
    def version(self) -> str:
        return self.loaded.version

    @property
    def path(self) -> Path:
        return self.loaded.path

    @property
    def metadata(self) -> dict[str, Any]:
        return self.loaded.metadata

    @property
    def class_names(self) -> list[str]:
        return self.loaded.class_names


class ModelHost:
    """Loads versions of ``registry`` onto ``device``.

    ``runtime``: ``auto`` or a runtime's name (``RUNTIME`` / ``EXPLAIN_RUNTIME``); ``only``: the
    candidates ``auto`` measures (``RUNTIME_CANDIDATES``; None: all but those marked not to); ``jit``: keep a
    TorchScript-frozen form on the CPU (``JIT`` / ``EXPLAIN_JIT``); ``batch_sizes``: the batches the
    caller runs, at which ``auto`` times the candidates (the largest: up to which the serving
    warm-up runs); ``cache_root``: where exports go when a version's folder is read-only.
    """

    def __init__(self, registry: Registry, device: torch.device, *, runtime: str = "auto", jit: bool = True,
                 batch_sizes: tuple[int, ...] = (1,), cache_root: Path = Path("./var/runtime-cache"),
                 only: str | None = None, forks: bool = False) -> None:  # fmt: skip
        self.only = None if only is None else {n.strip() for n in only.split(",") if n.strip()}
        self.forks = forks  # the caller forks after loading (RQ's work horses): no fork-unsafe candidate
        self.registry = registry
        self.device = device
        self.runtime = runtime
        self.jit = jit
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.batch_size = max(self.batch_sizes)
        self.cache_root = cache_root

    def _source(self, loaded: LoadedVersion, export_model: nn.Module) -> ExportSource:
        return ExportSource(export_model, loaded.path, lambda: as_unit_float(loaded.validation_sample()),
                            self.cache_root)  # fmt: skip

    def serving_forms(self, loaded: LoadedVersion) -> tuple[Forward, list[Candidate]]:
        """The fp32 TorchScript :class:`Forward` of ``loaded`` and the candidates the gate measures
        against it, each a :class:`Forward` once built (also what bench/runtimes.py times)."""
        model, device, jit = loaded.model.to(self.device), self.device, self.jit
        fp32 = build_forward(model, device, jit=jit, precision="fp32")
        eager = fold_batch_norms(copy.deepcopy(model)).to(memory_format=torch.channels_last).eval()

        def wrap(name: str, core: ForwardFn) -> ForwardFn:
            return Forward({name: core}, name, device, autocast=False)

        bf16 = lambda: build_forward(model, device, jit=jit, precision="bf16")  # noqa: E731
        return fp32, candidates(self._source(loaded, model), device, eager, wrap=wrap, bf16=bf16)

    def explaining_forms(self, loaded: LoadedVersion) -> tuple[nn.Module, nn.Module, list[Candidate]]:
        """(the baseline network the value function evaluates, the eager one with autograd, the
        candidates): ``loaded.model`` is prepared in place (:func:`prepare_for_explaining`)."""
        loaded.model, eager = prepare_for_explaining(loaded.model, jit=self.jit)
        bf16 = lambda: BF16Autocast(eager, self.device.type)  # noqa: E731
        cands = candidates(self._source(loaded, eager), self.device, eager, wrap=lambda name, core: core, bf16=bf16)
        return loaded.model, eager, cands

    def _choose(self, baseline: ForwardFn, cands: list[Candidate],
                sample: torch.Tensor) -> tuple[RuntimeChoice, ForwardFn]:  # fmt: skip
        if self.only is not None:
            listed = self.only
            cands = [replace(c, not_in_auto=None if c.name in listed else "not in RUNTIME_CANDIDATES") for c in cands]
        if self.forks:
            if self.runtime in FORK_UNSAFE:
                raise UserError(f"EXPLAIN_RUNTIME={self.runtime} cannot run in forked work horses (its threads do not "
                                "survive fork()): name another runtime, or set EXPLAIN_FORK=false")  # fmt: skip
            why = "its threads do not survive the work horses' fork() (EXPLAIN_FORK)"
            cands = [replace(c, not_in_auto=why) if c.name in FORK_UNSAFE else c for c in cands]
        choice, form = choose(self.runtime, (BASELINE, baseline), cands, sample, self.batch_sizes)
        log.info("runtime %s: %s", choice.chosen, choice.reason)
        return choice, form

    def serving(self, version: str | None = None, *, warmup: bool = True,
                warmup_budget_s: float = WARMUP_BUDGET_S) -> HostedModel:  # fmt: skip
        """``version`` (default: promoted, else newest) as the API's :class:`shapcore.inference.Forward`. Raises
        :class:`shapcore.errors.UserError` when the version cannot be read or the runtime named cannot run."""
        start = time.perf_counter()
        loaded = self.registry.load(version, device="cpu")
        fp32, cands = self.serving_forms(loaded)
        sample = loaded.validation_sample() if self.runtime == "auto" else torch.empty(0)
        if self.runtime == "auto" and warmup:  # the baseline as it would serve: warmed, tuned per small batch
            warm_up(fp32, self.batch_size, warmup_budget_s)
        choice, forward = self._choose(fp32, cands, sample)
        assert isinstance(forward, Forward)
        if warmup:
            warm_up(forward, self.batch_size, warmup_budget_s)
        return HostedModel(loaded, self.device, choice, forward, load_seconds=time.perf_counter() - start)

    def explaining(self, version: str | None = None) -> HostedModel:
        """``version`` as the explainers evaluate it (the module docstring); ``loaded.model`` is
        that form too. Raises :class:`shapcore.errors.UserError` when the version cannot be read."""
        start = time.perf_counter()
        device = self.device
        loaded = self.registry.load(version, device=device)
        baseline, eager, cands = self.explaining_forms(loaded)
        # The forms take float images in [0, 1], as the value function feeds them.
        auto = self.runtime == "auto"
        sample = loaded.validation_sample().to(device).float() / 255.0 if auto else torch.empty(0)
        choice, form = self._choose(baseline, cands, sample)
        loaded.model = form  # type: ignore[assignment]
        return HostedModel(loaded, device, choice, form, autograd_model=eager,
                           load_seconds=time.perf_counter() - start)  # fmt: skip
