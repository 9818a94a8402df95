"""The model host: a registry version loaded onto a device, in the form its caller runs, with
its precision chosen (:mod:`shapcore.precision`), frozen where that is faster and warmed up.

Two callers, two forms of the same network, one host:

- **serving** (``service/engine.py``, which adds dynamic batching and hot swapping): a
  :class:`shapcore.inference.Forward`, uint8 images -> class probabilities on the CPU, with a
  TorchScript-frozen variant on the CPU, warmed up at every batch size up to the largest batch;
- **explaining** (``worker/runtime.py``, which adds the fills and the fork discipline): the
  network the value function evaluates, float images in [0, 1] -> logits, batch norms folded
  and frozen on the CPU (:func:`shapcore.inference.prepare_for_explaining`), with the eager
  network beside it for the gradient methods. Not warmed up: the worker's parent must not run
  a multi-threaded op before it forks (``worker/runtime.py``); tracing runs one batch-1 pass.

In both, ``PRECISION=auto`` (``EXPLAIN_PRECISION``) times fp32 against bf16 at the caller's
largest batch and checks bf16's top-1 on the version's validation sample.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shapcore.inference import build_forward, prepare_for_explaining, warm_up
from shapcore.precision import BF16Autocast, PrecisionChoice, choose_precision
from shapcore.registry import LoadedVersion, Registry

log = logging.getLogger(__name__)

#: Longest the serving warm-up spends on extra batch sizes (sizes 1 and the largest are always warmed).
WARMUP_BUDGET_S = 20.0


@dataclass
class HostedModel:
    """One version on the host's device: ``model`` is the form the caller runs (for serving, a
    :class:`shapcore.inference.Forward`), chosen at ``precision``."""

    loaded: LoadedVersion
    device: torch.device
    precision: PrecisionChoice
    model: Any
    #: the network with autograd (batch norms folded, eval mode): the gradient methods' (explaining only)
    autograd_model: nn.Module | None = None
    #: reading the weights, preparing, choosing the precision and warming up
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

    ``precision``: ``auto``, ``fp32`` or ``bf16`` (``PRECISION`` / ``EXPLAIN_PRECISION``); ``jit``:
    keep a TorchScript-frozen form on the CPU (``JIT`` / ``EXPLAIN_JIT``); ``batch_size``: the
    largest batch the caller runs, at which ``auto`` times the forms and up to which the
    serving warm-up runs.
    """

    def __init__(self, registry: Registry, device: torch.device, *, precision: str = "auto", jit: bool = True,
                 batch_size: int = 1) -> None:  # fmt: skip
        self.registry = registry
        self.device = device
        self.precision = precision
        self.jit = jit
        self.batch_size = batch_size

    def serving(self, version: str | None = None, *, warmup: bool = True,
                warmup_budget_s: float = WARMUP_BUDGET_S) -> HostedModel:  # fmt: skip
        """``version`` (default: promoted, else newest) as the API's :class:`shapcore.inference.Forward`. Raises
        :class:`shapcore.errors.UserError` when the version cannot be read."""
        start = time.perf_counter()
        loaded = self.registry.load(version, device="cpu")
        model, device, jit = loaded.model.to(self.device), self.device, self.jit
        fp32 = build_forward(model, device, jit=jit, precision="fp32")
        sample = loaded.validation_sample() if self.precision == "auto" else torch.empty(0)
        choice, forward = choose_precision(
            self.precision, device, fp32, lambda: build_forward(model, device, jit=jit, precision="bf16"), sample,
            self.batch_size,
        )  # fmt: skip
        log.info("precision %s: %s", choice.chosen, choice.reason)
        if warmup:
            warm_up(forward, self.batch_size, warmup_budget_s)
        return HostedModel(loaded, device, choice, forward, load_seconds=time.perf_counter() - start)

    def explaining(self, version: str | None = None) -> HostedModel:
        """``version`` as the explainers evaluate it (the module docstring); ``loaded.model`` is
        that form too. Raises :class:`shapcore.errors.UserError` when the version cannot be read."""
        start = time.perf_counter()
        device = self.device
        loaded = self.registry.load(version, device=device)
        loaded.model, eager = prepare_for_explaining(loaded.model, jit=self.jit)
        # The forms take float images in [0, 1], as the value function feeds them.
        auto = self.precision == "auto"
        sample = loaded.validation_sample().to(device).float() / 255.0 if auto else torch.empty(0)
        choice, loaded.model = choose_precision(self.precision, device, loaded.model,
                                                lambda: BF16Autocast(eager, device.type), sample,
                                                self.batch_size)  # fmt: skip
        return HostedModel(loaded, device, choice, loaded.model, autograd_model=eager,
                           load_seconds=time.perf_counter() - start)  # fmt: skip

