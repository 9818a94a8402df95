"""POST /explain, GET /explain/{job_id}, GET /explain/{job_id}/heatmap.png.

The API validates and enqueues; ``python -m worker`` computes (see :mod:`worker`). Redis is
needed only here: when it is unreachable these routes answer 503 and /predict is unaffected
(every Redis call has a short timeout and runs in a thread, off the event loop).

Parameters (query string or multipart form fields, beside the image's ``file`` field):
``target`` (class label or index; default the top-1 prediction), ``segments``, ``samples``,
``background``, ``seed``. Out of range: 422 ``invalid_parameter`` naming the allowed range.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from prometheus_client import REGISTRY, Counter

from service import auth, metrics
from service.errors import error_responses
from service.explain_form import read_explain_upload
from service.explain_metrics import ExplainCollector
from shapcore.errors import QueueFull, ShapserveError, TooManyJobs
from shapcore.images import decode_image
from shapcore.jobs.queue import (
    JobRequest,
    artifact_key,
    connect,
    job_status,
    png_key,
    retry_after_estimate,
    submit,
    unpack_artifact,
    valid_job_id,
)
from shapcore.jobs.settings import ExplainSettings, get_explain_settings

router = APIRouter(tags=["explain"])

REQUESTS = Counter(
    f"{metrics.NAMESPACE}_explain_requests_total",
    "POST /explain answers, by outcome (accepted, deduplicated, rejected, queue_full, too_many_jobs, "
    "redis_unavailable).",
    ["outcome"],
)
for _outcome in ("accepted", "deduplicated", "rejected", "queue_full", "too_many_jobs", "redis_unavailable"):
    REQUESTS.labels(_outcome)

PARAMS = ("target", "segments", "samples", "background", "seed")

_clients: dict[str, Any] = {}
_active = {"redis_url": None, "queue": None}


def _client(url: str, timeout: float):
    if url not in _clients:
        _clients[url] = connect(url, timeout)
    return _clients[url]


def _metrics_source() -> tuple[Any, str]:
    """Redis client and queue name for /metrics: those of the app that served last, else the env's."""
    s = get_explain_settings()
    url = _active["redis_url"] or s.redis_url
    return _client(url, s.explain_redis_timeout_s), _active["queue"] or s.explain_queue


REGISTRY.register(ExplainCollector(_metrics_source))


@dataclass
class _Context:
    settings: ExplainSettings
    redis: Any


def _context(request: Request) -> _Context:
    ctx = getattr(request.app.state, "explain", None)
    if ctx is None:
        service_settings = request.app.state.settings
        settings = get_explain_settings().model_copy(
            update={
                "redis_url": service_settings.redis_url,
                "model_registry": service_settings.model_registry,
                "model_version": service_settings.model_version,
                "max_image_pixels": service_settings.max_image_pixels,
            }
        )
        ctx = _Context(settings=settings, redis=_client(settings.redis_url, settings.explain_redis_timeout_s))
        request.app.state.explain = ctx
        _active["redis_url"] = settings.redis_url
        _active["queue"] = settings.explain_queue
    return ctx


def _redact(url: str) -> str:
    from service.routers.health import redact_url

    return redact_url(url)


async def _redis_call(ctx: _Context, fn, *args):
    """Run a blocking Redis operation in a thread; Redis trouble becomes a 503."""
    import redis

    try:
        return await asyncio.to_thread(fn, *args)
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise ShapserveError(
            503,
            "queue_unavailable",
            f"explanations are unavailable: the job queue (Redis at {_redact(ctx.settings.redis_url)}) cannot be "
            f"reached ({type(exc).__name__}); /predict is not affected",
            headers={"Retry-After": "5"},
        ) from None


# -- parameters --------------------------------------------------------------------------------


def _invalid(message: str) -> ShapserveError:
    metrics.reject("invalid_parameter")
    REQUESTS.labels("rejected").inc()
    return ShapserveError(422, "invalid_parameter", message)


#: A decimal integer in ASCII digits: int() alone also takes "1_000", "+5" and other scripts' digits.
_INTEGER = re.compile(r"-?[0-9]+")


def _shown(raw: str) -> str:
    return repr(raw) if len(raw) <= 40 else f"{raw[:40]!r}... ({len(raw)} characters)"


def _int_param(name: str, raw: str | None, default: int, bounds: tuple[int, int]) -> int:
    lo, hi = bounds
    if raw is None or raw == "":
        return default
    text = raw.strip()
    if not _INTEGER.fullmatch(text):
        raise _invalid(f"{name} must be an integer from {lo} to {hi} (got {_shown(raw)})")
    if len(text.lstrip("-")) > 30:  # far out of any range (and int() refuses over 4300 digits)
        raise _invalid(f"{name} must be from {lo} to {hi} (got {_shown(raw)})")
    value = int(text)
    if not lo <= value <= hi:
        raise _invalid(f"{name} must be from {lo} to {hi} (got {value})")
    return value


def resolve_target(raw: str | None, class_names: list[str]) -> int | None:
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    if _INTEGER.fullmatch(text):
        index = int(text) if len(text) <= 30 else -1
        if 0 <= index < len(class_names):
            return index
    else:
        lowered = [c.lower() for c in class_names]
        if text.lower() in lowered:
            return lowered.index(text.lower())
    raise _invalid(
        f"unknown target class {_shown(text)}: use a label ({', '.join(class_names)}) "
        f"or an index from 0 to {len(class_names) - 1}"
    )


def parse_params(raw: dict[str, str | None], settings: ExplainSettings, class_names: list[str]) -> dict[str, Any]:
    ranges = settings.ranges()
    out = {
        "segments": _int_param("segments", raw.get("segments"), settings.explain_default_segments, ranges["segments"]),
        "samples": _int_param("samples", raw.get("samples"), settings.explain_default_samples, ranges["samples"]),
        "background": _int_param(
            "background", raw.get("background"), settings.explain_default_background, ranges["background"]
        ),
        "seed": _int_param("seed", raw.get("seed"), settings.explain_default_seed, ranges["seed"]),
        "target": resolve_target(raw.get("target"), class_names),
    }
    evaluations = out["samples"] * out["background"]
    if evaluations > settings.explain_max_evaluations:
        raise _invalid(
            f"samples x background = {out['samples']} x {out['background']} = {evaluations} model evaluations, "
            f"over the limit of {settings.explain_max_evaluations}: lower samples or background"
        )
    return out


def _merge(query: dict[str, str], form: dict[str, str]) -> dict[str, str | None]:
    merged: dict[str, str | None] = {}
    for name in PARAMS:
        q, f = query.get(name), form.get(name)
        if q is not None and f is not None and q.strip() != f.strip():
            raise _invalid(f"{name} is given twice with different values ({q!r} in the query, {f!r} in the form)")
        merged[name] = f if f is not None else q
    return merged


def _model_identity(request: Request, ctx: _Context) -> tuple[str, list[str]]:
    """The version /predict serves now (explanations use the same), and its class names."""
    state = getattr(request.app.state, "service", None)
    served = state.engine.current if state is not None else None
    if served is not None:
        return served.version, list(served.class_names)
    from shapcore.errors import UserError
    from shapcore.registry import Registry

    try:
        registry = Registry(ctx.settings.model_registry)
        version = registry.resolve(ctx.settings.model_version)
        return version, list(registry.metadata(version)["class_names"])
    except UserError as exc:
        raise ShapserveError(
            503, "model_not_ready", f"no model to explain: {exc}", headers={"Retry-After": "5"}
        ) from None


# -- routes ------------------------------------------------------------------------------------------

def _parameter_schemas(settings: ExplainSettings) -> dict[str, dict[str, Any]]:
    """OpenAPI schemas of the parameters, with the ranges :func:`parse_params` enforces.

    The route reads them as strings and parses them itself (a bad value gets a 422 naming the
    allowed range), so FastAPI would document them as strings; these say what is accepted.
    The ranges are the environment's, as the service process reads it. Not expressible here:
    ``target`` must name a class of the served model, and samples x background must stay
    within EXPLAIN_MAX_EVALUATIONS (both 422 too).
    """
    ranges = settings.ranges()
    described = {
        "segments": ("SLIC superpixels asked for.", settings.explain_default_segments),
        "samples": ("Coalitions evaluated (KernelSHAP nsamples).", settings.explain_default_samples),
        "background": ("Background images standing in for hidden superpixels.", settings.explain_default_background),
        "seed": ("Seed of the coalition sampling.", settings.explain_default_seed),
    }
    out: dict[str, dict[str, Any]] = {
        "target": {
            "type": "string",
            "description": "Class label (any case) or index of the served model; default: the top-1 prediction.",
        }
    }
    for name, (text, default) in described.items():
        lo, hi = ranges[name]
        out[name] = {"type": "integer", "minimum": lo, "maximum": hi, "default": default, "description": text}
    limit = settings.explain_max_evaluations
    out["samples"]["description"] += f" samples x background may not exceed {limit}."
    return out


_PARAMETERS = _parameter_schemas(get_explain_settings())
_MULTIPART_BODY = {
    "parameters": [
        {"name": name, "in": "query", "required": False, "description": schema["description"], "schema": schema}
        for name, schema in _PARAMETERS.items()
    ],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "One image, as for /predict."},
                        **_PARAMETERS,
                    },
                }
            }
        },
    },
    "responses": {
        "200": {
            "description": "An identical request had already finished: its job, at once.",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
}


@router.post(
    "/explain",
    status_code=202,
    summary="Queue a SHAP explanation",
    description="Multipart field `file` (validated as /predict does) and optional `target`, `segments`, `samples`, "
    "`background`, `seed` as form fields or query parameters. Answers 202 with the job's URLs (200 when an "
    "identical request already finished: same image bytes, model version, parameters and API key reuse one job). "
    "A job can be read only with the key that created it (404 to other keys).",
    openapi_extra=_MULTIPART_BODY,
    responses=error_responses(400, 413, 415, 422, 429, 503),
)
async def post_explain(
    request: Request,
    # Parsed by parse_params; documented (as integers with their ranges) by _MULTIPART_BODY.
    target: Annotated[str | None, Query(include_in_schema=False)] = None,
    segments: Annotated[str | None, Query(include_in_schema=False)] = None,
    samples: Annotated[str | None, Query(include_in_schema=False)] = None,
    background: Annotated[str | None, Query(include_in_schema=False)] = None,
    seed: Annotated[str | None, Query(include_in_schema=False)] = None,
) -> Response:
    ctx = _context(request)
    settings = ctx.settings
    service_settings = request.app.state.settings
    try:
        upload, form = await read_explain_upload(request, max_bytes=service_settings.max_upload_bytes, fields=PARAMS)
    except Exception:
        REQUESTS.labels("rejected").inc()
        raise
    query = {k: v for k, v in (("target", target), ("segments", segments), ("samples", samples),
                               ("background", background), ("seed", seed)) if v is not None}  # fmt: skip
    version, class_names = _model_identity(request, ctx)
    params = parse_params(_merge(query, form), settings, class_names)

    state = getattr(request.app.state, "service", None)
    loop = asyncio.get_running_loop()
    executor = state.decode_executor if state is not None else None
    try:  # the same decoding checks as /predict, before anything is queued
        await loop.run_in_executor(executor, decode_image, upload.data, settings.max_image_pixels)
    except Exception:
        REQUESTS.labels("rejected").inc()
        raise

    job_request = JobRequest(image=upload.data, model_version=version, **params)
    try:
        job, created = await _redis_call(
            ctx, submit, ctx.redis, settings, job_request, auth.owner_of(request), auth.principal(request.scope)
        )
    except QueueFull:
        REQUESTS.labels("queue_full").inc()
        raise
    except TooManyJobs:
        REQUESTS.labels("too_many_jobs").inc()
        raise
    except ShapserveError:
        REQUESTS.labels("redis_unavailable").inc()
        raise
    REQUESTS.labels("accepted" if created else "deduplicated").inc()
    status = "queued" if created else (await _redis_call(ctx, job.get_status) or "queued")
    finished = status == "finished"
    status_url = f"/explain/{job.id}"
    body = {
        "job_id": job.id,
        "status_url": status_url,
        "heatmap_url": f"{status_url}/heatmap.png",
        "status": "queued" if status in ("created", "deferred", "scheduled") else status,
        "deduplicated": not created,
        "model_version": version,
        "parameters": {**params, "target_label": class_names[params["target"]] if params["target"] is not None
                       else None},
    }  # fmt: skip
    return Response(
        json.dumps(body),
        status_code=200 if finished else 202,
        media_type="application/json",
        headers={"Location": status_url},
    )


def _unknown(job_id: str) -> ShapserveError:
    return ShapserveError(404, "not_found", f"no explanation job {job_id!r} (unknown, or its result expired)")


async def _status(request: Request, job_id: str) -> tuple[_Context, dict[str, Any]]:
    ctx = _context(request)
    if not valid_job_id(job_id):
        raise _unknown(job_id)
    doc = await _redis_call(ctx, job_status, ctx.redis, ctx.settings, job_id, auth.owner_of(request))
    if doc is None:
        raise _unknown(job_id)
    return ctx, doc


def _retry_after(doc: dict[str, Any]) -> str:
    if doc["status"] == "queued" and doc.get("queue_position"):
        return str(min(60, max(1, doc["queue_position"])))
    return "1"


@router.get(
    "/explain/{job_id}",
    summary="State of an explanation job",
    description="`status`: queued | started | finished | failed; `queue_position` (1 = next), `progress` (0..1), "
    "`result` once finished, `error` (the reason) once failed.",
    responses=error_responses(404, 503),
)
async def get_explain(request: Request, job_id: Annotated[str, Path()]) -> Response:
    _, doc = await _status(request, job_id)
    headers = {} if doc["status"] in ("finished", "failed") else {"Retry-After": _retry_after(doc)}
    return Response(json.dumps(doc), media_type="application/json", headers=headers)


def _heatmap_classes(raw: str, result: dict[str, Any]) -> tuple[str, list[int]]:
    labels = [c["label"] for c in result["classes"]]
    text = (raw or "target").strip().lower()
    if text == "target":
        return "target", [result["target"]["index"]]
    if text == "all":
        return "all", list(range(len(labels)))
    picked: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if part.isascii() and part.isdigit() and len(part) <= 30 and int(part) < len(labels):
            picked.append(int(part))
        elif part in [lbl.lower() for lbl in labels]:
            picked.append([lbl.lower() for lbl in labels].index(part))
        else:
            metrics.reject("invalid_parameter")
            raise ShapserveError(
                422,
                "invalid_parameter",
                f"classes must be 'target', 'all' or a comma-separated list of labels ({', '.join(labels)}) "
                f"or indices 0 to {len(labels) - 1} (got {raw!r})",
            )
    picked = list(dict.fromkeys(picked))
    return ",".join(str(i) for i in picked), picked


@router.get(
    "/explain/{job_id}/heatmap.png",
    summary="Heatmap of a finished explanation",
    description="The image in grey under the superpixel SHAP values (red: for the class, blue: against), a "
    "symmetric colour scale with a colour bar, label and probability as titles; 256+ px per panel. "
    "`classes`: `target` (default), `all` (the 10 classes) or a list such as `cat,dog`. 409 while the job is "
    "unfinished (with Retry-After) or failed (with the reason).",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **error_responses(404, 409, 422, 503)},
)
async def get_heatmap(
    request: Request,
    job_id: Annotated[str, Path()],
    classes: Annotated[str, Query(description="target | all | comma-separated labels or indices")] = "target",
) -> Response:
    ctx, doc = await _status(request, job_id)
    if doc["status"] == "failed":
        raise ShapserveError(409, "explanation_failed", f"the explanation failed: {doc['error']}")
    if doc["status"] != "finished":
        where = (
            f"queued (position {doc['queue_position']})"
            if doc["status"] == "queued"
            else f"running ({math.floor(100 * doc['progress'])}%)"
        )
        raise ShapserveError(
            409,
            "not_ready",
            f"the explanation is not finished yet: {where}",
            headers={"Retry-After": _retry_after(doc)},
        )
    result = doc["result"]
    variant, picked = _heatmap_classes(classes, result)
    cache = png_key(job_id, variant)
    png = await _redis_call(ctx, ctx.redis.get, cache)
    if png is None:
        artifact = await _redis_call(ctx, ctx.redis.get, artifact_key(job_id))
        if artifact is None:
            raise _unknown(job_id)
        from service.explain_heatmap import render_heatmap

        image, labels = await asyncio.to_thread(unpack_artifact, artifact)
        png = await asyncio.to_thread(render_heatmap, image, labels, result, picked)
        ttl = await _redis_call(ctx, ctx.redis.ttl, artifact_key(job_id))
        expire = max(60, int(ttl)) if ttl and ttl > 0 else 3600
        await _redis_call(ctx, functools.partial(ctx.redis.set, cache, png, ex=expire))
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


__all__ = ["parse_params", "resolve_target", "retry_after_estimate", "router"]
