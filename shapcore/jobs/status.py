"""The one status document of an explanation (:class:`shapcore.explain.status.JobStatus`), built
for a queued RQ job and for an answer given in the request (``method=fast``) alike.

``None`` means unknown, expired, or (``owner`` given: authentication on) another key's: a job
id tells nothing to whoever did not create it.
"""

from __future__ import annotations

import json
from typing import Any

from shapcore.explain.status import JobLinks, JobStatus
from shapcore.jobs.failures import failure_reason
from shapcore.jobs.keys import inline_key
from shapcore.jobs.queue import JOB_FUNC, get_queue
from shapcore.jobs.settings import ExplainSettings

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


def public_status(raw: str | None) -> str:
    """An RQ status as the API reports it (queued, started, finished, failed)."""
    return STATUS_MAP.get(raw or "", "queued")


def job_status(connection: Any, settings: ExplainSettings, job_id: str, owner: str | None = None) -> JobStatus | None:
    """The status of job ``job_id``, queued or answered in the request; None: unknown or not the owner's."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    try:
        job = Job.fetch(job_id, connection=connection)
    except NoSuchJobError:  # perhaps an answer given in the request (method=fast), kept for its URLs
        return inline_status(connection, job_id, owner)
    if job.func_name != JOB_FUNC:
        return None
    if owner is not None and (job.meta if isinstance(job.meta, dict) else {}).get("owner") != owner:
        return None
    raw = job.get_status(refresh=False)
    if raw == "started":
        # A worker that was SIGKILLed cannot report: its job's heartbeat entry expires
        # EXPLAIN_HEARTBEAT_GRACE_S later. Reclaim it now rather than at the next worker's
        # maintenance tick (RQ retries it, or fails it with AbandonedJobError). The API calls this
        # from a thread, where RQ's default (signal-based) time limit on the failure callback
        # raises and the failure would go unrecorded: a timer thread limits it instead.
        from rq.registry import StartedJobRegistry
        from rq.timeouts import TimerDeathPenalty

        queue = get_queue(connection, settings)
        StartedJobRegistry(queue=queue, job_class=queue.job_class, death_penalty_class=TimerDeathPenalty).cleanup()
        job = Job.fetch(job_id, connection=connection)
        raw = job.get_status(refresh=False)
    return _rq_document(connection, settings, job, public_status(raw))


def _rq_document(connection: Any, settings: ExplainSettings, job: Any, status: str) -> JobStatus:
    meta = job.meta if isinstance(job.meta, dict) else {}
    fields: dict[str, Any] = {"progress": 0.0, "stage": meta.get("stage"), "queue_position": None,
                              "result": None, "error": None}  # fmt: skip
    if status == "queued":
        position = get_queue(connection, settings).get_job_position(job.id)
        fields.update(queue_position=position + 1 if position is not None else None, stage="queued")
        if meta.get("last_failure"):
            fields["error"] = f"attempt {meta.get('failures', 1)} failed and is being retried: {meta['last_failure']}"
    elif status == "started":
        fields["progress"] = float(meta.get("progress", 0.0))
    elif status == "finished":
        fields.update(progress=1.0, stage="finished", result=job.return_value())
    else:
        fields.update(stage="failed", progress=float(meta.get("progress", 0.0)), error=failure_reason(job))
    return document(
        job.id,
        status,
        parameters=meta.get("params"),
        attempts=int(meta.get("failures", 0)) + (1 if status in ("started", "finished") else 0),
        created_at=_iso(job.created_at),
        started_at=_iso(job.started_at) if status != "queued" else None,
        ended_at=_iso(job.ended_at) if status in ("finished", "failed") else None,
        **fields,
    )


def inline_status(connection: Any, job_id: str, owner: str | None = None) -> JobStatus | None:
    """The status of a kept inline answer (always finished), or None: unknown, expired, or another key's."""
    raw = connection.get(inline_key(job_id))
    if raw is None:
        return None
    doc = json.loads(raw)
    if owner is not None and doc.get("owner") != owner:
        return None
    created = doc.get("created_at")
    curves = bool((doc.get("result") or {}).get("faithfulness"))
    return document(job_id, "finished", progress=1.0, stage="finished", result=doc["result"],
                    parameters=doc.get("parameters"), attempts=1, created_at=created, started_at=created,
                    ended_at=created, curves=curves)  # fmt: skip


def document(job_id: str, status: str, *, curves: bool = True, **fields: Any) -> JobStatus:
    """The one builder of the status document: the job's URLs beside what is known of it."""
    return JobStatus(job_id=job_id, status=status, **JobLinks.of(job_id, curves=curves), **fields)


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None
