"""The explanation queue's figures in the API's /metrics, read from Redis at scrape time."""

from __future__ import annotations

import logging
import math
from typing import Any

from shapcore.jobs.stats import DURATION_BUCKETS, STATUSES, _bucket_field, read_metrics

log = logging.getLogger(__name__)


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
