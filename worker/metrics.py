"""Each explanation worker's own Prometheus metrics: the one source of job counts and durations.

Every worker started with ``EXPLAIN_METRICS_PORT`` serves them (:class:`WorkerMetrics`, kept in
the long-lived parent process, which sees every job its work horses run: a horse lives for one
job and may be killed, so it keeps no counters). Prometheus scrapes each worker and sums the
fleet, e.g. ``sum by (status) (rate(shapserve_worker_jobs_total[5m]))`` (recording rules in
``deploy/prometheus/alerts.yml``), and can still tell a slow or failing worker from the rest:

- ``shapserve_worker_jobs_total{status}``            counter: finished | failed | retried here
- ``shapserve_worker_job_duration_seconds``          histogram: wall time of a job, fork included
- ``shapserve_worker_model_evaluations_total``       counter: images this worker put through the model
- ``shapserve_worker_model_forward_seconds_total``   counter: seconds of those forward passes
  (``rate(..._model_evaluations_total[5m]) / rate(..._model_forward_seconds_total[5m])``: the
  model's images per second; over ``..._job_duration_seconds_sum``: the jobs' throughput)
- ``shapserve_worker_deletion_auc{method}``          histogram: the deletion AUC of each finished
  explanation (lower is better; :mod:`shapcore.faithfulness`)
- ``shapserve_worker_insertion_auc{method}``         histogram: its insertion AUC (higher is better)
  (``rate(..._deletion_auc_sum[1h]) / rate(..._deletion_auc_count[1h])`` by method: the mean)
- ``shapserve_worker_busy``                          gauge: 1 while a job runs
- ``shapserve_worker_last_job_timestamp_seconds``    gauge: when the last job ended
- ``shapserve_worker_info{name, queue, model_version, device}`` the worker, its preloaded version
  and where it runs the model (``cpu``, ``cuda``, ``cuda:1``)
- ``process_*`` (resident memory, CPU seconds, open fds) of the worker's parent process

Nothing else counts jobs: the API's ``/metrics`` carries only the queue's *state*, read from
Redis at scrape time (``shapserve_explain_queue_depth``, ``..._jobs_running``, ``..._workers``,
``..._redis_up``: :mod:`service.explain_metrics`), which no worker can report.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from shapcore.explain.methods import QUEUED_METHODS as METHODS

log = logging.getLogger(__name__)

#: Job-duration histogram buckets, in seconds: up to 20 minutes.
DURATION_BUCKETS: tuple[float, ...] = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
#: Faithfulness AUC buckets: the AUCs are probabilities, in [0, 1].
AUC_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
#: Outcomes of an attempt (retried: it failed and RQ queued it again).
STATUSES = ("finished", "failed", "retried")


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
        self.forward_seconds = Counter(
            "shapserve_worker_model_forward_seconds",
            "Seconds this worker spent in model forward passes (finished jobs)",
            registry=registry,
        )
        self.deletion_auc, self.insertion_auc = (
            Histogram(
                f"shapserve_worker_{curve}_auc",
                f"{curve.capitalize()} AUC of the target class of each finished explanation ({better} is better)",
                ["method"],
                buckets=AUC_BUCKETS,
                registry=registry,
            )
            for curve, better in (("deletion", "lower"), ("insertion", "higher"))
        )
        for method in METHODS:
            self.deletion_auc.labels(method)
            self.insertion_auc.labels(method)
        self.busy = Gauge("shapserve_worker_busy", "1 while this worker runs a job", registry=registry)
        self.last_job = Gauge(
            "shapserve_worker_last_job_timestamp_seconds", "Unix time the last job ended", registry=registry
        )
        self.info = Info("shapserve_worker", "This explanation worker", registry=registry)

    def describe_worker(self, name: str, queue: str, model_version: str, device: str = "cpu") -> None:
        self._identity = {"name": name, "queue": queue, "device": device}
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
            self.forward_seconds.inc(float(result.get("timings_s", {}).get("model_forward", 0.0)))
            self._faithfulness(result)
        self.last_job.set(time.time())

    def _faithfulness(self, result: dict[str, Any]) -> None:
        faith = result.get("faithfulness")
        if not isinstance(faith, dict):
            return
        method = str(result.get("method", "kernel"))
        self.deletion_auc.labels(method).observe(float(faith["deletion_auc"]))
        self.insertion_auc.labels(method).observe(float(faith["insertion_auc"]))


def serve_worker_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve the default registry (worker families and process metrics) on ``host:port``.

    A port that cannot be bound raises :class:`OSError` with the port in the message.
    """
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise OSError(f"cannot serve worker metrics on {host}:{port}: {exc.strerror or exc}") from exc
