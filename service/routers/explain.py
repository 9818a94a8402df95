"""POST /explain, GET /explain/{job_id} and its pictures: heatmap.png, segments.png, faithfulness.png.

Thin: the routes read the form (its fields' syntax and bounds in OpenAPI come from the settings,
:mod:`service.explain_params`), build the one checked
:class:`~shapcore.explain.request.ExplainRequest` and hand it to the explanation service
(:mod:`service.explanations`), which answers an inline method in the request or queues a job
for ``python -m worker``. Out-of-range or conflicting parameters: 422 ``invalid_parameter``
naming the rule. The answers are typed (:mod:`shapcore.explain.status`): their schemas are in
OpenAPI.

No ``from __future__ import annotations`` here: the POST route is declared inside
:func:`build_router` and FastAPI reads its parameter annotations as objects.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from service import auth, metrics
from service.deps import ExplainSettingsDep, ExplanationsDep, StateDep
from service.errors import error_responses
from service.explain_params import (
    TARGET_DESCRIPTION,
    background_field,
    bounded,
    descriptions,
    flag_field,
    form_fields_only,
    heatmap_classes,
    invalid,
    method_field,
    players_field,
    resolve_target,
    samples_field,
)
from service.state import ServiceState
from service.uploads import BINARY, UploadRoute, read_upload, too_many_files
from shapcore.errors import InputError, ShapserveError, UserError
from shapcore.explain.methods import DEFAULT_METHOD, get_method
from shapcore.explain.request import ExplainRequest, InvalidRequest
from shapcore.explain.status import ExplainAccepted, JobStatus
from shapcore.jobs.settings import ExplainSettings

REQUESTS = metrics.EXPLAIN_REQUESTS
PNG = {200: {"content": {"image/png": {}}}}
#: OpenAPI links from POST /explain's answer to the job's reads (clients and schemathesis follow them).
LINKS = {
    name: {"operationId": operation, "parameters": {"job_id": "$response.body#/job_id"}}
    for name, operation in (("status", "get_explanation"), ("heatmap", "get_explanation_heatmap"),
                            ("segments", "get_explanation_segments"), ("faithfulness", "get_explanation_faithfulness"))
}  # fmt: skip


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


def _json(model: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json",
                    headers=headers)  # fmt: skip


def build_router(explain_settings: ExplainSettings) -> APIRouter:
    """The /explain routes; the parameters' bounds and defaults in OpenAPI are ``explain_settings``'."""
    router = APIRouter(tags=["explain"], route_class=_ExplainRoute)
    ranges, text, s = explain_settings.ranges(), descriptions(explain_settings), explain_settings

    @router.post(
        "/explain",
        status_code=202,
        response_model=ExplainAccepted,
        summary="Explain an image: queue a SHAP explanation, or answer an inline method at once",
        description="Multipart field `file` (validated as /predict does) and optional form fields `target`, "
        "`segments`, `samples`, `background`, `seed`, `method`, `players`, `faithfulness`. Answers 202 with the job's "
        "URLs (200 when an identical request already finished: the same decoded picture, model version, parameters and "
        "API key reuse one job). A job can be read only with the key that created it (404 to other keys). "
        "`method=fast` answers in the request: 200 with the `result` (its quality figures: `result.explainer.quality`) "
        "and the same URLs, or 409 when the served version has no amortised explainer, it is being fitted, or its "
        "median rho against KernelSHAP is below EXPLAIN_FAST_MIN_RHO (the figure and the refit command in `details`).",
        responses={
            200: {"model": ExplainAccepted, "description": "An identical request had already finished, or an inline "
                  "method answered.", "links": LINKS},
            202: {"description": "Queued: poll `status_url`.", "links": LINKS},
            **error_responses(400, 409, 413, 415, 422, 429, 503),
        },
        dependencies=[Depends(form_fields_only)],
    )
    async def post_explain(
        request: Request,
        state: StateDep,
        settings: ExplainSettingsDep,
        explanations: ExplanationsDep,
        upload: Annotated[Any, Depends(_one_image)],
        target: Annotated[str, Form(description=TARGET_DESCRIPTION)] = "",  # blank: the top-1 prediction
        segments: bounded("segments", ranges["segments"], text["segments"]) = s.explain_default_segments,
        samples: samples_field(ranges["samples"], text["samples"]) = str(s.explain_default_samples),
        background: background_field(text["background"]) = s.explain_default_background,
        seed: bounded("seed", ranges["seed"], text["seed"]) = s.explain_default_seed,
        method: method_field(text["method"]) = DEFAULT_METHOD,
        faithfulness: flag_field("faithfulness", text["faithfulness"]) = "false",
        players: players_field(text["players"]) = "slic",
    ) -> Response:
        version, class_names = _model_identity(state, settings)
        form = await request.form()
        chosen = resolve_target(target, class_names)
        try:
            explain = ExplainRequest.build(
                settings, class_count=len(class_names), method=method, segments=segments, samples=samples,
                seed=seed, target=chosen, faithfulness=faithfulness is True,
                players=players if "players" in form else None,  # absent: the method's own layout
                background=background if "background" in form else None,
            )  # fmt: skip
        except InvalidRequest as exc:
            raise invalid(str(exc)) from None
        owner = auth.owner_of(request)
        if get_method(explain.method).inline:
            body = await explanations.inline(explain, upload, owner)
        else:
            body = await explanations.queue(explain, upload, version, owner, auth.principal(request.scope))
        label = class_names[chosen] if chosen is not None else None
        body = body.model_copy(update={"parameters": {**body.parameters, "target_label": label}})
        headers = {"Location": body.status_url} if body.status_url and body.result is None else None
        return _json(body, 200 if body.status == "finished" else 202, headers)

    _add_read_routes(router)
    return router


def _add_read_routes(router: APIRouter) -> None:
    """GET /explain/{job_id} and its PNGs: module-level handlers that need none of build_router's settings."""
    router.add_api_route(
        "/explain/{job_id}",
        get_explain,
        operation_id="get_explanation",
        methods=["GET"],
        response_model=JobStatus,
        summary="State of an explanation job",
        description="`status`: queued | started | finished | failed; `queue_position` (1 = next), `progress` "
        "(0..1), `result` once finished (`result.shap_values[i]` is player i of `segments_url`'s map), `error` "
        "(the reason) once failed.",
        responses=error_responses(404, 503),
    )
    router.add_api_route(
        "/explain/{job_id}/heatmap.png",
        get_heatmap,
        operation_id="get_explanation_heatmap",
        methods=["GET"],
        summary="Heatmap of a finished explanation",
        description="The image in grey under the players' SHAP values (red: for the class, blue: against), a "
        "symmetric colour scale with a colour bar, label and probability as titles; 256+ px per panel. "
        "`classes`: `target` (default), `all` (the 10 classes) or a list such as `cat,dog`. 409 while the job is "
        "unfinished (with Retry-After) or failed (with the reason).",
        response_class=Response,
        responses={**PNG, **error_responses(404, 409, 422, 503)},
    )
    router.add_api_route(
        "/explain/{job_id}/segments.png",
        get_segments,
        operation_id="get_explanation_segments",
        methods=["GET"],
        summary="The players' map of a finished explanation",
        description="A 16-bit greyscale PNG of the explained picture's size (`result.segments.height` x `width`) "
        "whose pixel values are the player indices of `result.shap_values`: value i is player i. 409 while the job "
        "is unfinished (with Retry-After) or failed (with the reason).",
        response_class=Response,
        responses={**PNG, **error_responses(404, 409, 503)},
    )
    router.add_api_route(
        "/explain/{job_id}/faithfulness.png",
        get_faithfulness,
        operation_id="get_explanation_faithfulness",
        methods=["GET"],
        summary="Deletion and insertion curves of a finished explanation",
        description="The target class's probability as the players are hidden (deletion: lower area is "
        "better) or restored (insertion: higher is better) in the explanation's order, beside the mean of "
        "random orders, with the areas under the curves (`result.faithfulness`). 409 while the job is "
        "unfinished (with Retry-After) or failed (with the reason).",
        response_class=Response,
        responses={**PNG, **error_responses(404, 409, 503)},
    )


def _png(png: bytes) -> Response:
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


async def get_explain(request: Request, explanations: ExplanationsDep, job_id: Annotated[str, Path()]) -> Response:
    from service.explanations import retry_after

    doc = await explanations.status(job_id, auth.owner_of(request))
    headers = {} if doc.status in ("finished", "failed") else {"Retry-After": retry_after(doc)}
    return _json(doc, headers=headers)


async def get_heatmap(
    request: Request,
    explanations: ExplanationsDep,
    job_id: Annotated[str, Path()],
    classes: Annotated[str, Query(description="target | all | comma-separated labels or indices")] = "target",
) -> Response:
    doc = await explanations.finished(job_id, auth.owner_of(request))
    result = doc.result.model_dump()
    variant, picked = heatmap_classes(classes, result)

    async def draw() -> bytes:
        from shapcore.heatmap import render_heatmap

        art = await explanations.artifact(job_id)
        return await asyncio.to_thread(render_heatmap, art.image, art.labels, result, picked, art.pixel_maps)

    return _png(await explanations.cached_png(job_id, variant, draw))


async def get_segments(request: Request, explanations: ExplanationsDep, job_id: Annotated[str, Path()]) -> Response:
    await explanations.finished(job_id, auth.owner_of(request))

    async def draw() -> bytes:
        from shapcore.jobs.artifact import players_png

        art = await explanations.artifact(job_id)
        return await asyncio.to_thread(players_png, art.labels)

    return _png(await explanations.cached_png(job_id, "segments", draw))


async def get_faithfulness(
    request: Request, explanations: ExplanationsDep, job_id: Annotated[str, Path()]
) -> Response:
    doc = await explanations.finished(job_id, auth.owner_of(request))
    result = doc.result.model_dump()
    if not result.get("faithfulness"):  # an inline answer asked without the curves
        raise ShapserveError(404, "not_found", f"explanation job {job_id!r} has no faithfulness curves")

    async def draw() -> bytes:
        from service.explain_faithfulness_plot import render_faithfulness

        return await asyncio.to_thread(render_faithfulness, result)

    return _png(await explanations.cached_png(job_id, "faithfulness", draw))
