"""What a worker process keeps between jobs: loaded model versions and their background sets.

Loading a version (onto ``EXPLAIN_DEVICE``, folded and frozen, in the ``EXPLAIN_RUNTIME`` it chooses) is the
model host's (:meth:`shapcore.host.ModelHost.explaining`, shared with the API); this module adds
what only a worker needs: the fills kept per version, and the fork discipline below.

The worker's parent process calls :func:`preload` before it starts taking jobs, so the
default version's network and its background summary are in memory *before* RQ forks a
work horse for each job: every horse inherits them copy-on-write and never reads the
registry. A job that names another version (after a promotion) loads it in the horse; the
parent notices the new default at its next restart or reload.

Torch and fork: the parent pins torch to **one** intra-op thread and never runs a parallel
region, because GNU OpenMP's thread pool does not survive ``fork()`` (a horse forked after
the parent ran a multi-threaded op hangs in its first parallel region: checked on this
machine). Each horse sets its own thread count (:func:`configure_horse_threads`).

The device (``EXPLAIN_DEVICE``, :func:`shapcore.inference.resolve_device`): on CUDA the
versions are loaded onto the GPU and the worker runs its jobs in its own process
(:func:`forks_jobs`, :class:`worker.worker.InProcessExplainWorker`): a CUDA context does not
survive ``fork()``, and building one per job would cost seconds and a fresh weight upload.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from shapcore.background import BackgroundSet, make_background
from shapcore.errors import UserError
from shapcore.explain.background import BackgroundSpec, parse_background
from shapcore.gate import RuntimeChoice
from shapcore.host import HostedModel, ModelHost
from shapcore.inference import resolve_device
from shapcore.jobs.settings import ExplainSettings
from shapcore.model import SOURCE_SIZE
from shapcore.registry import LoadedVersion, Registry

log = logging.getLogger(__name__)


@dataclass
class VersionRuntime:
    """One hosted version (:class:`shapcore.host.HostedModel`) with its stored background and fills."""

    hosted: HostedModel
    stored_background: torch.Tensor  # uint8 (100, 3, 32, 32)
    fills: dict[str, BackgroundSet] = field(default_factory=dict)

    @property
    def loaded(self) -> LoadedVersion:
        return self.hosted.loaded

    @property
    def version(self) -> str:
        return self.hosted.version

    @property
    def model(self) -> torch.nn.Module:
        """The network the value function evaluates, in the chosen runtime."""
        return self.hosted.model

    @property
    def autograd_model(self) -> torch.nn.Module | None:
        """The network with autograd (batch norms folded, eval mode): the gradient methods' model."""
        return self.hosted.autograd_model

    @property
    def runtime(self) -> RuntimeChoice:
        """The runtime of the value function's forward passes, and why (shapcore.gate)."""
        return self.hosted.runtime

    @property
    def device(self) -> torch.device:
        """Where the model runs and the masked images are built (EXPLAIN_DEVICE)."""
        return self.hosted.device

    @property
    def class_names(self) -> list[str]:
        return self.hosted.class_names

    def background(self, spec: BackgroundSpec, model_input: torch.Tensor) -> BackgroundSet:
        """The fill ``spec`` names; every kind but ``blur`` (made from the image) is kept."""
        if spec.kind == "blur":
            return make_background(spec, self.stored_background, model_input)
        if spec.name not in self.fills:
            self.fills[spec.name] = make_background(spec, self.stored_background, model_input)
        return self.fills[spec.name]


class Runtime:
    """Loaded versions by id (at most ``keep`` of them, the default one always kept)."""

    def __init__(self, settings: ExplainSettings, keep: int = 2, device: torch.device | str | None = None) -> None:
        self.settings = settings
        #: where the models, the fills and the masks live (EXPLAIN_DEVICE unless given)
        self.device = torch.device(device) if device is not None else worker_device(settings)
        self.registry = Registry(settings.model_registry)
        self.host = ModelHost(self.registry, self.device, runtime=settings.explain_runtime,
                              jit=settings.explain_jit, batch_sizes=(settings.explain_batch_size,),
                              cache_root=settings.runtime_cache_dir, only=settings.runtime_candidates,
                              forks=forks_jobs(settings, self.device))  # fmt: skip
        self.keep = keep
        self.versions: dict[str, VersionRuntime] = {}
        self.default_version: str | None = None
        self._lock = threading.Lock()

    def load(self, version: str | None) -> VersionRuntime:
        if version and version in self.versions:
            return self.versions[version]  # loaded: the registry is not asked (it may be unreachable)
        resolved = self.registry.resolve(version)
        with self._lock:
            if resolved in self.versions:
                return self.versions[resolved]
            hosted = self.host.explaining(resolved)
            rt = VersionRuntime(hosted, stored_background=hosted.loaded.background())
            self.versions[resolved] = rt
            while len(self.versions) > self.keep:
                oldest = next(v for v in self.versions if v != self.default_version and v != resolved)
                del self.versions[oldest]
            log.info("loaded model version %s on %s (%d background images; %s: %s)", resolved, self.device,
                     len(rt.stored_background), rt.runtime.chosen, rt.runtime.reason)  # fmt: skip
            return rt

    def preload(self) -> VersionRuntime:
        """Load the default version and its default background summary (in the parent)."""
        rt = self.load(self.settings.model_version)
        self.default_version = rt.version
        spec = parse_background(self.settings.explain_default_background, len(rt.stored_background))
        if spec.kind != "blur":
            rt.background(spec, torch.zeros(3, SOURCE_SIZE, SOURCE_SIZE, dtype=torch.uint8))
        return rt


def prepare_model(loaded: LoadedVersion, *, jit: bool = True) -> tuple[LoadedVersion, torch.nn.Module]:
    """The version with its network as the worker runs it (:func:`shapcore.inference.prepare_for_explaining`:
    batch norms folded, channels-last, frozen by TorchScript on the CPU with ``jit``), and the eager
    network with autograd for the gradient methods, at fp32: what the benches and tests that
    evaluate an already-loaded version use (the worker itself loads through its model host).

    Tracing runs one batch-1 forward pass, in the parent process with its single intra-op
    thread, so no OpenMP pool exists before the fork; the horses pay TorchScript's
    profiling runs (two batches at roughly eager speed) on their first job.
    """
    from shapcore.inference import prepare_for_explaining

    loaded.model, eager = prepare_for_explaining(loaded.model, jit=jit)
    return loaded, eager


_runtime: Runtime | None = None


def get_runtime(settings: ExplainSettings | None = None) -> Runtime:
    global _runtime
    if _runtime is None:
        from shapcore.jobs.settings import get_explain_settings

        _runtime = Runtime(settings or get_explain_settings())
    return _runtime


def set_runtime(runtime: Runtime | None) -> None:
    global _runtime
    _runtime = runtime


def worker_device(settings: ExplainSettings) -> torch.device:
    """``EXPLAIN_DEVICE`` resolved: ``auto`` is CUDA when torch sees a device, else the CPU;
    ``cuda`` (or ``cuda:N``) without one is a :class:`UserError` (``python -m worker`` exits 2)."""
    return resolve_device(settings.explain_device, setting="EXPLAIN_DEVICE")


def forks_jobs(settings: ExplainSettings, device: torch.device) -> bool:
    """Whether jobs run in forked work horses (``EXPLAIN_FORK``; unset: on the CPU only).

    A CUDA context does not survive ``fork()``: a forking worker on CUDA is refused."""
    if settings.explain_fork is None:
        return device.type == "cpu"
    if settings.explain_fork and device.type == "cuda":
        raise UserError(f"EXPLAIN_FORK=true with EXPLAIN_DEVICE={settings.explain_device} ({device}): a CUDA "
                        "context does not survive fork; unset EXPLAIN_FORK or set it to false")  # fmt: skip
    return bool(settings.explain_fork)


def configure_parent_threads() -> None:
    """One intra-op thread, no inter-op pool: nothing that would break a later fork."""
    torch.set_num_threads(1)


def configure_horse_threads(threads: int) -> None:
    torch.set_num_threads(max(1, threads))
