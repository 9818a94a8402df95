"""The explanation queue's *state* in the API's /metrics, read from Redis/RQ at scrape time.

- ``shapserve_explain_queue_depth``   gauge: jobs waiting in the queue
- ``shapserve_explain_jobs_running``  gauge: jobs a worker is executing
- ``shapserve_explain_workers``       gauge: live workers on the queue
- ``shapserve_explain_redis_up``      gauge: 1 when the scrape could read Redis

These are states no single worker can report (every API replica reports the same fleet-wide
value: take ``max()``). Job counts and durations are *not* here: their one source is each
worker's own endpoint (``shapserve_worker_*``, :mod:`worker.metrics`), summed in Prometheus.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class ExplainCollector:
    """A prometheus_client collector reading the queue's Redis structures at scrape time.

    ``source()`` returns (Redis client with short timeouts, RQ queue name), or raises.
    """

    def __init__(self, source: Any) -> None:
        self.source = source

    def describe(self) -> list:
        return []  # families are produced at scrape time (no duplicate registration checks)

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("shapserve_explain_redis_up", "1 when the explanation queue could be read from Redis")
        try:
            from rq import Queue, Worker

            conn, queue_name = self.source()
            queue = Queue(queue_name, connection=conn)
            depth = queue.count
            running = queue.started_job_registry.count
            workers = Worker.count(connection=conn, queue=queue)
        except Exception as exc:
            log.debug("explain queue state unavailable: %s", exc)
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
