"""One error format for every route: a JSON body ``{"error": {"code": ..., "message": ...}}``.

``code`` is stable and machine-readable (see :mod:`service.uploads` for the upload codes);
``message`` says what is wrong in words; validation errors add ``details`` (FastAPI's
list of offending fields). Refused inputs are logged and counted in
``shapserve_rejected_inputs_total{reason=<code>}``.

Other codes: ``invalid_parameter`` (422, a query/body parameter such as ``top_k``),
``not_found`` (404), ``method_not_allowed`` (405), ``model_not_ready`` (503),
``unknown_version`` (404/422), ``model_load_failed`` (422), ``internal_error`` (500).
Keys and limits (service/auth.py, service/ratelimit.py, service/timeout.py):
``unauthorized`` (401, no API key), ``forbidden`` (403, an unknown key), ``admin_required``
(403), ``rate_limited`` (429), ``too_many_jobs`` and ``queue_full`` (429, /explain),
``request_timeout`` (503).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics
from service.schemas import ErrorDetail as ErrorDetail  # the error body's models live with the others
from service.schemas import ErrorResponse
from shapcore.errors import InputError, ModelLoadError, ShapserveError

log = logging.getLogger("service.errors")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "content_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    429: "too_many_requests",
    503: "unavailable",
}


def error_response(
    status: int, code: str, message: str, *, details: list[Any] | None = None, headers: dict[str, str] | None = None
) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return Response(
        json.dumps({"error": error}, default=str), status_code=status, media_type="application/json", headers=headers
    )


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


async def _shapserve_error(request: Request, exc: ShapserveError) -> Response:
    """Every room's errors (input refusals, unloadable versions, full queues...) answer the same way."""
    where = (request.method, request.url.path, _client(request), exc.code, exc)
    if isinstance(exc, InputError):
        metrics.reject(exc.code)
        log.warning("rejected %s %s from %s: %s (%s)", *where)
    elif isinstance(exc, ModelLoadError):
        log.warning("model load refused: %s", exc.message)
    elif exc.status < 500:
        log.info("refused %s %s from %s: %s (%s)", *where)
    return error_response(exc.status, exc.code, exc.message, details=exc.details, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    details = [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors()
    ]
    fields = ", ".join(".".join(str(p) for p in d["loc"][1:]) or str(d["loc"][0]) for d in details)
    first = details[0]["msg"] if details else "invalid request"
    metrics.reject("invalid_parameter")
    log.warning(
        "rejected %s %s from %s: invalid_parameter (%s)", request.method, request.url.path, _client(request), fields
    )
    return error_response(422, "invalid_parameter", f"invalid {fields or 'request'}: {first}", details=details)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.url.path}: see /docs"
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _unhandled(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ShapserveError, _shapserve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)


#: For route decorators: document the error body in OpenAPI.
def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _HTTP_CODES.get(status, "error")} for status in statuses}
