"""``PREDICT_QUEUE_BUDGET_MS``: under overload, refuse ``POST /predict`` at once instead of queueing it.

A closed loop of C clients keeps C requests in the service; beyond what the model can answer
within the budget, every extra one only waits longer (and makes everyone behind it wait), so
latency grows with C while throughput does not. The service instead estimates, before it
reads the upload, how long a new request would wait before its own forward pass
(:meth:`service.batcher.Batcher.queue_wait_s`: images ahead / images per second of recent
forward passes) and refuses it with 503 ``overloaded`` and a ``Retry-After`` when that is
over the budget. The requests it has let in count as work ahead from that moment (a burst
arrives faster than its uploads are read and decoded). An idle service refuses nothing;
what it admits is answered within about the budget plus its own forward pass; refusing
costs no decode and no forward pass.
Counted in ``shapserve_predict_shed_total``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from service import metrics

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send


class LoadShedMiddleware:
    """Pure ASGI, inside authentication and the rate limits (a refused key is told so first)."""

    def __init__(self, app: ASGIApp, budget_ms: float) -> None:
        self.app = app
        self.budget_s = budget_ms / 1000.0
        self.in_flight = 0  # /predict requests let in and not yet answered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.budget_s > 0 and scope["type"] == "http" and scope["path"] == "/predict" and scope["method"] == "POST":
            state = getattr(scope["app"].state, "service", None)
            wait = state.batcher.queue_wait_s(self.in_flight) if state is not None else None
            if wait is not None and wait > self.budget_s:
                from service.errors import error_response

                metrics.PREDICT_SHED.inc()
                retry_after = max(1, math.ceil(wait))
                response = error_response(
                    503,
                    "overloaded",
                    f"the service is at capacity: a new request would queue for about {1000 * wait:.0f} ms, over its "
                    f"{1000 * self.budget_s:.0f} ms budget (PREDICT_QUEUE_BUDGET_MS); retry in {retry_after} s",
                    headers={"Retry-After": str(retry_after)},
                )
                await response(scope, receive, send)
                return
            self.in_flight += 1
            try:
                await self.app(scope, receive, send)
            finally:
                self.in_flight -= 1
            return
        await self.app(scope, receive, send)
