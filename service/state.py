"""What the routes share, built by the lifespan and kept on ``app.state.service``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from service.batcher import Batcher
from service.engine import Engine, ServedModel
from service.settings import Settings

#: How long a Redis health answer is reused (the readiness probe may be called often).
REDIS_CHECK_TTL_S = 5.0


@dataclass
class ServiceState:
    settings: Settings
    engine: Engine
    batcher: Batcher[ServedModel]
    decode_executor: ThreadPoolExecutor
    load_error: str | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)
    _redis: Any = None
    _redis_checked: tuple[float, bool, str | None] | None = None

    async def redis_health(self) -> tuple[bool, str | None]:
        """Ping Redis (cached for a few seconds, 0.5 s timeout). Never raises."""
        now = time.monotonic()
        if self._redis_checked and now - self._redis_checked[0] < REDIS_CHECK_TTL_S:
            return self._redis_checked[1], self._redis_checked[2]
        ok, error = False, None
        try:
            if self._redis is None:
                import redis.asyncio as aioredis

                self._redis = aioredis.from_url(self.settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
            ok = bool(await asyncio.wait_for(self._redis.ping(), timeout=1.0))
        except Exception as exc:  # any failure is reported, never raised
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self._redis_checked = (now, ok, error)
        return ok, error

    async def close(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
