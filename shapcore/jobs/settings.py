"""Explanation settings, shared by the API (``POST /explain``) and the worker (``python -m worker``).

The explain family of :class:`shapcore.settings.SharedSettings`: the connection, registry,
version and pixel limit are the base's (the same variables as the service's, so one environment
configures both processes); the explanation knobs are ``EXPLAIN_*``. This module imports
neither torch nor the service.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, field_validator

from shapcore.explain.background import STORED_BACKGROUND, parse_background
from shapcore.settings import BlankIsNone, RuntimeName, SharedSettings


class ExplainSettings(SharedSettings):
    """``EXPLAIN_*``, beside the shared ``REDIS_URL``, ``MODEL_REGISTRY``, ``MODEL_VERSION`` and
    ``MAX_IMAGE_PIXELS`` (:class:`shapcore.settings.SharedSettings`)."""

    # -- queue ----------------------------------------------------------------------------
    explain_queue: str = Field("explain", description="RQ queue name.")
    explain_max_queue_depth: int = Field(
        50, ge=0, description="Queued (not yet started) jobs beyond which POST /explain answers 429."
    )
    explain_max_jobs_per_key: int = Field(
        10,
        ge=0,
        description="Jobs one API key (the client address without keys) may have queued or running at once; "
        "beyond: 429 `too_many_jobs` (0: no cap).",
    )
    explain_job_timeout_s: int = Field(1800, ge=1, description="Wall-clock limit of one job (RQ job timeout).")
    explain_retries: int = Field(
        1, ge=0, le=10, description="Extra attempts after a failure or a killed worker (RQ Retry max)."
    )
    explain_retry_interval_s: int = Field(0, ge=0, description="Seconds before a retry is re-queued.")
    explain_result_ttl_s: int = Field(86_400, ge=60, description="How long results (and heatmaps) are kept.")
    explain_failure_ttl_s: int = Field(86_400, ge=60, description="How long failed jobs are kept.")
    explain_fast_result_ttl_s: int = Field(
        600,
        ge=10,
        description="How long a method=fast answer (result and heatmap data) is kept for its URLs. Short: "
        "every fast request stores one, at /predict's rates, and the answer itself carries the result.",
    )
    explain_redis_timeout_s: float = Field(
        1.0, gt=0, description="API side: connect/read timeout towards Redis before answering 503."
    )

    # -- parameters: defaults and allowed ranges ------------------------------------------
    explain_default_segments: int = Field(50, ge=2, description="SLIC superpixels asked for by default.")
    explain_min_segments: int = 2
    explain_max_segments: int = Field(200, ge=2)
    explain_default_samples: int | Literal["auto"] = Field(
        "auto",
        description="Coalitions evaluated by default: auto (the methods that sample in rounds stop when their "
        "standard errors say converged, within EXPLAIN_AUTO_CAP; the others spend the cap) or an integer budget.",
    )
    explain_auto_cap: int = Field(
        5000,
        ge=20,
        description="samples=auto: the most coalitions evaluated (the methods without rounds, kernel and partition, "
        "spend it: 5000 is the fewest giving a mean seed-to-seed Spearman rho >= 0.9 at 50 segments, BENCHMARKS.md).",
    )
    explain_min_samples: int = 20
    explain_max_samples: int = Field(20_000, ge=20)
    explain_default_background: str = Field(
        "mean",
        description="Background by default: mean, blur, train:K or kmeans:K (shapcore.explain.background); "
        "the study's is train:100.",
    )
    explain_max_background: int = Field(STORED_BACKGROUND, ge=1, le=STORED_BACKGROUND)
    explain_max_evaluations: int = Field(
        500_000, ge=1, description="Upper bound on samples x background (model evaluations) for one job."
    )
    explain_default_seed: int = 0

    # -- worker -----------------------------------------------------------------------------
    explain_torch_threads: int = Field(0, ge=0, description="torch intra-op threads in a job (0: every core).")
    explain_batch_size: int = Field(256, ge=1, description="Images per forward pass.")
    explain_runtime: RuntimeName = Field(
        "auto",
        description="auto: the fastest runtime that is >= 1.1x fp32 TorchScript's speed at EXPLAIN_BATCH_SIZE and "
        "agrees with it on >= 99.5 % of the version's validation sample, measured at load (shapcore/gate.py, as "
        "the API's RUNTIME); a name: that runtime, unmeasured.",
    )
    explain_device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="auto: the first CUDA device when torch sees one, else the CPU; cpu; cuda or cuda:N "
        "(refused at start-up when no such device is visible). Resolved by the worker "
        "(shapcore.inference.resolve_device, as the API's DEVICE).",
    )
    explain_fork: Annotated[bool | None, BlankIsNone] = Field(
        None,
        description="Run each job in a forked work horse (RQ's Worker) or in the worker process itself "
        "(a SimpleWorker with a heartbeat thread). Unset: fork on the CPU, in-process on CUDA (a CUDA "
        "context does not survive fork); true with a CUDA device is refused.",
    )
    explain_jit: bool = Field(
        True,
        description="Run the TorchScript-frozen model (batch norms folded, weights pre-packed for oneDNN): "
        "1.5x the eager model's images/s at batch 256 on a 2-core CPU (bench/forward_variants.py).",
    )
    explain_slic_max_side: int = Field(
        512, ge=32, description="Longer side above which the upload is reduced before SLIC (keeps SLIC fast)."
    )
    explain_slic_compactness: float = Field(10.0, gt=0)
    explain_monitor_interval_s: int = Field(
        5, ge=1, description="How often the worker checks its work horse and renews the job's heartbeat."
    )
    explain_heartbeat_grace_s: int = Field(
        20, ge=1, description="A job whose worker has not renewed its heartbeat for this long is abandoned."
    )
    explain_maintenance_interval_s: int = Field(
        10, ge=1, description="How often a worker reclaims abandoned jobs (retry or fail them)."
    )
    explain_worker_ttl_s: int = Field(
        30, ge=20, description="Idle worker heartbeat TTL (RQ worker_ttl); an idle worker wakes every TTL - 15 s."
    )
    explain_metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of this worker's own Prometheus /metrics (0: none)."
    )
    explain_metrics_host: str = Field("0.0.0.0", description="Address the worker's metrics port listens on.")
    explain_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("explain_default_samples", mode="before")
    @classmethod
    def _samples_word(cls, value: object) -> object:
        return "auto" if isinstance(value, str) and value.strip().lower() == "auto" else value

    @field_validator("explain_default_background")
    @classmethod
    def _known_background(cls, value: str) -> str:
        """A misspelt default is refused at start-up, not answered 500 on every request."""
        return parse_background(value, STORED_BACKGROUND).name

    def torch_threads(self) -> int:
        if self.explain_torch_threads:
            return self.explain_torch_threads
        return max(1, len(os.sched_getaffinity(0)))

    def abandoned_job_bound_s(self) -> int:
        """Longest time from a worker's death (SIGKILL, lost machine) until its job is back in the
        queue, with at least one other worker idle on it.

        The job's entry in RQ's started registry expires ``monitor + grace`` seconds after its
        last renewal; an idle worker runs its maintenance (which reclaims expired entries) only
        between two blocking dequeues of ``worker_ttl - 15`` seconds each, on the first turn
        after ``maintenance`` seconds have passed. Busy workers reclaim nothing until their job
        ends; a ``GET /explain/{id}`` of the job reclaims it as soon as the entry has expired.
        """
        dequeue_timeout = max(1, self.explain_worker_ttl_s - 15)  # rq.Worker.dequeue_timeout
        maintenance_period = dequeue_timeout * (self.explain_maintenance_interval_s // dequeue_timeout + 1)
        return self.explain_monitor_interval_s + self.explain_heartbeat_grace_s + maintenance_period

    def ranges(self) -> dict[str, tuple[int, int]]:
        """Allowed (inclusive) ranges of the integer parameters, as the 422 answers name them."""
        return {
            "segments": (self.explain_min_segments, self.explain_max_segments),
            "samples": (self.explain_min_samples, self.explain_max_samples),
            "background": (1, self.explain_max_background),
            "seed": (0, 2**32 - 1),
        }


@lru_cache
def get_explain_settings() -> ExplainSettings:
    return ExplainSettings()
