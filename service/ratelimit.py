"""Per-key rate limits on POST /predict and POST /explain (``RATE_LIMIT_PREDICT``, ``RATE_LIMIT_EXPLAIN``).

The ``limits`` library's moving-window strategy counts each principal's requests (the API
key's name, or the client address when authentication is off: see
:func:`service.auth.principal`) in Redis, so that every API replica behind the load balancer
shares one budget per key. Redis is never required: when it does not answer within
``RATE_LIMIT_REDIS_TIMEOUT_S`` the request is counted in this process's memory instead (a
per-replica limit), and Redis is left alone for :data:`REDIS_RETRY_S` seconds before it is
tried again, so that /predict neither fails nor slows down while Redis is away. Everything
runs on the event loop through redis-py's asyncio client, bounded by ``asyncio.wait_for``.

Refused requests get 429 ``rate_limited`` with ``Retry-After`` (whole seconds until the
oldest counted request leaves the window) before their upload is read, and are counted in
``shapserve_rate_limited_total{route}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from service import auth, metrics

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from service.settings import Settings

log = logging.getLogger("service.ratelimit")

#: After a Redis failure, count in memory for this long before trying Redis again.
REDIS_RETRY_S = 5.0
KEY_PREFIX = "shapserve:ratelimit"
#: (method, path) -> the route label; the settings' limits by the same label.
LIMITED_ROUTES = {("POST", "/predict"): "/predict", ("POST", "/explain"): "/explain"}


def _redis_storage(url: str, timeout: float) -> Storage | None:
    """The limits library's asyncio Redis storage for a redis:// or rediss:// URL (else None)."""
    if not url.startswith(("redis://", "rediss://")):
        return None
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return RedisStorage(
        f"async+{url}",
        implementation="redispy",
        key_prefix=KEY_PREFIX,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),  # a failure falls back to memory at once; no retries
    )


class RateLimiter:
    """Moving-window limits per (route, principal), in Redis with an in-memory fallback."""

    def __init__(self, limits: dict[str, list[RateLimitItem]], redis_url: str, redis_timeout_s: float) -> None:
        self.limits = {route: items for route, items in limits.items() if items}
        self.redis_timeout_s = redis_timeout_s
        self._redis_storage = _redis_storage(redis_url, redis_timeout_s) if self.limits else None
        self._redis = MovingWindowRateLimiter(self._redis_storage) if self._redis_storage else None
        self._memory_storage = MemoryStorage()
        self._memory = MovingWindowRateLimiter(self._memory_storage)
        self._redis_down_until = 0.0 if self._redis is not None else math.inf

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter:
        limits = {
            "/predict": parse_many(settings.rate_limit_predict) if settings.rate_limit_predict else [],
            "/explain": parse_many(settings.rate_limit_explain) if settings.rate_limit_explain else [],
        }
        return cls(limits, settings.redis_url, settings.rate_limit_redis_timeout_s)

    @property
    def enabled(self) -> bool:
        return bool(self.limits)

    def describe(self) -> str:
        where = "Redis (shared by the replicas)" if self._redis is not None else "memory (this replica)"
        rules = "; ".join(f"{route} {', '.join(str(i) for i in items)}" for route, items in self.limits.items())
        return f"rate limits per key: {rules} counted in {where}"

    async def _check(self, limiter: MovingWindowRateLimiter, items: list[RateLimitItem], who: str) -> int | None:
        refused = [item for item in items if not await limiter.hit(item, who)]
        if not refused:
            return None
        now = time.time()
        waits = [(await limiter.get_window_stats(item, who)).reset_time - now for item in refused]
        return max(1, math.ceil(max(waits)))

    async def hit(self, route: str, who: str) -> int | None:
        """Count one request of ``who`` on ``route``: None if allowed, else seconds to wait."""
        items = self.limits.get(route)
        if not items:
            return None
        if self._redis is not None and time.monotonic() >= self._redis_down_until:
            try:
                return await asyncio.wait_for(self._check(self._redis, items, who), 2 * self.redis_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._redis_down_until = time.monotonic() + REDIS_RETRY_S
                log.warning(
                    "rate limits: Redis did not answer (%s); counting in this replica's memory for %.0f s",
                    type(exc).__name__, REDIS_RETRY_S,
                )  # fmt: skip
        return await self._check(self._memory, items, who)

    async def aclose(self) -> None:
        if self._redis_storage is not None:
            bridge = getattr(self._redis_storage, "bridge", None)
            client = getattr(bridge, "storage", None)
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()


class RateLimitMiddleware:
    """Pure ASGI, inside :class:`service.auth.AuthMiddleware` (so that it knows the key)."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        if scope["type"] == "http" and self.limiter.enabled:
            route = LIMITED_ROUTES.get((scope["method"], scope["path"]))
        if route is None:
            await self.app(scope, receive, send)
            return
        retry_after = await self.limiter.hit(route, auth.principal(scope))
        if retry_after is None:
            await self.app(scope, receive, send)
            return
        from service.errors import error_response

        metrics.RATE_LIMITED.labels(route).inc()
        response = error_response(
            429,
            "rate_limited",
            f"too many requests to {route} for this key: retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
        await response(scope, receive, send)
