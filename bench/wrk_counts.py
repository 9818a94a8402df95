"""The /predict counts of a shapserve ``/metrics`` scrape, and their differences between two scrapes.

Used by bench/wrk_predict.py: the goodput and refusals of a load level are what the server
itself counted between a scrape before and one after (not what a client believes it got).
"""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass, field

ROUTE = "/predict"


@dataclass
class Counts:
    """/predict answers by status, the 2xx latency buckets, shed requests and batches."""

    by_status: dict[str, float] = field(default_factory=dict)
    buckets_2xx: dict[float, float] = field(default_factory=dict)  # upper bound (s) -> cumulative count
    shed: float = 0.0
    batches: float = 0.0
    batched_images: float = 0.0

    @property
    def ok(self) -> int:
        return int(sum(v for k, v in self.by_status.items() if k.startswith("2")))

    @property
    def answered(self) -> int:
        return int(sum(self.by_status.values()))

    def __sub__(self, other: Counts) -> Counts:
        return Counts(
            by_status={k: v - other.by_status.get(k, 0.0) for k, v in self.by_status.items()},
            buckets_2xx={k: v - other.buckets_2xx.get(k, 0.0) for k, v in self.buckets_2xx.items()},
            shed=self.shed - other.shed,
            batches=self.batches - other.batches,
            batched_images=self.batched_images - other.batched_images,
        )

    def mean_batch(self) -> float | None:
        return self.batched_images / self.batches if self.batches else None

    def p99_2xx_ms(self, q: float = 0.99) -> float | None:
        """The q-quantile of the 2xx latency, interpolated linearly within the histogram's bucket
        (as Prometheus' histogram_quantile does)."""
        bounds = sorted(self.buckets_2xx)
        if not bounds or self.buckets_2xx[bounds[-1]] <= 0:
            return None
        rank = q * self.buckets_2xx[bounds[-1]]
        lower_bound, lower_count = 0.0, 0.0
        for bound in bounds:
            count = self.buckets_2xx[bound]
            if count >= rank:
                if math.isinf(bound):
                    return 1000.0 * lower_bound
                share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
                return 1000.0 * (lower_bound + share * (bound - lower_bound))
            lower_bound, lower_count = bound, count
        return None


def scrape_counts(url: str) -> Counts | None:
    """The server's /predict counts, or None when it has no shapserve metrics (another server)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=30) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    counts, seen = Counts(), False
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if s.name == "shapserve_http_requests_total" and labels.get("route") == ROUTE:
                seen = True
                if labels.get("method") == "POST":
                    status = labels["status"]
                    counts.by_status[status] = counts.by_status.get(status, 0.0) + s.value
            elif (
                s.name == "shapserve_http_request_duration_seconds_bucket"
                and labels.get("route") == ROUTE
                and labels.get("method") == "POST"
                and labels.get("status", "").startswith("2")
            ):
                bound = float(labels["le"])
                counts.buckets_2xx[bound] = counts.buckets_2xx.get(bound, 0.0) + s.value
            elif s.name == "shapserve_predict_shed_total":
                counts.shed = s.value
            elif s.name == "shapserve_batch_size_count":
                counts.batches = s.value
            elif s.name == "shapserve_batch_size_sum":
                counts.batched_images = s.value
    return counts if seen or counts.batches else None


def p99_upper_bound_ms(fine_us: list[float], ok: int, total: int) -> float | None:
    """An upper bound on the 2xx p99 from the quantiles of *all* answers (0.0 .. 100.0 % in 0.1
    steps): the slowest 1 % of the ``ok`` answers are among the slowest ``0.01 * ok`` of all
    ``total``, so the quantile of all answers at ``1 - 0.01 * ok / total`` (rounded down to the
    grid, which only loosens it) is at least the 2xx p99."""
    if ok <= 0 or total <= 0 or not fine_us:
        return None
    q = 100.0 * (1.0 - 0.01 * min(ok, total) / total)
    index = max(0, min(len(fine_us) - 1, math.floor(q * 10 + 1e-9)))
    return fine_us[index] / 1000.0


def p99_lower_bound_ms(fine_us: list[float], ok: int, total: int) -> float | None:
    """A lower bound on the 2xx p99: the fastest ``0.99 * ok`` of all answers are at least as fast
    as the fastest ``0.99 * ok`` 2xx answers, so the quantile of all answers at ``0.99 * ok / total``
    (rounded up to the grid) is at most the 2xx p99. Tight only when every refusal is slower than
    the answers."""
    if ok <= 0 or total <= 0 or not fine_us:
        return None
    q = 100.0 * 0.99 * min(ok, total) / total
    index = max(0, min(len(fine_us) - 1, math.ceil(q * 10 - 1e-9)))
    return fine_us[index] / 1000.0
