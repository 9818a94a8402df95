"""Explanation job statistics kept in one Redis hash (``shapserve:explain:metrics``).

Written by the worker (each finished or failed job), read by the API for its queue figures.
"""

from __future__ import annotations

import logging
import math
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


def read_metrics(connection: Any) -> dict[str, float]:
    raw = connection.hgetall(METRICS_KEY)
    return {k.decode() if isinstance(k, bytes) else k: float(v) for k, v in raw.items()}
