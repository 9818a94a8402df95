"""The explanation service behind the thin ``/explain`` routes: inline or queued, status, pictures.

:class:`Explanations` takes a checked :class:`~shapcore.explain.request.ExplainRequest` and
the decoded upload, and either answers in the request (an ``inline`` method of the registry:
``method=fast``, :mod:`service.fast_explain`) or queues a job for the workers through the one
queue client (:class:`~shapcore.jobs.client.ExplainClient`). Redis is needed only here: when
it is unreachable these calls answer 503 and /predict is unaffected (every Redis call has a
short timeout and runs in a thread, off the event loop).
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Awaitable, Callable
from typing import Any

from service import metrics
from service.settings import redact_url
from service.state import ServiceState
from service.uploads import Upload
from shapcore.errors import QueueFull, ShapserveError, TooManyJobs
from shapcore.explain.request import ExplainRequest
from shapcore.explain.status import ExplainAccepted, JobLinks, JobStatus
from shapcore.images import explanation_input
from shapcore.jobs.client import ExplainClient
from shapcore.jobs.image import JobImage
from shapcore.jobs.keys import artifact_key, png_key
from shapcore.jobs.queue import JobRequest

REQUESTS = metrics.EXPLAIN_REQUESTS


class Explanations:
    """One request's view of the explanation service (cheap: built per request by ``deps``)."""

    def __init__(self, state: ServiceState, client: ExplainClient) -> None:
        self.state = state
        self.client = client
        self.settings = client.settings

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking Redis operation in a thread; Redis trouble becomes a 503."""
        import redis

        try:
            return await asyncio.to_thread(fn, *args)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise ShapserveError(
                503,
                "queue_unavailable",
                f"explanations are unavailable: the job queue (Redis at {redact_url(self.settings.redis_url)}) cannot "
                f"be reached ({type(exc).__name__}); /predict is not affected",
                headers={"Retry-After": "5"},
            ) from None

    async def decode(self, upload: Upload) -> tuple[Any, Any]:
        """The /predict checks, then (the upload's pixels, the model's 32-px input)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.state.decode_executor, explanation_input, upload.data, self.settings.max_image_pixels,
            self.settings.explain_slic_max_side,
        )  # fmt: skip

    async def queue(
        self, request: ExplainRequest, upload: Upload, version: str, owner: str | None, principal: str | None
    ) -> ExplainAccepted:
        """Queue a job (or find the identical one): the answer of POST /explain."""
        pixels, model_input = await self.decode(upload)
        job_request = JobRequest(image=JobImage.from_arrays(pixels, model_input), model_version=version,
                                 explain=request)  # fmt: skip
        outcomes = ((QueueFull, "queue_full"), (TooManyJobs, "too_many_jobs"), (ShapserveError, "redis_unavailable"))
        try:
            job, created = await self.call(self.client.submit, job_request, owner, principal)
        except ShapserveError as exc:
            REQUESTS.labels(next(label for kind, label in outcomes if isinstance(exc, kind))).inc()
            raise
        REQUESTS.labels("accepted" if created else "deduplicated").inc()
        status = "queued" if created else await self.call(self.client.job_state, job)
        return ExplainAccepted(job_id=job.id, status=status, deduplicated=not created, model_version=version,
                               parameters=job_request.params(), **JobLinks.of(job.id))  # fmt: skip

    async def inline(self, request: ExplainRequest, upload: Upload, owner: str | None) -> ExplainAccepted:
        """Answer an inline method in the request, and keep the answer for its URLs."""
        from service.fast_explain import answer_fast

        served, result, artifact = await answer_fast(self.state, request, upload, self.decode)
        params = {"model_version": served.version, **request.params()}
        body = ExplainAccepted(job_id=None, status="finished", deduplicated=False, model_version=served.version,
                               parameters=params, result=result, stored=False)  # fmt: skip
        try:  # kept for its URLs; without Redis the answer still stands, without them
            job_id = await self.call(self.client.store_inline, result, params, artifact, owner)
        except ShapserveError:
            pass
        else:
            body = body.model_copy(update={"job_id": job_id, "stored": True,
                                           **JobLinks.of(job_id, curves=request.faithfulness)})  # fmt: skip
        REQUESTS.labels(request.method).inc()
        return body

    async def status(self, job_id: str, owner: str | None) -> JobStatus:
        """The status document; 404 when unknown, expired or another key's."""
        doc = await self.call(self.client.status, job_id, owner)
        if doc is None:
            raise unknown(job_id)
        return doc

    async def finished(self, job_id: str, owner: str | None) -> JobStatus:
        """The status of a finished job; 409 while it is not (with Retry-After) or when it failed."""
        doc = await self.status(job_id, owner)
        if doc.status != "finished":
            raise not_finished(doc)
        return doc

    async def cached_png(self, job_id: str, variant: str, draw: Callable[[], Awaitable[bytes]]) -> bytes:
        """The job's PNG ``variant`` from Redis, or drawn and kept there as long as the job's artifact."""
        redis = self.client.connection
        cache = png_key(job_id, variant)
        png = await self.call(redis.get, cache)
        if png is None:
            png = await draw()
            ttl = await self.call(redis.ttl, artifact_key(job_id))
            expire = max(60, int(ttl)) if ttl and ttl > 0 else 3600
            await self.call(functools.partial(redis.set, cache, png, ex=expire))
        return png

    async def artifact(self, job_id: str) -> Any:
        found = await self.call(self.client.artifact, job_id)
        if found is None:
            raise unknown(job_id)
        return found


def unknown(job_id: str) -> ShapserveError:
    return ShapserveError(404, "not_found", f"no explanation job {job_id!r} (unknown, or its result expired)")


def retry_after(doc: JobStatus) -> str:
    if doc.status == "queued" and doc.queue_position:
        return str(min(60, max(1, doc.queue_position)))
    return "1"


def not_finished(doc: JobStatus) -> ShapserveError:
    if doc.status == "failed":
        return ShapserveError(409, "explanation_failed", f"the explanation failed: {doc.error}")
    where = (
        f"queued (position {doc.queue_position})"
        if doc.status == "queued"
        else f"running ({math.floor(100 * doc.progress)}%)"
    )
    return ShapserveError(
        409, "not_ready", f"the explanation is not finished yet: {where}", headers={"Retry-After": retry_after(doc)}
    )
