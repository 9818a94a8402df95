"""Every Prometheus metric of the prediction service, on prometheus-client's default registry.

Anything else registered there (the explanation endpoints' metrics, the process collector's
``process_*`` series) is exposed by ``GET /metrics`` too. Labels are bounded: routes are
route templates (``/predict``, never a raw path; ``<unmatched>`` for 404s), statuses are
HTTP codes, reasons are :mod:`service.uploads` codes, classes are the model's class names.

Names follow Prometheus conventions: ``_seconds`` for durations, ``_total`` for counters,
``_info`` for the model identity.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, Info, generate_latest

if TYPE_CHECKING:
    from collections.abc import Iterable

    from starlette.types import ASGIApp, Message, Receive, Scope, Send

NAMESPACE = "shapserve"
#: 1 ms .. 10 s, about three buckets per decade, finer from 0.25 to 0.75 s: whether the p99 of the
#: /predict answers stays within PREDICT_QUEUE_BUDGET_MS (500) plus one full batch (issue 27)
#: must be decidable from the histogram.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.3, 0.4, 0.5, 0.6, 0.65, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
#: Every value the ``reason`` label of REJECTED_INPUTS can take (see service.uploads).
REJECT_REASONS: tuple[str, ...] = (
    "empty_body",
    "malformed_multipart",
    "unsupported_media_type",
    "missing_file",
    "empty_file",
    "too_many_files",
    "unknown_field",
    "upload_too_large",
    "not_an_image",
    "corrupt_image",
    "image_too_large",
    "invalid_parameter",
)
UNMATCHED_ROUTE = "<unmatched>"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

HTTP_REQUESTS = Counter(
    f"{NAMESPACE}_http_requests_total",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    f"{NAMESPACE}_http_request_duration_seconds",
    "Time from the request's arrival to the end of its response, by route template, method and status.",
    ["route", "method", "status"],
    buckets=LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge(f"{NAMESPACE}_http_requests_in_flight", "HTTP requests being handled now.")

INFERENCE_LATENCY = Histogram(
    f"{NAMESPACE}_inference_duration_seconds",
    "Duration of one forward pass (one batch), including moving the batch to the device and back.",
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(f"{NAMESPACE}_batch_size", "Images per forward pass.", buckets=BATCH_BUCKETS)
QUEUE_DEPTH = Gauge(f"{NAMESPACE}_batcher_queue_depth", "Images waiting for a forward pass.")
QUEUE_WAIT = Histogram(
    f"{NAMESPACE}_batcher_queue_wait_seconds",
    "Time an image waits in the batcher before its forward pass starts.",
    buckets=LATENCY_BUCKETS,
)
DECODE_LATENCY = Histogram(
    f"{NAMESPACE}_image_decode_duration_seconds",
    "Time to decode one upload and reduce it to the model's source size (in the decode threads).",
    buckets=LATENCY_BUCKETS,
)
PREDICTED_IMAGES = Counter(f"{NAMESPACE}_predicted_images_total", "Images classified.")
REJECTED_INPUTS = Counter(
    f"{NAMESPACE}_rejected_inputs_total", "Requests refused for a bad input, by reason.", ["reason"]
)
for _reason in REJECT_REASONS:
    REJECTED_INPUTS.labels(_reason)

#: Refused credentials: no key (401), an unknown key (403), a non-admin key on an admin route (403).
AUTH_FAILURE_REASONS: tuple[str, ...] = ("missing_key", "invalid_key", "not_admin")
AUTH_FAILURES = Counter(
    f"{NAMESPACE}_auth_failures_total", "Requests refused for their API key, by reason.", ["reason"]
)
for _reason in AUTH_FAILURE_REASONS:
    AUTH_FAILURES.labels(_reason)
#: The routes with a per-key rate limit (service.ratelimit).
RATE_LIMITED_ROUTES: tuple[str, ...] = ("/predict", "/explain")
RATE_LIMITED = Counter(
    f"{NAMESPACE}_rate_limited_total", "Requests refused with 429 by the per-key rate limit, by route.", ["route"]
)
for _route in RATE_LIMITED_ROUTES:
    RATE_LIMITED.labels(_route)
PREDICT_SHED = Counter(
    f"{NAMESPACE}_predict_shed_total",
    "POST /predict refused at once with 503 overloaded: the queued work ahead was over PREDICT_QUEUE_BUDGET_MS.",
)
REQUEST_TIMEOUTS = Counter(
    f"{NAMESPACE}_request_timeouts_total", "Requests cut off after REQUEST_TIMEOUT_S (answered 503 when possible)."
)

MODEL_INFO = Info(f"{NAMESPACE}_model", "The model version being served.")
MODEL_LOADED_AT = Gauge(f"{NAMESPACE}_model_loaded_timestamp_seconds", "Unix time the served version was loaded.")
MODEL_RELOADS = Counter(f"{NAMESPACE}_model_reloads_total", "Model switches attempted, by result.", ["result"])
EXPLAIN_OUTCOMES = (
    "accepted", "deduplicated", "fast", "rejected", "queue_full", "too_many_jobs", "redis_unavailable"
)  # fmt: skip
EXPLAIN_REQUESTS = Counter(
    f"{NAMESPACE}_explain_requests_total",
    f"POST /explain answers, by outcome ({', '.join(EXPLAIN_OUTCOMES)}).",
    ["outcome"],
)
for _outcome in EXPLAIN_OUTCOMES:
    EXPLAIN_REQUESTS.labels(_outcome)
for _result in ("success", "failure", "unchanged"):
    MODEL_RELOADS.labels(_result)
MODEL_EVALUATED = Gauge(
    f"{NAMESPACE}_model_evaluated", "1 if the served version has evaluation results (metrics.json), else 0."
)
MODEL_ACCURACY = Gauge(f"{NAMESPACE}_model_accuracy", "Evaluation accuracy of the served version (0..1).")
MODEL_MACRO_F1 = Gauge(f"{NAMESPACE}_model_macro_f1", "Evaluation macro-averaged F1 of the served version.")
MODEL_MACRO_PRECISION = Gauge(f"{NAMESPACE}_model_macro_precision", "Evaluation macro precision of the served version.")
MODEL_MACRO_RECALL = Gauge(f"{NAMESPACE}_model_macro_recall", "Evaluation macro recall of the served version.")
MODEL_CLASS_F1 = Gauge(f"{NAMESPACE}_model_class_f1", "Evaluation F1 of the served version, by class.", ["class_name"])
MODEL_EVAL_GAUGES = (MODEL_ACCURACY, MODEL_MACRO_F1, MODEL_MACRO_PRECISION, MODEL_MACRO_RECALL)


def reject(reason: str) -> None:
    REJECTED_INPUTS.labels(reason if reason in REJECT_REASONS else "other").inc()


def set_model(metadata: dict[str, Any], version: str, evaluation: dict[str, Any] | None, device: str) -> None:
    """Publish the served version's identity and evaluation (called at start-up and on every switch)."""
    MODEL_INFO.info(
        {
            "name": str(metadata.get("name", "")),
            "version": version,
            "architecture": str(metadata.get("architecture", "")),
            "profile": str(metadata.get("profile", "")),
            "input_size": str(metadata.get("input_size", "")),
            "device": device,
        }
    )
    MODEL_LOADED_AT.set(time.time())
    MODEL_CLASS_F1.clear()
    if not evaluation:
        MODEL_EVALUATED.set(0)
        for gauge in MODEL_EVAL_GAUGES:
            gauge.set(float("nan"))
        return
    MODEL_EVALUATED.set(1)
    macro = evaluation.get("macro", {})
    MODEL_ACCURACY.set(float(evaluation.get("accuracy", float("nan"))))
    MODEL_MACRO_F1.set(float(macro.get("f1", float("nan"))))
    MODEL_MACRO_PRECISION.set(float(macro.get("precision", float("nan"))))
    MODEL_MACRO_RECALL.set(float(macro.get("recall", float("nan"))))
    for name, row in (evaluation.get("per_class") or {}).items():
        MODEL_CLASS_F1.labels(str(name)).set(float(row.get("f1", float("nan"))))


def render() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST


def route_template(scope: Scope) -> str:
    """The template of the route that served (or would have served) this request.

    Starlette's router sets ``scope["route"]``. A request refused by a middleware before
    routing (401/403 by the API-key check, 429 by the rate limit, 503 by the timeout) has
    none, so the app's routes are matched here: such refusals are counted under their
    route, not lumped with the 404s under ``<unmatched>``.
    """
    route = scope.get("route")
    if route is not None:
        return getattr(route, "path", None) or UNMATCHED_ROUTE
    app = scope.get("app")
    return _match_template(getattr(app, "routes", ()), scope) or UNMATCHED_ROUTE


def _match_template(routes: Iterable[Any], scope: Scope) -> str | None:
    """First route template among ``routes`` matching ``scope``, looking inside included routers.

    FastAPI up to 0.11x copies an included router's routes into the app; later versions keep
    one entry per included router (no ``path`` of its own) whose routes hold the templates.
    ``include_router`` is called here without a prefix (the routers carry their own), so the
    inner templates match the request path as they are.
    """
    from starlette.routing import Match

    for candidate in routes:
        match, _ = candidate.matches(scope)
        if match is Match.NONE:
            continue
        path = getattr(candidate, "path", None)
        if isinstance(path, str) and path:
            return path
        inner = getattr(candidate, "original_router", None) or candidate
        found = _match_template(getattr(inner, "routes", ()), scope)
        if found:
            return found
    return None


class HTTPMetricsMiddleware:
    """Pure ASGI middleware (no per-request task or body copy): counts and times every request.

    The route label is the matched route's template (:func:`route_template`); requests that
    match no route share one label value.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            HTTP_IN_FLIGHT.dec()
            template = route_template(scope)
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            labels = (template, method, str(status))
            HTTP_REQUESTS.labels(*labels).inc()
            HTTP_LATENCY.labels(*labels).observe(time.perf_counter() - start)
