"""GET /healthz (alive), GET /readyz (model loaded; Redis reported), GET /metrics."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service import metrics
from service.schemas import Health, Readiness
from service.state import ServiceState

router = APIRouter(tags=["operations"])


def redact_url(url: str) -> str:
    """redis://user:secret@host:6379/0 -> redis://user:***@host:6379/0"""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


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
async def readyz(request: Request) -> JSONResponse:
    """200 once the model is loaded and warmed up, else 503. Redis is checked and reported but
    does not affect readiness: /predict never needs it."""
    state: ServiceState = request.app.state.service
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
