"""POST /explain, GET /explain/{job_id}, GET /explain/{job_id}/heatmap.png and /faithfulness.png.

The API validates, decodes and enqueues; ``python -m worker`` computes (see :mod:`worker`).
Redis is needed only here: when it is unreachable these routes answer 503 and /predict is
unaffected (every Redis call has a short timeout and runs in a thread, off the event loop).

Parameters are multipart form fields beside ``file``: ``target`` (class label or index;
default the top-1 prediction), ``segments``, ``samples``, ``background``, ``seed``, declared
with their bounds from the settings (:mod:`service.explain_params`). Out of range: 422
``invalid_parameter`` naming the allowed range.

No ``from __future__ import annotations`` here: the POST route is declared inside
:func:`build_router` and FastAPI reads its parameter annotations as objects.
"""

import asyncio
import functools
import json
import math
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from service import auth, metrics
from service.deps import ExplainSettingsDep, RedisDep, StateDep
from service.errors import error_responses
from service.explain_params import (
    TARGET_DESCRIPTION,
    background_field,
    bounded,
    check_evaluations,
    check_samples,
    descriptions,
    flag_field,
    form_fields_only,
    heatmap_classes,
    invalid,
    method_field,
    players_field,
    resolve_target,
)
from service.settings import redact_url
from service.state import ServiceState
from service.uploads import BINARY, UploadRoute, read_upload, too_many_files
from shapcore.errors import InputError, QueueFull, ShapserveError, TooManyJobs, UserError
from shapcore.images import explanation_input
from shapcore.jobs.artifact import artifact_key, png_key, unpack_artifact
from shapcore.jobs.image import JobImage
from shapcore.jobs.inline import store_inline
from shapcore.jobs.options import FAST_METHOD, GRID_CELLS, SAMPLED_METHODS
from shapcore.jobs.queue import STATUS_MAP, JobRequest, job_status, submit, valid_job_id
from shapcore.jobs.settings import ExplainSettings

REQUESTS = metrics.EXPLAIN_REQUESTS


class _ExplainRoute(UploadRoute):
    """Counts refused POST /explain requests (bad upload or parameters) as outcome ``rejected``."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()
        if "POST" not in self.methods:
            return handler

        async def counted(request: Request) -> Response:
            try:
                return await handler(request)
            except (InputError, RequestValidationError):
                REQUESTS.labels("rejected").inc()
                raise

        return counted


async def _redis_call(settings: ExplainSettings, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking Redis operation in a thread; Redis trouble becomes a 503."""
    import redis

    try:
        return await asyncio.to_thread(fn, *args)
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise ShapserveError(
            503,
            "queue_unavailable",
            f"explanations are unavailable: the job queue (Redis at {redact_url(settings.redis_url)}) cannot be "
            f"reached ({type(exc).__name__}); /predict is not affected",
            headers={"Retry-After": "5"},
        ) from None


def _model_identity(state: ServiceState, settings: ExplainSettings) -> tuple[str, list[str]]:
    """The version /predict serves now (explanations use the same), and its class names."""
    served = state.engine.current
    if served is not None:
        return served.version, list(served.class_names)
    try:  # still loading: the version it will serve
        registry = state.engine.registry
        version = registry.resolve(settings.model_version)
        return version, list(registry.metadata(version)["class_names"])
    except UserError as exc:
        raise ShapserveError(
            503, "model_not_ready", f"no model to explain: {exc}", headers={"Retry-After": "5"}
        ) from None


async def _one_image(
    request: Request,
    file: Annotated[UploadFile, File(description="One image, as for /predict.", json_schema_extra=BINARY)],
):
    if len((await request.form()).getlist("file")) > 1:
        raise too_many_files(1)
    return await read_upload(file)


async def _enqueue(
    request: Request, settings: ExplainSettings, redis: Any, job_request: JobRequest
) -> tuple[Any, bool]:
    outcomes = ((QueueFull, "queue_full"), (TooManyJobs, "too_many_jobs"), (ShapserveError, "redis_unavailable"))
    try:
        job, created = await _redis_call(
            settings, submit, redis, settings, job_request, auth.owner_of(request), auth.principal(request.scope)
        )
    except ShapserveError as exc:
        REQUESTS.labels(next(label for kind, label in outcomes if isinstance(exc, kind))).inc()
        raise
    REQUESTS.labels("accepted" if created else "deduplicated").inc()
    return job, created


async def _explain_fast(
    request: Request,
    state: ServiceState,
    settings: ExplainSettings,
    redis: Any,
    upload: Any,
    target: int | None,
    curves: bool,
) -> Response:
    """``method=fast``: the served version's amortised explainer, in the request (:mod:`service.fast_explain`)."""
    import torch

    from service.fast_explain import explain_fast

    served = state.engine.current
    if served is None:
        raise ShapserveError(503, "model_not_ready", "the model is still loading", headers={"Retry-After": "1"})
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(state.decode_executor, served.explainer.get)  # 409 before any work if none
    with state.batcher.expect(1):
        pixels, model_input = await loop.run_in_executor(
            state.decode_executor, explanation_input, upload.data, settings.max_image_pixels,
            settings.explain_slic_max_side,
        )  # fmt: skip
    model_input = torch.from_numpy(model_input)
    served, rows = await state.batcher.submit(model_input.unsqueeze(0))  # the version that answered

    def work() -> tuple[dict[str, Any], bytes]:  # off the event loop: the fill is read from disk once
        extra = (served.forward, served.explainer.fill()) if curves else None
        return explain_fast(served.explainer.get(), pixels, model_input, rows[0], served.class_names, target,
                            curves=extra)  # fmt: skip

    result, artifact = await loop.run_in_executor(state.decode_executor, work)
    label = served.class_names[target] if target is not None else None
    params = {"method": FAST_METHOD, "target": target, "players": "grid", "background": "mean",
              "faithfulness": curves, "target_label": label}  # fmt: skip
    body: dict[str, Any] = {"job_id": None, "status_url": None, "heatmap_url": None, "faithfulness_url": None,
                            "status": "finished", "deduplicated": False, "model_version": served.version,
                            "parameters": params, "result": result}  # fmt: skip
    try:  # kept for its URLs; without Redis the answer still stands, without them
        job_id = await _redis_call(
            settings, store_inline, redis, settings, result, params, artifact, auth.owner_of(request)
        )
    except ShapserveError:
        body["stored"] = False
    else:
        url = f"/explain/{job_id}"
        body.update(job_id=job_id, status_url=url, heatmap_url=f"{url}/heatmap.png", stored=True,
                    faithfulness_url=f"{url}/faithfulness.png" if curves else None)  # fmt: skip
    REQUESTS.labels("fast").inc()
    return Response(json.dumps(body), status_code=200, media_type="application/json")


def build_router(explain_settings: ExplainSettings) -> APIRouter:
    """The /explain routes; the parameters' bounds and defaults in OpenAPI are ``explain_settings``'."""
    router = APIRouter(tags=["explain"], route_class=_ExplainRoute)
    ranges, text, s = explain_settings.ranges(), descriptions(explain_settings), explain_settings

    @router.post(
        "/explain",
        status_code=202,
        summary="Queue a SHAP explanation",
        description="Multipart field `file` (validated as /predict does) and optional form fields `target`, "
        "`segments`, `samples`, `background`, `seed`, `method`, `players`, `faithfulness`. Answers 202 with the job's "
        "URLs (200 when an identical request already finished: the same decoded picture, model version, parameters and "
        "API key reuse one job). A job can be read only with the key that created it (404 to other keys). "
        "`method=fast` answers in the request: 200 with the `result` and the same URLs, or 409 when the served "
        "version has no amortised explainer.",
        responses={
            200: {"description": "An identical request had already finished (its job, at once), or method=fast."},
            **error_responses(400, 409, 413, 415, 422, 429, 503),
        },
        dependencies=[Depends(form_fields_only)],
    )
    async def post_explain(
        request: Request,
        state: StateDep,
        settings: ExplainSettingsDep,
        redis: RedisDep,
        upload: Annotated[Any, Depends(_one_image)],
        target: Annotated[str, Form(description=TARGET_DESCRIPTION)] = "",  # blank: the top-1 prediction
        segments: bounded("segments", ranges["segments"], text["segments"]) = s.explain_default_segments,
        samples: bounded("samples", ranges["samples"], text["samples"]) = s.explain_default_samples,
        background: background_field(text["background"]) = s.explain_default_background,
        seed: bounded("seed", ranges["seed"], text["seed"]) = s.explain_default_seed,
        method: method_field(text["method"]) = "kernel",
        faithfulness: flag_field("faithfulness", text["faithfulness"]) = "false",
        players: players_field(text["players"]) = "slic",
    ) -> Response:
        version, class_names = _model_identity(state, settings)
        if method == FAST_METHOD:
            if players != "grid" and "players" in (await request.form()):
                raise invalid("method=fast values the 8x8 grid's cells: players=slic is not available for it")
            chosen = resolve_target(target, class_names)
            return await _explain_fast(request, state, settings, redis, upload, chosen, faithfulness is True)
        if players == "grid":
            segments = GRID_CELLS * GRID_CELLS  # the grid's cells, whatever segments said
        params = {"segments": segments, "samples": samples, "background": background, "seed": seed,
                  "target": resolve_target(target, class_names), "method": method, "players": players,
                  "slic_compactness": settings.explain_slic_compactness}  # fmt: skip
        check_samples(method, samples, segments)
        if method in SAMPLED_METHODS:
            check_evaluations(samples, background, settings)
        loop = asyncio.get_running_loop()
        pixels, model_input = await loop.run_in_executor(  # the /predict checks, then the pixels the worker gets
            state.decode_executor, explanation_input, upload.data, settings.max_image_pixels,
            settings.explain_slic_max_side,
        )  # fmt: skip
        job_request = JobRequest(image=JobImage.from_arrays(pixels, model_input), model_version=version, **params)
        job, created = await _enqueue(request, settings, redis, job_request)
        status = "queued" if created else (await _redis_call(settings, job.get_status) or "queued")
        status_url = f"/explain/{job.id}"
        target_label = class_names[params["target"]] if params["target"] is not None else None
        body = {
            "job_id": job.id,
            "status_url": status_url,
            "heatmap_url": f"{status_url}/heatmap.png",
            "faithfulness_url": f"{status_url}/faithfulness.png",
            "status": STATUS_MAP.get(status, "queued"),
            "deduplicated": not created,
            "model_version": version,
            "parameters": {**params, "target_label": target_label},
        }
        return Response(json.dumps(body), status_code=200 if status == "finished" else 202,
                        media_type="application/json", headers={"Location": status_url})  # fmt: skip

    _add_read_routes(router)
    return router


def _add_read_routes(router: APIRouter) -> None:
    """GET /explain/{job_id} and its PNGs: module-level handlers that need none of build_router's settings."""
    router.add_api_route(
        "/explain/{job_id}",
        get_explain,
        methods=["GET"],
        summary="State of an explanation job",
        description="`status`: queued | started | finished | failed; `queue_position` (1 = next), `progress` "
        "(0..1), `result` once finished, `error` (the reason) once failed.",
        responses=error_responses(404, 503),
    )
    router.add_api_route(
        "/explain/{job_id}/heatmap.png",
        get_heatmap,
        methods=["GET"],
        summary="Heatmap of a finished explanation",
        description="The image in grey under the superpixel SHAP values (red: for the class, blue: against), a "
        "symmetric colour scale with a colour bar, label and probability as titles; 256+ px per panel. "
        "`classes`: `target` (default), `all` (the 10 classes) or a list such as `cat,dog`. 409 while the job is "
        "unfinished (with Retry-After) or failed (with the reason).",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **error_responses(404, 409, 422, 503)},
    )
    router.add_api_route(
        "/explain/{job_id}/faithfulness.png",
        get_faithfulness,
        methods=["GET"],
        summary="Deletion and insertion curves of a finished explanation",
        description="The target class's probability as the superpixels are hidden (deletion: lower area is "
        "better) or restored (insertion: higher is better) in the explanation's order, beside the mean of "
        "random orders, with the areas under the curves (`result.faithfulness`). 409 while the job is "
        "unfinished (with Retry-After) or failed (with the reason).",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **error_responses(404, 409, 503)},
    )


def _unknown(job_id: str) -> ShapserveError:
    return ShapserveError(404, "not_found", f"no explanation job {job_id!r} (unknown, or its result expired)")


async def _status(request: Request, settings: ExplainSettings, redis: Any, job_id: str) -> dict[str, Any]:
    if not valid_job_id(job_id):
        raise _unknown(job_id)
    doc = await _redis_call(settings, job_status, redis, settings, job_id, auth.owner_of(request))
    if doc is None:
        raise _unknown(job_id)
    return doc


def _retry_after(doc: dict[str, Any]) -> str:
    if doc["status"] == "queued" and doc.get("queue_position"):
        return str(min(60, max(1, doc["queue_position"])))
    return "1"


async def get_explain(
    request: Request, settings: ExplainSettingsDep, redis: RedisDep, job_id: Annotated[str, Path()]
) -> Response:
    doc = await _status(request, settings, redis, job_id)
    headers = {} if doc["status"] in ("finished", "failed") else {"Retry-After": _retry_after(doc)}
    return Response(json.dumps(doc), media_type="application/json", headers=headers)


def _not_finished(doc: dict[str, Any]) -> ShapserveError:
    if doc["status"] == "failed":
        return ShapserveError(409, "explanation_failed", f"the explanation failed: {doc['error']}")
    where = (
        f"queued (position {doc['queue_position']})"
        if doc["status"] == "queued"
        else f"running ({math.floor(100 * doc['progress'])}%)"
    )
    return ShapserveError(
        409, "not_ready", f"the explanation is not finished yet: {where}", headers={"Retry-After": _retry_after(doc)}
    )


async def get_heatmap(
    request: Request,
    settings: ExplainSettingsDep,
    redis: RedisDep,
    job_id: Annotated[str, Path()],
    classes: Annotated[str, Query(description="target | all | comma-separated labels or indices")] = "target",
) -> Response:
    doc = await _status(request, settings, redis, job_id)
    if doc["status"] != "finished":
        raise _not_finished(doc)
    result = doc["result"]
    variant, picked = heatmap_classes(classes, result)

    async def draw() -> bytes:
        artifact = await _redis_call(settings, redis.get, artifact_key(job_id))
        if artifact is None:
            raise _unknown(job_id)
        from shapcore.heatmap import render_heatmap

        image, labels, pixel_maps = await asyncio.to_thread(unpack_artifact, artifact)
        return await asyncio.to_thread(render_heatmap, image, labels, result, picked, pixel_maps)

    return await _cached_png(settings, redis, job_id, variant, draw)


async def get_faithfulness(
    request: Request, settings: ExplainSettingsDep, redis: RedisDep, job_id: Annotated[str, Path()]
) -> Response:
    doc = await _status(request, settings, redis, job_id)
    if doc["status"] != "finished":
        raise _not_finished(doc)
    result = doc["result"]
    if "faithfulness" not in result:  # a result stored before the curves were computed
        raise ShapserveError(404, "not_found", f"explanation job {job_id!r} has no faithfulness curves")

    async def draw() -> bytes:
        from service.explain_faithfulness_plot import render_faithfulness

        return await asyncio.to_thread(render_faithfulness, result)

    return await _cached_png(settings, redis, job_id, "faithfulness", draw)


async def _cached_png(
    settings: ExplainSettings, redis: Any, job_id: str, variant: str, draw: Callable[[], Awaitable[bytes]]
) -> Response:
    """The job's PNG ``variant`` from Redis, or drawn and kept there as long as the job's artifact."""
    cache = png_key(job_id, variant)
    png = await _redis_call(settings, redis.get, cache)
    if png is None:
        png = await draw()
        ttl = await _redis_call(settings, redis.ttl, artifact_key(job_id))
        expire = max(60, int(ttl)) if ttl and ttl > 0 else 3600
        await _redis_call(settings, functools.partial(redis.set, cache, png, ex=expire))
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
