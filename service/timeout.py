"""``REQUEST_TIMEOUT_S``: the longest one request may hold the service, its upload included.

A client that trickles its upload (or a request stuck behind anything else) would otherwise
hold a connection, a concurrency slot and its buffered bytes for as long as it likes. After
the timeout the request's task is cancelled and, if no response has started, the client gets
503 ``request_timeout`` with ``Connection: close`` (the rest of its upload is not read). A
response already under way is cut off instead (the connection closes). Counted in
``shapserve_request_timeouts_total``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from service import metrics

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("service.timeout")


class TimeoutMiddleware:
    """Pure ASGI: runs the rest of the app under ``asyncio.timeout``."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.timeout_s <= 0:
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            # asyncio.timeout cancels this very task at the deadline; wait_for would (on 3.11)
            # wrap every request in a task of its own, an extra loop round trip per request.
            async with asyncio.timeout(self.timeout_s):
                await self.app(scope, receive, send_wrapper)
        except TimeoutError:
            metrics.REQUEST_TIMEOUTS.inc()
            client = scope.get("client")
            log.warning("request timeout: %s %s from %s after %.1f s", scope["method"], scope["path"],
                        client[0] if client else "-", self.timeout_s)  # fmt: skip
            if started:
                raise  # too late for an answer: the server closes the connection
            from service.errors import error_response

            response = error_response(
                503,
                "request_timeout",
                f"the request took longer than {self.timeout_s:g} s (REQUEST_TIMEOUT_S), its upload included",
                headers={"Connection": "close", "Retry-After": "1"},
            )
            await response(scope, receive, send)
