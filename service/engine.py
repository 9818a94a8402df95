"""The served model: runs batches on the inference threads and switches versions without
failing a request. Loading, freezing, the runtime and the warm-up are the model host's
(:class:`shapcore.host.ModelHost`, shared with the worker); this module wraps it.

Threads: every forward pass runs on a dedicated inference thread (the batcher's executor:
one thread, or INFERENCE_WORKERS threads); loading and warming a new version for a switch runs on a second, loader
thread, *beside* the served model, which keeps answering. The switch itself is one
attribute assignment; a batch reads that attribute once when it starts, so a batch (and
therefore a request) is answered entirely by one version, and the old model is freed when
its last batch finishes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service import metrics
from service.fast_explain import ExplainerSlot
from service.settings import Settings
from shapcore.errors import ModelLoadError, UserError
from shapcore.gate import RuntimeChoice
from shapcore.host import ModelHost
from shapcore.inference import Forward, resolve_device
from shapcore.registry import Registry
from shapcore.store import StoreUnavailable

log = logging.getLogger(__name__)


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
    #: which runtime the gate chose and why, with its speed-up and agreement (shapcore/gate.py)
    runtime_choice: RuntimeChoice
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


def serving_batch_sizes(largest: int) -> tuple[int, ...]:
    """The batch sizes the runtime gate times for the API: a lone request, a quarter-full and a
    full batch (the batcher forms every size up to ``largest``; these span its load)."""
    return tuple(sorted({1, max(1, largest // 4), largest}))


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry(settings.model_registry)
        self.device = resolve_device(settings.device)
        self.host = ModelHost(self.registry, self.device, runtime=settings.runtime, jit=settings.jit,
                              batch_sizes=serving_batch_sizes(self.max_batch()),
                              cache_root=settings.runtime_cache_dir, only=settings.runtime_candidates)  # fmt: skip
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
        except StoreUnavailable as exc:
            raise ModelLoadError(503, "registry_unavailable", str(exc)) from None
        except UserError as exc:
            known = version is None or version in self.registry.versions()
            raise ModelLoadError(404 if not known else 422, "unknown_version", str(exc)) from None

    def load(self, version: str | None = None, *, warmup: bool | None = None) -> ServedModel:
        """Blocking: read, optimise and warm up a version (does not serve it)."""
        version = self.wanted_version(version)
        start = time.perf_counter()
        try:
            hosted = self.host.serving(version, warmup=self.settings.warmup if warmup is None else warmup)
            evaluation = hosted.loaded.metrics()
        except UserError as exc:
            raise ModelLoadError(422, "model_load_failed", str(exc)) from None
        served = ServedModel(
            version=hosted.version,
            path=hosted.path,
            metadata=hosted.metadata,
            evaluation=evaluation,
            class_names=hosted.class_names,
            device=str(self.device),
            forward=hosted.model,
            runtime=hosted.model.describe(),
            load_seconds=0.0,
            runtime_choice=hosted.runtime,
            explainer=ExplainerSlot(hosted.path, hosted.version, hosted.class_names,
                                    min_rho=self.settings.explain_fast_min_rho),
        )
        served.explainer.refresh()
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
        """Poll the registry's PROMOTED pointer; switch when it names another version. A registry
        that cannot be read is logged at each poll; the served model keeps answering."""
        try:
            last = await asyncio.to_thread(self.registry.promoted)
        except UserError as exc:
            log.warning("promoted-pointer watch: %s", exc)
            last = self.current.version if self.current else None
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
