"""Explanation metrics, published through Redis so that every process can see them.

Work horses live for one job and the parent that would hold in-process counters may be
killed, so workers do not keep metrics in memory: each finished job adds to one Redis
hash (``HINCRBY``/``HINCRBYFLOAT``, atomic across workers), and the API's ``/metrics``
turns that hash and the queue's own Redis structures into Prometheus families at scrape
time (:class:`ExplainCollector`). Names:

- ``shapserve_explain_queue_depth``                 gauge: jobs waiting in the queue
- ``shapserve_explain_jobs_running``                gauge: jobs a worker is executing
- ``shapserve_explain_workers``                     gauge: live workers on the queue
- ``shapserve_explain_jobs_total{status}``          counter: finished | failed | retried
- ``shapserve_explain_job_duration_seconds``        histogram: compute time of finished jobs
- ``shapserve_explain_model_evaluations_total``     counter: images through the model
- ``shapserve_explain_model_forward_seconds_total`` counter: time spent in the forward passes
- ``shapserve_explain_model_evaluations_per_second`` gauge: throughput of the last finished job
  (``rate(shapserve_explain_model_evaluations_total[5m])`` gives the fleet's)
- ``shapserve_explain_redis_up``                    gauge: 1 when the scrape could read Redis

Every worker also serves its *own* figures on ``EXPLAIN_METRICS_PORT`` (:class:`WorkerMetrics`,
kept in the long-lived parent process, which sees every job its horses run), so that
Prometheus can scrape each worker and tell a slow or failing one from the fleet:

- ``shapserve_worker_jobs_total{status}``            counter: finished | failed | retried here
- ``shapserve_worker_job_duration_seconds``          histogram: wall time of a job, fork included
- ``shapserve_worker_model_evaluations_total``       counter: images this worker put through the model
- ``shapserve_worker_busy``                          gauge: 1 while a job runs
- ``shapserve_worker_last_job_timestamp_seconds``    gauge: when the last job ended
- ``shapserve_worker_info{name, queue, model_version}`` the worker and its preloaded version
- ``process_*`` (resident memory, CPU seconds, open fds) of the worker's parent process
"""

from __future__ import annotations

import logging
import time
from typing import Any

from shapcore.jobs.stats import DURATION_BUCKETS, STATUSES

log = logging.getLogger(__name__)



class WorkerMetrics:
    """One worker's own metrics, updated by its parent process around each job."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info

        registry = REGISTRY if registry is None else registry
        self.registry = registry
        self.jobs = Counter(
            "shapserve_worker_jobs", "Explanation jobs this worker ended, by outcome", ["status"], registry=registry
        )
        for status in STATUSES:
            self.jobs.labels(status)
        self.duration = Histogram(
            "shapserve_worker_job_duration_seconds",
            "Wall time of the jobs this worker ran (fork and result storage included)",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.evaluations = Counter(
            "shapserve_worker_model_evaluations", "Images this worker evaluated with the model", registry=registry
        )
        self.busy = Gauge("shapserve_worker_busy", "1 while this worker runs a job", registry=registry)
        self.last_job = Gauge(
            "shapserve_worker_last_job_timestamp_seconds", "Unix time the last job ended", registry=registry
        )
        self.info = Info("shapserve_worker", "This explanation worker", registry=registry)

    def describe_worker(self, name: str, queue: str, model_version: str) -> None:
        self._identity = {"name": name, "queue": queue}
        self.model_loaded(model_version)

    def model_loaded(self, model_version: str) -> None:
        """The version the last job asked for (it changes after a promotion)."""
        self.info.info({**getattr(self, "_identity", {}), "model_version": model_version})

    def job_ended(self, status: str, seconds: float, result: Any) -> None:
        """``status``: RQ's job status after the attempt (finished, failed, or queued/scheduled: retried)."""
        outcome = status if status in ("finished", "failed") else "retried"
        self.jobs.labels(outcome).inc()
        self.duration.observe(seconds)
        if outcome == "finished" and isinstance(result, dict):
            self.evaluations.inc(int(result.get("model_evaluations", 0)))
        self.last_job.set(time.time())


def serve_worker_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve the default registry (worker families and process metrics) on ``host:port``.

    A port that cannot be bound raises :class:`OSError` with the port in the message.
    """
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise OSError(f"cannot serve worker metrics on {host}:{port}: {exc.strerror or exc}") from exc
