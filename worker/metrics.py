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
import math
import time
from typing import Any

log = logging.getLogger(__name__)

METRICS_KEY = "shapserve:explain:metrics"
#: Job-duration histogram buckets, in seconds: up to 20 minutes.
DURATION_BUCKETS: tuple[float, ...] = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
STATUSES = ("finished", "failed", "retried")


def _bucket_field(upper: float) -> str:
    return f"duration_bucket:{upper:g}"


def record_finished(connection: Any, result: dict[str, Any]) -> None:
    """Count one finished job: duration histogram, evaluations and forward time."""
    duration = float(result.get("duration_s", 0.0))
    bucket = next((b for b in DURATION_BUCKETS if duration <= b), math.inf)
    pipe = connection.pipeline(transaction=False)
    pipe.hincrby(METRICS_KEY, "jobs_total:finished", 1)
    pipe.hincrby(METRICS_KEY, _bucket_field(bucket), 1)
    pipe.hincrby(METRICS_KEY, "duration_count", 1)
    pipe.hincrbyfloat(METRICS_KEY, "duration_sum", duration)
    pipe.hincrby(METRICS_KEY, "evaluations_total", int(result.get("model_evaluations", 0)))
    pipe.hincrbyfloat(METRICS_KEY, "forward_seconds_total", float(result.get("timings_s", {}).get("model_forward", 0)))
    pipe.hset(METRICS_KEY, "last_evaluations_per_second", float(result.get("evaluations_per_second", 0.0)))
    pipe.execute()


def record_failure(connection: Any, *, retried: bool) -> None:
    try:
        connection.hincrby(METRICS_KEY, f"jobs_total:{'retried' if retried else 'failed'}", 1)
    except Exception:  # metrics must never turn a failure handler into a second failure
        log.exception("could not record a failed explanation job")


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


def read_metrics(connection: Any) -> dict[str, float]:
    raw = connection.hgetall(METRICS_KEY)
    return {k.decode() if isinstance(k, bytes) else k: float(v) for k, v in raw.items()}


class ExplainCollector:
    """A prometheus_client collector reading the queue and the metrics hash at scrape time.

    ``source()`` returns (Redis client with short timeouts, RQ queue name), or raises.
    """

    def __init__(self, source: Any) -> None:
        self.source = source

    def describe(self) -> list:
        return []  # families are produced at scrape time (no duplicate registration checks)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        up = GaugeMetricFamily("shapserve_explain_redis_up", "1 when the explain metrics could be read from Redis")
        try:
            from rq import Queue, Worker

            conn, queue_name = self.source()
            queue = Queue(queue_name, connection=conn)
            depth = queue.count
            running = queue.started_job_registry.count
            workers = Worker.count(connection=conn, queue=queue)
            values = read_metrics(conn)
        except Exception as exc:
            log.debug("explain metrics unavailable: %s", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up

        for name, doc, value in (
            ("shapserve_explain_queue_depth", "Explanation jobs waiting in the queue", depth),
            ("shapserve_explain_jobs_running", "Explanation jobs being executed by a worker", running),
            ("shapserve_explain_workers", "Live explanation workers on the queue", workers),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g

        jobs = CounterMetricFamily(
            "shapserve_explain_jobs",
            "Explanation jobs by final status (retried: an attempt failed, retry queued)",
            labels=["status"],
        )
        for status in STATUSES:
            jobs.add_metric([status], values.get(f"jobs_total:{status}", 0.0))
        yield jobs

        cumulative = 0.0
        buckets = []
        for upper in (*DURATION_BUCKETS, math.inf):
            cumulative += values.get(_bucket_field(upper), 0.0)
            buckets.append((floatToGoString(upper), cumulative))
        hist = HistogramMetricFamily(
            "shapserve_explain_job_duration_seconds", "Compute time of finished explanation jobs"
        )
        hist.add_metric([], buckets, sum_value=values.get("duration_sum", 0.0))
        yield hist

        ev = CounterMetricFamily(
            "shapserve_explain_model_evaluations", "Images evaluated by the model for explanations"
        )
        ev.add_metric([], values.get("evaluations_total", 0.0))
        yield ev
        fw = CounterMetricFamily(
            "shapserve_explain_model_forward_seconds", "Seconds spent in model forward passes for explanations"
        )
        fw.add_metric([], values.get("forward_seconds_total", 0.0))
        yield fw
        eps = GaugeMetricFamily(
            "shapserve_explain_model_evaluations_per_second", "Model evaluations per second of the last finished job"
        )
        eps.add_metric([], values.get("last_evaluations_per_second", 0.0))
        yield eps
