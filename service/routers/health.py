"""GET /healthz (alive), GET /readyz (model loaded; Redis reported), GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service import metrics
from service.deps import StateDep
from service.schemas import Health, Readiness
from service.settings import redact_url

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    """The process is up and its event loop answers."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness",
    responses={503: {"model": Readiness, "description": "the model is not loaded"}},
)
async def readyz(state: StateDep) -> JSONResponse:
    """200 once the model is loaded and warmed up, else 503. Redis is checked and reported but
    does not affect readiness: /predict never needs it."""
    ok, error = await state.redis_health()
    redis = {"ok": ok, "url": redact_url(state.settings.redis_url), "error": error}
    served = state.engine.current
    if served is None:
        status = "failed" if state.load_error else "loading"
        body = Readiness(status=status, error=state.load_error, redis=redis)
        return JSONResponse(body.model_dump(), status_code=503)
    body = Readiness(status="ready", model={"name": served.name, "version": served.version}, redis=redis)
    return JSONResponse(body.model_dump())


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def prometheus_metrics() -> Response:
    data, content_type = metrics.render()
    return Response(data, media_type=content_type)
