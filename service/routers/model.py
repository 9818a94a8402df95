"""GET /model, its figures (/confusion-matrix.png, /training-curves.png), its report, POST /model/reload."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import FileResponse

from service.auth import require_admin
from service.errors import error_responses
from service.schemas import ModelInfo, ReloadRequest, ReloadResponse
from service.state import ServiceState
from shapcore.errors import ShapserveError
from shapcore.registry import CONFUSION_PNG, CURVES_PNG, REPORT_HTML

router = APIRouter(prefix="/model", tags=["model"])


def _state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    if state.engine.current is None:
        raise ShapserveError(503, "model_not_ready", state.load_error or "the model is still loading")
    return state


@router.get("", response_model=ModelInfo, summary="The served version", responses=error_responses(503))
async def model_info(request: Request) -> ModelInfo:
    """The served version's metadata and evaluation (accuracy, macro and per-class P/R/F1, confusion matrix)."""
    state = _state(request)
    served = state.engine.current
    meta = served.metadata
    return ModelInfo(
        name=served.name,
        version=served.version,
        architecture=meta.get("architecture"),
        profile=meta.get("profile"),
        input_size=meta.get("input_size"),
        class_names=served.class_names,
        promoted=state.engine.registry.promoted() == served.version,
        device=served.device,
        runtime=served.runtime,
        runtime_choice=served.runtime_choice.as_dict(),
        loaded_at=datetime.fromtimestamp(served.loaded_at, UTC).isoformat(timespec="seconds"),
        load_seconds=round(served.load_seconds, 3),
        metadata=meta,
        evaluation=served.evaluation,
        report_url="/model/report" if (served.path / REPORT_HTML).is_file() else None,
        explainer=await asyncio.to_thread(served.explainer.describe) if served.explainer else None,
    )


#: The report is self-contained: no script, its pictures data: URIs, its style inline. Nothing else may load.
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _file(request: Request, filename: str, which: str, command: str = "evaluate") -> FileResponse:
    """One of the served version's files written by ``python -m training <command>``; 404 naming it."""
    served = _state(request).engine.current
    path = served.path / filename
    if not path.is_file():
        raise ShapserveError(
            404,
            "not_found",
            f"version {served.version} has no {which} yet: "
            f"run `python -m training {command} --version {served.version} --data ...`",
        )
    if filename == REPORT_HTML:
        headers = {"Cache-Control": "no-cache", "Content-Security-Policy": REPORT_CSP}
        return FileResponse(path, media_type="text/html; charset=utf-8", headers=headers)
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})


@router.get(
    "/confusion-matrix.png",
    response_class=FileResponse,
    summary="Confusion matrix of the served version",
    responses={200: {"content": {"image/png": {}}}, **error_responses(404, 503)},
)
async def confusion_matrix(request: Request) -> FileResponse:
    return _file(request, CONFUSION_PNG, "confusion matrix")


@router.get(
    "/training-curves.png",
    response_class=FileResponse,
    summary="Training and validation curves of the served version",
    responses={200: {"content": {"image/png": {}}}, **error_responses(404, 503)},
)
async def training_curves(request: Request) -> FileResponse:
    return _file(request, CURVES_PNG, "training curves")


@router.get(
    "/report",
    response_class=FileResponse,
    summary="The study's report of the served version",
    responses={200: {"content": {"text/html": {}}}, **error_responses(404, 503)},
)
async def report(request: Request) -> FileResponse:
    """The self-contained HTML report (Tables 4 and 5, confusion matrix, curves, examples, confused
    pairs and confident mistakes with SHAP heatmaps) that `python -m training report` wrote into
    the served version's folder; 404 until it has been written."""
    return _file(request, REPORT_HTML, "report", command="report")


@router.post(
    "/reload",
    response_model=ReloadResponse,
    summary="Switch to another version",
    responses=error_responses(400, 401, 403, 404, 422, 503),  # 400: a body that is not JSON
    dependencies=[Depends(require_admin)],
)
async def reload_model(
    request: Request,
    body: Annotated[ReloadRequest | None, Body()] = None,
) -> ReloadResponse:
    """Load a version beside the served one, warm it up, then switch atomically. Requests in flight
    finish on the old version; none fails. Without a body: MODEL_VERSION if pinned, else the
    promoted version, else the newest. With API keys configured, needs a key with the admin scope."""
    state: ServiceState = request.app.state.service
    body = body or ReloadRequest()
    result = await state.engine.reload(body.version, force=body.force)
    state.load_error = None
    return ReloadResponse(
        previous=result.previous, current=result.current, changed=result.changed, load_seconds=result.load_seconds
    )
