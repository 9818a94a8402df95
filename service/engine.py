"""The model holder: loads a registry version for inference, warms it up, runs batches,
and switches versions without failing a request.

Threads: every forward pass runs on a dedicated inference thread (the batcher's executor:
one thread, or INFERENCE_WORKERS threads); loading and warming a new version for a switch runs on a second, loader
thread, *beside* the served model, which keeps answering. The switch itself is one
attribute assignment; a batch reads that attribute once when it starts, so a batch (and
therefore a request) is answered entirely by one version, and the old model is freed when
its last batch finishes.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service import metrics
from service.fast_explain import ExplainerSlot
from service.settings import Settings
from shapcore.errors import ModelLoadError, UserError
from shapcore.inference import fold_batch_norms, freeze_for_inference, resolve_device
from shapcore.model import SOURCE_SIZE, Classifier
from shapcore.precision import PrecisionChoice, choose_precision
from shapcore.registry import LoadedVersion, Registry

log = logging.getLogger(__name__)

#: Longest the warm-up spends on extra batch sizes (sizes 1 and max are always warmed).
WARMUP_BUDGET_S = 20.0


class Forward:
    """uint8 images (N, 3, 32, 32) on the CPU -> class probabilities, float32 (N, C) on the CPU.

    Holds one or two prepared copies of the model ("variants") and, per batch size, which one
    to run. On CPU in fp32 those are the TorchScript-frozen model (batch norm folded, weights
    pre-packed for oneDNN, runs without the GIL: by far the fastest from batch 2-4 up) and the
    eager model with batch norms folded in channels-last layout (often the fastest at batch 1).
    Both compute the same function (probabilities agree to ~1e-6); :meth:`tune` times them at
    small batch sizes and keeps the faster one for each.
    """

    #: Batch sizes at which the variants are compared; larger batches use the default variant.
    TUNE_SIZES = (1, 2, 3, 4)

    def __init__(self, variants: dict[str, nn.Module], default: str, device: torch.device, autocast: bool) -> None:
        self.variants = variants
        self.default = default
        self.device = device
        self.autocast = autocast
        self.choice: dict[int, str] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(self.variants[self.choice.get(int(images.shape[0]), self.default)], images)

    def run(self, core: nn.Module, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = images.to(self.device, non_blocking=True)
            if self.autocast:
                with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                    logits = core(x)
            else:
                logits = core(x)
            return torch.softmax(logits.float(), dim=1).cpu()

    def tune(self, sizes: tuple[int, ...] = TUNE_SIZES, repeats: int = 7) -> dict[int, str]:
        """Time every variant at each batch size and keep the fastest.

        The variants take turns (one run each per round) and each keeps its best time: a
        burst of other work on a shared machine then slows every variant alike, or only
        some rounds, instead of deciding the choice (a median of consecutive runs of one
        variant once picked a runtime twice as slow at batch 1).
        """
        if len(self.variants) < 2:
            return {}
        for size in sizes:
            x = torch.zeros(size, 3, SOURCE_SIZE, SOURCE_SIZE, dtype=torch.uint8)
            best = dict.fromkeys(self.variants, float("inf"))
            for core in self.variants.values():
                self.run(core, x)
            for _ in range(repeats):
                for name, core in self.variants.items():
                    start = time.perf_counter()
                    self.run(core, x)
                    best[name] = min(best[name], time.perf_counter() - start)
            fastest = min(best, key=best.__getitem__)
            if fastest != self.default:
                self.choice[size] = fastest
            else:
                self.choice.pop(size, None)
        return dict(self.choice)

    def describe(self) -> str:
        text = self.default
        others = sorted(n for n in set(self.choice.values()) if n != self.default)
        for name in others:
            sizes = sorted(k for k, v in self.choice.items() if v == name)
            text += f" ({name} at batch {', '.join(map(str, sizes))})"
        return text + ("+bf16" if self.autocast else "")


def build_forward(model: Classifier, device: torch.device, *, jit: bool, precision: str) -> Forward:
    """Prepare ``model`` for inference on ``device`` (see :class:`Forward`)."""
    model = model.eval()
    autocast = precision == "bf16"
    variants: dict[str, nn.Module] = {}
    if jit and device.type == "cpu" and not autocast:
        frozen = freeze_for_inference(model, torch.zeros(1, 3, SOURCE_SIZE, SOURCE_SIZE, dtype=torch.uint8))
        if frozen is not None:
            variants["torchscript-frozen"] = frozen
    eager = copy.deepcopy(model)
    fold_batch_norms(eager.net)
    variants["eager-channels-last"] = eager.to(device=device, memory_format=torch.channels_last).eval()
    default = "torchscript-frozen" if "torchscript-frozen" in variants else "eager-channels-last"
    return Forward(variants, default, device, autocast)


def warm_up(forward: Forward, max_size: int, budget_s: float = 20.0) -> dict[int, str]:
    """First calls are slow (TorchScript profiling runs, oneDNN kernels built per shape): pay for
    them before serving, then pick the fastest variant per small batch size. Batch sizes 1 and
    ``max_size`` always; every size in between while the budget lasts."""
    sizes = [1, 1, 1, max_size, max_size, *range(2, max_size)]
    deadline = time.perf_counter() + budget_s
    for i, size in enumerate(sizes):
        if i >= 5 and time.perf_counter() > deadline:
            log.info("warm-up budget spent before batch size %d", size)
            break
        forward(torch.zeros(size, 3, SOURCE_SIZE, SOURCE_SIZE, dtype=torch.uint8))
    return forward.tune(tuple(s for s in Forward.TUNE_SIZES if s <= max(1, max_size)))


@dataclass
class ServedModel:
    """One loaded version, ready to answer."""

    version: str
    path: Path
    metadata: dict[str, Any]
    evaluation: dict[str, Any] | None
    class_names: list[str]
    device: str
    forward: Forward
    runtime: str
    load_seconds: float
    precision: PrecisionChoice
    #: the version's amortised explainer (method=fast), read from its folder when present
    explainer: ExplainerSlot | None = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or self.metadata.get("architecture") or "model")


@dataclass(frozen=True)
class ReloadResult:
    previous: str | None
    current: str
    changed: bool
    load_seconds: float


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry(settings.model_registry)
        self.device = resolve_device(settings.device)
        self.threads = settings.resolved_torch_threads()
        self.current: ServedModel | None = None
        self.inference_executor = ThreadPoolExecutor(
            settings.inference_workers, thread_name_prefix="inference", initializer=self._init_inference_thread
        )
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model-loader")
        self._reload_lock = asyncio.Lock()
        self._pinned = settings.model_version
        self._inference_thread_ident: int | None = None

    def _init_inference_thread(self) -> None:
        torch.set_num_threads(self.threads)
        self._inference_thread_ident = threading.get_ident()

    # -- loading ---------------------------------------------------------------------
    def wanted_version(self, version: str | None = None) -> str:
        """The version a (re)load should serve: the one asked for, else the pinned one, else
        the promoted one, else the newest."""
        try:
            return self.registry.resolve(version or self._pinned)
        except UserError as exc:
            known = version is None or version in self.registry.versions()
            raise ModelLoadError(404 if not known else 422, "unknown_version", str(exc)) from None

    def load(self, version: str | None = None, *, warmup: bool | None = None) -> ServedModel:
        """Blocking: read, optimise and warm up a version (does not serve it)."""
        version = self.wanted_version(version)
        start = time.perf_counter()
        try:
            loaded: LoadedVersion = self.registry.load(version, device="cpu")
            evaluation = loaded.metrics()
        except UserError as exc:
            raise ModelLoadError(422, "model_load_failed", str(exc)) from None
        precision, forward = self.choose_precision(loaded)
        served = ServedModel(
            version=loaded.version,
            path=loaded.path,
            metadata=loaded.metadata,
            evaluation=evaluation,
            class_names=loaded.class_names,
            device=str(self.device),
            forward=forward,
            runtime=forward.describe(),
            load_seconds=0.0,
            precision=precision,
            explainer=ExplainerSlot(loaded.path, loaded.version, loaded.class_names),
        )
        served.explainer.refresh()
        if self.settings.warmup if warmup is None else warmup:
            self.warm_up(served)
        served.load_seconds = time.perf_counter() - start
        log.info(
            "loaded %s (%s, input %s px, %s on %s) in %.1f s",
            served.version,
            served.name,
            served.metadata.get("input_size"),
            served.runtime,
            served.device,
            served.load_seconds,
        )
        return served

    def max_batch(self) -> int:
        return self.settings.batch_max_size if self.settings.batching else self.settings.max_files_per_request

    def choose_precision(self, loaded: LoadedVersion) -> tuple[PrecisionChoice, Forward]:
        """fp32 or bf16 as PRECISION says; ``auto`` measures both here (:mod:`shapcore.precision`)."""
        model, jit = loaded.model.to(self.device), self.settings.jit
        fp32 = build_forward(model, self.device, jit=jit, precision="fp32")
        sample = loaded.validation_sample() if self.settings.precision == "auto" else torch.empty(0)
        choice, forward = choose_precision(
            self.settings.precision, self.device, fp32,
            lambda: build_forward(model, self.device, jit=jit, precision="bf16"), sample, self.max_batch(),
        )  # fmt: skip
        log.info("precision %s: %s", choice.chosen, choice.reason)
        return choice, forward

    def warm_up(self, served: ServedModel) -> None:
        warm_up(served.forward, self.max_batch(), WARMUP_BUDGET_S)
        served.runtime = served.forward.describe()

    async def start(self) -> ServedModel:
        """Load the configured version (on the inference thread: nothing else runs yet)."""
        loop = asyncio.get_running_loop()
        torch.set_num_threads(self.threads)
        async with self._reload_lock:  # a reload asked for meanwhile waits, then wins
            served = await loop.run_in_executor(self.inference_executor, self.load, None)
            self._serve(served)
        return served

    def _serve(self, served: ServedModel) -> None:
        self.current = served  # the atomic switch
        metrics.set_model(served.metadata, served.version, served.evaluation, served.device)

    async def reload(self, version: str | None = None, *, force: bool = False) -> ReloadResult:
        """Load ``version`` (default: pinned, else promoted, else newest) beside the served
        model, then switch. Requests keep being answered by the old model meanwhile."""
        async with self._reload_lock:
            previous = self.current.version if self.current else None
            try:
                target = self.wanted_version(version)
                if target == previous and not force:
                    metrics.MODEL_RELOADS.labels("unchanged").inc()
                    return ReloadResult(previous, target, False, 0.0)
                loop = asyncio.get_running_loop()
                served = await loop.run_in_executor(self._loader, self.load, target)
            except ModelLoadError:
                metrics.MODEL_RELOADS.labels("failure").inc()
                raise
            except Exception:
                metrics.MODEL_RELOADS.labels("failure").inc()
                raise
            self._serve(served)
            metrics.MODEL_RELOADS.labels("success").inc()
            log.info("switched model %s -> %s", previous, served.version)
            return ReloadResult(previous, served.version, served.version != previous, served.load_seconds)

    async def watch_promoted(self, interval_s: float) -> None:
        """Poll the registry's PROMOTED pointer; switch when it names another version."""
        last = self.registry.promoted()
        while True:
            await asyncio.sleep(interval_s)
            try:
                promoted = await asyncio.to_thread(self.registry.promoted)
                if promoted and promoted != last and self.current and promoted != self.current.version:
                    log.info("registry promoted %s: switching", promoted)
                    await self.reload(promoted)
                last = promoted
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("promoted-pointer watch: %s", exc)

    # -- inference -------------------------------------------------------------------
    def run_batch(self, images: list[torch.Tensor]) -> tuple[ServedModel, list[list[float]]]:
        """On the inference thread: one forward pass over the concatenated images."""
        served = self.current  # read once: the whole batch is answered by this version
        if served is None:
            raise RuntimeError("no model loaded")
        batch = images[0] if len(images) == 1 else torch.cat(images)
        start = time.perf_counter()
        probs = served.forward(batch)
        metrics.INFERENCE_LATENCY.observe(time.perf_counter() - start)
        metrics.BATCH_SIZE.observe(batch.shape[0])
        metrics.PREDICTED_IMAGES.inc(batch.shape[0])
        return served, probs.tolist()

    def shutdown(self) -> None:
        self.inference_executor.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)
