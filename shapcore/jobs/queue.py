"""The explanation job contract, shared by the API (submit, status) and the worker (run).

Redis layout (all keys under ``shapserve:explain:``):

- the RQ queue ``explain`` (``rq:queue:explain``) and RQ's job hashes and registries;
- ``dedup:<sha256>`` -> job id, for ``SET NX``: one job per (decoded pixels, model version,
  normalised parameters), kept as long as the job's result can be;
- ``artifact:<job id>`` -> npz (segmented image, superpixel labels, pixel maps) for the heatmap;
- ``png:<job id>:<variant>`` -> a rendered heatmap or faithfulness plot, cached
  (both in :mod:`shapcore.jobs.artifact`).

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
from dataclasses import asdict, dataclass
from typing import Any

from shapcore.errors import QueueFull, TooManyJobs
from shapcore.jobs.image import JobImage
from shapcore.jobs.options import explainer_fingerprint
from shapcore.jobs.settings import ExplainSettings

PREFIX = "shapserve:explain:"
#: How many of the last finished jobs the Retry-After estimate averages.
RECENT_JOBS = 20
#: Seconds per job the Retry-After estimate assumes before any job has finished.
DEFAULT_JOB_SECONDS = 10.0
JOB_FUNC = "worker.jobs.explain_job"
#: RQ statuses as the API reports them.
STATUS_MAP = {
    "created": "queued",
    "queued": "queued",
    "deferred": "queued",
    "scheduled": "queued",
    "started": "started",
    "finished": "finished",
    "failed": "failed",
    "stopped": "failed",
    "canceled": "failed",
}


@dataclass(frozen=True)
class JobRequest:
    """What a job needs, pickled into the RQ job (the picture travels decoded: :class:`JobImage`)."""

    image: JobImage
    model_version: str
    segments: int
    samples: int
    background: str  # a canonical name: shapcore.jobs.options.BackgroundSpec.name
    seed: int
    target: int | None
    method: str = "kernel"
    #: the players: ``slic`` superpixels of the image, or the fixed ``grid`` (shapcore.players)
    players: str = "slic"
    #: SLIC compactness, chosen by the API from its settings so that the key and the work agree
    slic_compactness: float = 10.0

    def params(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("image")
        return d


def dedup_key(request: JobRequest, owner: str | None = None) -> str:
    """One key per (decoded pixels, version, parameters, explainer code) and owner: two API keys
    never share a job.

    The pixels, not the uploaded bytes, are hashed: the same picture sent as PNG and as a
    re-saved PNG (or with other metadata) is one job. Every setting that changes a result is in
    the request (method, background, SLIC compactness; the SLIC size limit is in the pixels),
    and the code that computes it in :func:`~shapcore.jobs.options.explainer_fingerprint`.
    """
    h = hashlib.sha256()
    h.update(request.image.digest())
    h.update(json.dumps(request.params(), sort_keys=True).encode())
    h.update(json.dumps(explainer_fingerprint(), sort_keys=True).encode())
    if owner is not None:
        h.update(b"\0owner\0" + owner.encode())
    return f"{PREFIX}dedup:{h.hexdigest()}"


def valid_job_id(job_id: str) -> bool:
    try:
        return str(uuid.UUID(job_id)) == job_id.lower()
    except ValueError:
        return False


def connect(url: str, timeout: float | None = None):
    """A Redis client; ``timeout`` bounds connect and each command (the API uses short ones).

    With a ``timeout`` a failed command is retried once, not redis-py's ten times (about 4 s
    against a refused port, 15 s against a silent host): the API answers 503 quickly while
    Redis is away, and the one retry still replaces a pooled connection that a Redis restart
    closed. Without one (the worker) redis-py's retries ride out short outages.
    """
    import redis

    kwargs: dict[str, Any] = {"health_check_interval": 30}
    if timeout is not None:
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        kwargs.update(
            socket_connect_timeout=timeout,
            socket_timeout=max(timeout, 2.0),
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        )
    return redis.Redis.from_url(url, **kwargs)


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
    return job if STATUS_MAP.get(job.get_status(refresh=False) or "", "failed") != "failed" else None


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
        on_failure=Callback("shapcore.jobs.queue.on_job_failure"),
        meta={"progress": 0.0, "stage": "queued", "dedup_key": key, "params": request.params(), "owner": owner},
        description=f"explain segments={request.segments} samples={request.samples} "
        f"background={request.background} version={request.model_version}",
    )


_CAD = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


def _compare_and_delete(connection: Any, key: str, value: str) -> None:
    connection.eval(_CAD, 1, key, value)


# -- failures -------------------------------------------------------------------------------


def on_job_failure(job: Any, connection: Any, exc_type: Any, exc_value: Any, tb: Any) -> None:
    """RQ failure callback (a raised error, a timeout, or an abandoned job found by cleanup)."""
    reason = describe_exception(exc_type, exc_value)
    _note_failure(job, reason)


def on_work_horse_killed(job: Any, retpid: Any, ret_val: Any, rusage: Any) -> None:
    """Worker(work_horse_killed_handler=...): the horse died without reporting (SIGKILL, OOM, crash)."""
    import os

    sig = os.WTERMSIG(ret_val) if ret_val and os.WIFSIGNALED(ret_val) else None
    reason = f"the work horse died (signal {sig})" if sig else f"the work horse exited with status {ret_val}"
    _note_failure(job, reason)


def _note_failure(job: Any, reason: str) -> None:
    """Keep the reason and the attempt count in the job's meta (the worker counts the outcome)."""
    try:
        job.meta["last_failure"] = reason
        job.meta["failures"] = int(job.meta.get("failures", 0)) + 1
        job.save_meta()
    except Exception:
        pass


def describe_exception(exc_type: Any, exc_value: Any) -> str:
    name = getattr(exc_type, "__name__", str(exc_type))
    if name == "AbandonedJobError":
        return "the worker running this job died (killed or crashed) before it finished"
    if name == "JobTimeoutException":
        return f"the job ran over its time limit ({exc_value})"
    text = str(exc_value).strip()
    return f"{name}: {text}" if text else name


def failure_reason(job: Any) -> str:
    """One line for a failed job: what RQ recorded, made readable."""
    raw = ""
    try:
        result = job.latest_result()
        if result is not None and result.exc_string:
            raw = result.exc_string.strip().splitlines()[-1]
    except Exception:
        pass
    last = job.meta.get("last_failure") if isinstance(job.meta, dict) else None
    if "AbandonedJobError" in raw:
        raw = "the worker running this job died (killed or crashed) before it finished"
    elif raw.startswith("Work-horse terminated unexpectedly"):
        raw = f"the work horse died: {raw}"
    reason = raw or last or "the job failed (no reason recorded)"
    attempts = int(job.meta.get("failures", 0)) if isinstance(job.meta, dict) else 0
    if attempts > 1:
        reason += f" (after {attempts} attempts)"
    return reason


# -- status -----------------------------------------------------------------------------------


def job_status(
    connection: Any, settings: ExplainSettings, job_id: str, owner: str | None = None
) -> dict[str, Any] | None:
    """The public status document of a job, or None when it is unknown (or expired), or, when
    ``owner`` is given (authentication on), when another key created it: None either way, so
    that a job id tells nothing to whoever did not create it."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    try:
        job = Job.fetch(job_id, connection=connection)
    except NoSuchJobError:  # perhaps an answer given in the request (method=fast), kept for its URLs
        from shapcore.jobs.inline import inline_status

        return inline_status(connection, job_id, owner)
    if job.func_name != JOB_FUNC:
        return None
    if owner is not None and (job.meta if isinstance(job.meta, dict) else {}).get("owner") != owner:
        return None
    raw = job.get_status(refresh=False)
    if raw == "started":
        # A worker that was SIGKILLed cannot report: its job's heartbeat entry expires
        # EXPLAIN_HEARTBEAT_GRACE_S later. Reclaim it now rather than at the next worker's
        # maintenance tick (RQ retries it, or fails it with AbandonedJobError).
        queue = get_queue(connection, settings)
        queue.started_job_registry.cleanup()
        job = Job.fetch(job_id, connection=connection)
        raw = job.get_status(refresh=False)
    status = STATUS_MAP.get(raw or "", "queued")
    meta = job.meta if isinstance(job.meta, dict) else {}
    doc: dict[str, Any] = {
        "job_id": job.id,
        "status": status,
        "queue_position": None,
        "progress": 0.0,
        "stage": meta.get("stage"),
        "result": None,
        "error": None,
        "parameters": meta.get("params"),
        "attempts": int(meta.get("failures", 0)) + (1 if status in ("started", "finished") else 0),
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at) if status != "queued" else None,
        "ended_at": _iso(job.ended_at) if status in ("finished", "failed") else None,
    }
    if status == "queued":
        position = get_queue(connection, settings).get_job_position(job.id)
        doc["queue_position"] = position + 1 if position is not None else None
        doc["stage"] = "queued"
        if meta.get("last_failure"):
            doc["error"] = f"attempt {meta.get('failures', 1)} failed and is being retried: {meta['last_failure']}"
    elif status == "started":
        doc["progress"] = float(meta.get("progress", 0.0))
    elif status == "finished":
        doc["progress"] = 1.0
        doc["stage"] = "finished"
        doc["result"] = job.return_value()
    else:
        doc["stage"] = "failed"
        doc["progress"] = float(meta.get("progress", 0.0))
        doc["error"] = failure_reason(job)
    return doc


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


# -- heatmap artefacts -----------------------------------------------------------------------------
