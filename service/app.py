"""The FastAPI application: ``create_app(settings)`` and its lifespan.

Start-up builds the engine, the decode threads and the batcher, then loads and warms the
model in the background: /healthz answers at once, /readyz turns 200 when the model is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI
from prometheus_client import REGISTRY

from service import __version__
from service.auth import PUBLIC_PATHS, AuthMiddleware, KeyRing
from service.batcher import Batcher
from service.engine import Engine
from service.errors import install_error_handlers
from service.explain_metrics import ExplainCollector
from service.metrics import HTTPMetricsMiddleware
from service.openapi import install_openapi
from service.overload import LoadShedMiddleware
from service.ratelimit import RateLimiter, RateLimitMiddleware
from service.routers import explain, health, model, predict, web
from service.settings import Settings, get_settings
from service.state import ServiceState
from service.timeout import TimeoutMiddleware
from shapcore.jobs.client import connect
from shapcore.jobs.settings import ExplainSettings

log = logging.getLogger("service")

DESCRIPTION = """\
Image classification (ResNet-50 trained on CIFAR-10) over HTTP.

* `POST /predict`: multipart field `file` with an image (PNG, JPEG, WebP, GIF, BMP, TIFF); repeat it for several.
* `GET /model`, `GET /model/confusion-matrix.png`, `GET /model/training-curves.png`, `POST /model/reload`:
  the served version.
* `GET /`: a page for people: upload, predict, explain, the heatmaps and the model card.
* `GET /healthz`, `GET /readyz`, `GET /metrics`: operations.

When the service has API keys, every route but `/healthz`, `/readyz`, `/metrics` and these docs needs one:
`Authorization: Bearer <key>` or `X-API-Key: <key>` (401 without, 403 with a wrong one).

Every error answers `{"error": {"code": "...", "message": "..."}}`.
"""


async def _load_model(state: ServiceState) -> None:
    try:
        served = await state.engine.start()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        state.load_error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        log.error("the model could not be loaded: %s (POST /model/reload once fixed)", state.load_error)
        return
    # Everything allocated so far (torch, the model, FastAPI) lives as long as the process: move
    # it out of the collector's sight so that full collections stay short (p99 latency).
    gc.collect()
    gc.freeze()
    log.info("ready: serving %s %s", served.name, served.version)
    interval = state.settings.model_watch_interval_s
    if interval > 0 and not state.settings.model_version:
        state.tasks.append(asyncio.create_task(state.engine.watch_promoted(interval), name="watch-promoted"))


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    engine = Engine(settings)
    batcher = Batcher(
        engine.run_batch,
        engine.inference_executor,
        max_size=settings.batch_max_size,
        max_wait_s=settings.batch_max_wait_ms / 1000.0,
        enabled=settings.batching,
        workers=settings.inference_workers,
    )
    decode_executor = ThreadPoolExecutor(settings.resolved_decode_threads(), thread_name_prefix="decode")
    state = ServiceState(settings=settings, engine=engine, batcher=batcher, decode_executor=decode_executor)
    app.state.service = state
    # The explanation queue's figures join /metrics while this app runs (read from Redis at scrape time).
    collector = ExplainCollector(lambda: (app.state.explain_redis, app.state.explain_settings.explain_queue))
    REGISTRY.register(collector)
    batcher.start()
    state.tasks.append(asyncio.create_task(_load_model(state), name="load-model"))
    try:
        yield
    finally:
        for task in state.tasks:
            task.cancel()
        for task in state.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await batcher.stop()
        await state.close()
        REGISTRY.unregister(collector)
        app.state.explain_redis.close()
        await app.state.rate_limiter.aclose()
        decode_executor.shutdown(wait=False, cancel_futures=True)
        engine.shutdown()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="shapserve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.explain_settings = settings.family(ExplainSettings)  # EXPLAIN_*, the shared values of settings
    app.state.explain_redis = connect(
        app.state.explain_settings.redis_url, app.state.explain_settings.explain_redis_timeout_s
    )
    install_error_handlers(app)
    # Outermost first: metrics -> timeout -> API key -> rate limit -> load shedding -> routes. (add_middleware
    # wraps what is there, so they are added innermost first.)
    keyring = KeyRing.from_settings(settings)  # KeyConfigError: unusable keys, or none but required
    keyring.announce()
    limiter = RateLimiter.from_settings(settings)
    if limiter.enabled:
        log.info("%s", limiter.describe())
    app.state.keyring = keyring
    app.state.rate_limiter = limiter
    app.add_middleware(LoadShedMiddleware, budget_ms=settings.predict_queue_budget_ms)
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    app.add_middleware(AuthMiddleware, keyring=keyring)
    app.add_middleware(TimeoutMiddleware, timeout_s=settings.request_timeout_s)
    app.add_middleware(HTTPMetricsMiddleware)
    app.include_router(predict.build_router(settings))
    app.include_router(explain.build_router(app.state.explain_settings))
    app.include_router(model.router)
    app.include_router(health.router)
    web.install(app)
    install_openapi(
        app,
        auth=keyring.enabled,
        public_paths=PUBLIC_PATHS,
        rate_limited=limiter.limits,
        timeout=settings.request_timeout_s > 0,
    )
    return app
