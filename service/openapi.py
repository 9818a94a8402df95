"""The OpenAPI document as this deployment answers: its API-key schemes and the refusals
that the middlewares add in front of every route.

FastAPI documents what the routes declare. The API-key check (401/403), the per-key rate
limit (429) and the request timeout (503) answer *before* a route runs, so they are added
here, once the routes are known, from the same settings that switch them on: a client
generated from /openapi.json knows how to authenticate and which refusals to expect, and
an open deployment does not advertise keys it does not check.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.schemas import ErrorResponse

BEARER = "bearerAuth"
API_KEY_HEADER = "apiKeyHeader"
_ERROR_REF = {"$ref": f"#/components/schemas/{ErrorResponse.__name__}"}
_REFUSALS = {
    401: "No API key, or not in a form the service reads (`Authorization: Bearer <key>` or `X-API-Key: <key>`).",
    403: "The API key is not valid (or lacks the scope this route needs).",
    429: "Over this key's rate limit for the route; `Retry-After` says when to try again.",
    503: "Not answered in time (REQUEST_TIMEOUT_S), or the service is not ready; `Retry-After` is set.",
}


def install_openapi(
    app: FastAPI,
    *,
    auth: bool,
    public_paths: Iterable[str],
    rate_limited: Iterable[str],
    timeout: bool,
) -> None:
    """Replace ``app.openapi`` by a generator that adds security schemes and refusals."""
    public = frozenset(public_paths)
    limited = frozenset(rate_limited)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            decorate(schema, auth=auth, public=public, rate_limited=limited, timeout=timeout)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def decorate(
    schema: dict[str, Any], *, auth: bool, public: frozenset[str], rate_limited: frozenset[str], timeout: bool
) -> None:
    """Add the schemes and the middlewares' refusals to ``schema`` in place."""
    if auth:
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes[BEARER] = {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <key>`"}
        schemes[API_KEY_HEADER] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            statuses: list[int] = []
            if auth and path not in public:
                operation["security"] = [{BEARER: []}, {API_KEY_HEADER: []}]
                statuses += [401, 403]
            if path in rate_limited and method == "post":
                statuses.append(429)
            if timeout and path not in public:
                statuses.append(503)
            responses = operation.setdefault("responses", {})
            for status in statuses:
                responses.setdefault(
                    str(status),
                    {"description": _REFUSALS[status], "content": {"application/json": {"schema": _ERROR_REF}}},
                )
