"""Overload, decided at the edge: refuse what the service cannot answer in time, before any
parsing, and at a bounded pace.

``PREDICT_QUEUE_BUDGET_MS``. A closed loop of C clients keeps C requests in the service; beyond
what the model can answer within the budget, every extra one only waits longer (and makes
everyone behind it wait), so latency grows with C while throughput does not. The gate instead
estimates, before the upload is read, how long a new ``POST /predict`` would take to be
answered (:meth:`service.batcher.Batcher.answer_eta_s`: the images ahead / images per second of
recent forward passes, the requests let in counting from the moment they are, plus its own
batch: as big as the queue it joins, a full one under overload) and refuses it with 503
``overloaded`` and a ``Retry-After`` when that is over the budget. An idle service refuses nothing.
Admitted within the budget, an answer's latency stays within the budget plus one batch (the
margin for the estimate's error and the decode).

``MAX_CONCURRENT_REQUESTS``. Any request is refused (503 ``overloaded``) when the requests past
the gate, this one included, would reach the limit: it bounds the uploads being read and
held. Idle keep-alive connections and refusals waiting for their turn do not count; open
connections are bounded by uvicorn (``MAX_CONNECTIONS``).

Why at the edge and paced (issue 27, measured with wrk, which does not honour ``Retry-After``:
at 256 connections the event loop spent about 85 % of its time refusing, the forward pass
idled, and goodput fell to about half its peak):

* :class:`EdgeGate` runs before anything else in the application (FastAPI's own middlewares,
  the metrics, timeout, key and rate-limit middlewares, routing): a refusal is two ``send``
  calls. With API keys on, a /predict refusal needs a valid key (the others go on to be told
  401/403); the rate limit is not consulted (a Redis round trip, for a request that takes nothing).
* A client that retries at once turns every refusal into another request: however cheap a
  refusal is, refusals alone would keep the event loop busy and the admitted requests would
  wait behind them. :class:`RefusalPacer` sends at most ``PREDICT_REFUSALS_PER_S`` refusals a
  second at once (a tenth of a second's worth in a burst); beyond that pace a refusal waits
  for its turn, a timer that costs nothing, and its ``Retry-After`` says at least that long
  (at most ``MAX_HOLD_S``): a client that honours it is told when its turn comes, and one that
  does not is made to wait for it.

Counted in ``shapserve_predict_shed_total`` (the budget's refusals), and every refusal in
``shapserve_http_requests_total{status="503"}`` under its route.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any

from service import metrics

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from service.auth import KeyRing

PREDICT = "/predict"
#: The share of a second of refusals sent at once before pacing starts.
BURST_S = 0.1
#: The longest a refusal waits for its turn (then it goes, taking no turn).
MAX_HOLD_S = 10.0


class RefusalPacer:
    """At most ``rate`` refusals a second, ``rate * BURST_S`` of them at once (rate 0: no pacing).

    Virtual scheduling (GCRA): ``_next`` is when the refusal after those already scheduled may
    go. A refusal that would have to wait longer than ``max_wait_s`` waits ``max_wait_s`` and
    takes no turn.
    """

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0

    def delay(self, now: float, max_wait_s: float = MAX_HOLD_S) -> float:
        """Seconds the refusal arriving at ``now`` waits before it is sent."""
        if self.interval <= 0:
            return 0.0
        slot = max(now, self._next - BURST_S)
        if slot - now > max_wait_s:
            return max_wait_s
        self._next = max(self._next, now) + self.interval
        return slot - now


class EdgeGate:
    """Admits or refuses every HTTP request before the application sees it (see the module doc)."""

    def __init__(
        self,
        app: Any,
        *,
        budget_ms: float,
        refusals_per_s: float,
        max_concurrent: int = 0,
        keyring: KeyRing | None = None,
    ) -> None:
        self.app = app  # the FastAPI app: its state holds the batcher once the lifespan has run
        self.budget_s = budget_ms / 1000.0
        self.max_concurrent = max_concurrent
        self.pacer = RefusalPacer(refusals_per_s)
        self.keyring = keyring if keyring is not None and keyring.enabled else None
        self.in_flight = 0  # requests past the gate and not yet answered, every route
        self.predict_in_flight = 0  # of which POST /predict
        self._shed_count = metrics.HTTP_REQUESTS.labels(PREDICT, "POST", "503")
        self._shed_latency = metrics.HTTP_LATENCY.labels(PREDICT, "POST", "503")

    async def __call__(self, scope: Scope, receive: Receive, send: Send, inner: ASGIApp) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        if 0 < self.max_concurrent <= self.in_flight + 1:  # uvicorn's rule: this one included
            await self._refuse_busy(scope, send)
            return
        if self.budget_s > 0 and scope["method"] == "POST" and scope["path"] == PREDICT:
            state = getattr(self.app.state, "service", None)
            wait = state.batcher.answer_eta_s(self.predict_in_flight) if state is not None else None
            if wait is not None and wait > self.budget_s and self._key_is_valid(scope):
                await self._refuse_predict(send, wait)
                return
            self.predict_in_flight += 1
            self.in_flight += 1
            try:
                await inner(scope, receive, send)
            finally:
                self.predict_in_flight -= 1
                self.in_flight -= 1
            return
        self.in_flight += 1
        try:
            await inner(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _key_is_valid(self, scope: Scope) -> bool:
        """With keys on, only a request with a valid key is refused here (the others are told why)."""
        if self.keyring is None:
            return True
        from service.auth import presented_key

        secret, _ = presented_key(scope["headers"])
        return secret is not None and self.keyring.lookup(secret) is not None

    async def _refuse_predict(self, send: Send, wait: float) -> None:
        start = time.perf_counter()
        metrics.PREDICT_SHED.inc()
        retry_after = max(1, math.ceil(wait))
        message = (
            f"the service is at capacity: a new request would be answered in about {1000 * wait:.0f} ms (the work "
            f"ahead and its own batch), over its {1000 * self.budget_s:.0f} ms budget (PREDICT_QUEUE_BUDGET_MS); "
            "retry in ? s"
        )
        await self._send_503(send, message, retry_after)
        self._shed_count.inc()
        self._shed_latency.observe(time.perf_counter() - start)

    async def _refuse_busy(self, scope: Scope, send: Send) -> None:
        start = time.perf_counter()
        message = (
            f"the service is at capacity: {self.in_flight} requests in flight, the most it takes "
            f"(MAX_CONCURRENT_REQUESTS); retry in ? s"
        )
        await self._send_503(send, message, 1)
        route = metrics.route_template({**scope, "app": self.app})
        method = scope["method"] if scope["method"] in metrics.KNOWN_METHODS else "other"
        metrics.HTTP_REQUESTS.labels(route, method, "503").inc()
        metrics.HTTP_LATENCY.labels(route, method, "503").observe(time.perf_counter() - start)

    async def _send_503(self, send: Send, message: str, retry_after: int) -> None:
        """The JSON error body of service.errors, sent after the pacer's delay (the upload is never read).

        ``Retry-After`` is at least that delay: while refusals are paced, a client is told to come
        back no sooner than the flood's backlog clears (with C clients in a closed loop and a
        capacity of R answers a second, each client's fair turn comes every C/R seconds anyway)."""
        delay = self.pacer.delay(time.monotonic())
        retry_after = max(retry_after, math.ceil(delay))
        message = message.replace("retry in ?", f"retry in {retry_after}")
        body = b'{"error": {"code": "overloaded", "message": "' + message.encode() + b'"}}'
        metrics.HTTP_IN_FLIGHT.inc()
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(retry_after).encode()),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            metrics.HTTP_IN_FLIGHT.dec()
