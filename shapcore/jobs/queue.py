"""Submitting explanation jobs to the RQ queue: the payload, the dedupe key, the limits.

Shared by the API (submit), the worker (run) and :mod:`shapcore.jobs.client` (the one client
the service, the report and ``bench/`` use). The Redis layout is :mod:`shapcore.jobs.keys`.
Nothing here counts jobs: job counts and durations are the workers' own Prometheus series
(:mod:`worker.metrics`). The Retry-After of a full queue reads the durations of recently
finished jobs from RQ's own finished-job registry and job timestamps
(:func:`recent_job_seconds`).

Job ids are random UUIDs (``uuid4``). No torch here: the API imports this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from shapcore.errors import QueueFull, TooManyJobs
from shapcore.explain.methods import EXPLAINER_REVISION
from shapcore.explain.request import ExplainRequest
from shapcore.jobs import keys
from shapcore.jobs.image import JobImage
from shapcore.jobs.settings import ExplainSettings

#: How many of the last finished jobs the Retry-After estimate averages.
RECENT_JOBS = 20
#: Seconds per job the Retry-After estimate assumes before any job has finished.
DEFAULT_JOB_SECONDS = 10.0
JOB_FUNC = "worker.jobs.explain_job"
#: RQ statuses of a job that will not give a result.
_FAILED = frozenset({"failed", "stopped", "canceled"})


@dataclass(frozen=True)
class JobRequest:
    """What a job needs, pickled into the RQ job: the picture (decoded: :class:`JobImage`), the
    version it is explained with, and the checked :class:`ExplainRequest`."""

    image: JobImage
    model_version: str
    explain: ExplainRequest

    @classmethod
    def of(cls, image: JobImage, model_version: str, **fields: Any) -> JobRequest:
        """A job of ``fields`` taken as given (unchecked: tests and ``bench/``; the API checks with
        :meth:`ExplainRequest.build`)."""
        return cls(image, model_version, ExplainRequest(**fields))

    def params(self) -> dict[str, Any]:
        return {"model_version": self.model_version, **self.explain.params()}


def explainer_fingerprint() -> dict[str, str | int]:
    """What, beside the request, decides a result: this package's and shap's versions and the
    explainer revision. Part of the dedupe key, so an upgrade never serves an older result."""
    return {"shapserve": _version("shapserve"), "shap": _version("shap"), "revision": EXPLAINER_REVISION}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def dedup_key(request: JobRequest, owner: str | None = None) -> str:
    """One key per (decoded pixels, version, parameters, explainer code) and owner: two API keys
    never share a job.

    The pixels, not the uploaded bytes, are hashed: the same picture sent as PNG and as a
    re-saved PNG (or with other metadata) is one job. Every setting that changes a result is in
    the request (method, background, SLIC compactness; the SLIC size limit is in the pixels),
    and the code that computes it in :func:`explainer_fingerprint`.
    """
    h = hashlib.sha256()
    h.update(request.image.digest())
    h.update(json.dumps(request.params(), sort_keys=True).encode())
    h.update(json.dumps(explainer_fingerprint(), sort_keys=True).encode())
    if owner is not None:
        h.update(b"\0owner\0" + owner.encode())
    return keys.dedup_key(h.hexdigest())


def valid_job_id(job_id: str) -> bool:
    try:
        return str(uuid.UUID(job_id)) == job_id.lower()
    except ValueError:
        return False


def get_queue(connection: Any, settings: ExplainSettings):
    from rq import Queue

    return Queue(settings.explain_queue, connection=connection, default_timeout=settings.explain_job_timeout_s)


def dedup_ttl(settings: ExplainSettings) -> int:
    attempts = settings.explain_retries + 1
    return settings.explain_result_ttl_s + attempts * (settings.explain_job_timeout_s + 60) + 3600


def recent_job_seconds(queue: Any, limit: int = RECENT_JOBS) -> list[float]:
    """Compute time (``ended_at - started_at`` of the last attempt) of the ``limit`` jobs that
    finished last on ``queue``, newest first, read from RQ's finished-job registry.

    Every job of the queue is enqueued with the same ``result_ttl``, so the registry's score
    (end time + ttl) orders the jobs by end time. Jobs whose hash expired are skipped.
    """
    from rq.job import Job

    ids = queue.finished_job_registry.get_job_ids(0, limit - 1, desc=True, cleanup=False)
    seconds = []
    for job in Job.fetch_many(ids, connection=queue.connection):
        if job is not None and job.started_at is not None and job.ended_at is not None:
            seconds.append(max(0.0, (job.ended_at - job.started_at).total_seconds()))
    return seconds


def retry_after_estimate(connection: Any, queue: Any, depth: int) -> int:
    """Seconds until the queue has likely drained by ``depth`` places: depth × the mean compute
    time of the recently finished jobs (:func:`recent_job_seconds`) / the live workers."""
    from rq import Worker

    try:
        recent = recent_job_seconds(queue)
        mean = sum(recent) / len(recent) if recent else DEFAULT_JOB_SECONDS
        workers = max(1, Worker.count(connection=connection, queue=queue))
    except Exception:
        mean, workers = DEFAULT_JOB_SECONDS, 1
    return int(min(3600, max(1, math.ceil(depth * mean / workers))))


def submit(
    connection: Any,
    settings: ExplainSettings,
    request: JobRequest,
    owner: str | None = None,
    principal: str | None = None,
) -> tuple[Any, bool]:
    """Enqueue ``request`` unless an identical one exists: returns (job, created).

    An identical request (same decoded pixels, version, parameters and ``owner``, the API key's
    name) whose job is queued, running or finished (and not expired) gets that job back. A
    failed one is replaced. Raises :class:`QueueFull` when a *new* job would go over
    ``EXPLAIN_MAX_QUEUE_DEPTH``, :class:`shapcore.jobs.quota.TooManyJobs` when ``principal`` (whom the
    per-key cap counts) has ``EXPLAIN_MAX_JOBS_PER_KEY`` jobs in flight.
    """
    from shapcore.jobs import quota

    queue = get_queue(connection, settings)
    key = dedup_key(request, owner)
    for _ in range(5):
        existing = connection.get(key)
        if existing is not None:
            job = _live_job(connection, existing.decode())
            if job is not None:
                return job, False
            # Expired or failed: forget it (only if nobody replaced it meanwhile), then submit anew.
            _compare_and_delete(connection, key, existing.decode())
            continue
        depth = queue.count
        if depth >= settings.explain_max_queue_depth:
            raise QueueFull(depth, settings.explain_max_queue_depth, retry_after_estimate(connection, queue, depth))
        job_id = str(uuid.uuid4())
        capped = principal is not None and settings.explain_max_jobs_per_key > 0
        if capped:
            held = quota.reserve(connection, queue.name, principal, job_id, settings.explain_max_jobs_per_key,
                                 dedup_ttl(settings))  # fmt: skip
            if held < 0:
                raise TooManyJobs(-held, settings.explain_max_jobs_per_key,
                                        retry_after_estimate(connection, queue, 1))  # fmt: skip
        if not connection.set(key, job_id, nx=True, ex=dedup_ttl(settings)):
            if capped:
                quota.release(connection, queue.name, principal, job_id)
            continue  # an identical request won the race: return its job on the next turn
        try:
            return _enqueue(queue, settings, request, job_id, key, owner), True
        except BaseException:
            _compare_and_delete(connection, key, job_id)
            if capped:
                quota.release(connection, queue.name, principal, job_id)
            raise
    raise RuntimeError("could not register the explanation job (dedup key kept changing)")


def _live_job(connection: Any, job_id: str) -> Any | None:
    """The job ``job_id`` if it is queued, running or finished; None if it failed or expired."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    try:
        job = Job.fetch(job_id, connection=connection)
    except NoSuchJobError:
        return None
    return None if (job.get_status(refresh=False) or "failed") in _FAILED else job


def _enqueue(queue: Any, settings: ExplainSettings, request: JobRequest, job_id: str, key: str, owner: str | None):
    """The RQ job of ``request``, with the settings' timeout, TTLs and retries."""
    from rq import Callback, Retry

    retries = settings.explain_retries
    retry = Retry(max=retries, interval=settings.explain_retry_interval_s) if retries else None
    return queue.enqueue(
        JOB_FUNC,
        request,
        job_id=job_id,
        job_timeout=settings.explain_job_timeout_s,
        result_ttl=settings.explain_result_ttl_s,
        failure_ttl=settings.explain_failure_ttl_s,
        retry=retry,
        on_failure=Callback("shapcore.jobs.failures.on_job_failure"),
        meta={"progress": 0.0, "stage": "queued", "dedup_key": key, "params": request.params(), "owner": owner},
        description=f"explain method={request.explain.method} segments={request.explain.segments} "
        f"samples={request.explain.samples} background={request.explain.background} version={request.model_version}",
    )


_CAD = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


def _compare_and_delete(connection: Any, key: str, value: str) -> None:
    connection.eval(_CAD, 1, key, value)
