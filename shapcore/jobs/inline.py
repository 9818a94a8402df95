"""Explanations answered in the request (``method=fast``), kept so that their URLs work.

A fast explanation never enters the queue, yet its answer carries the same URLs as a job's
(``/explain/<id>``, ``/heatmap.png``, ``/faithfulness.png``). Its result and owner are kept under
``shapserve:explain:inline:<id>`` and its heatmap data under the job's artifact key, both for
``EXPLAIN_FAST_RESULT_TTL_S`` (10 minutes: every fast request stores one, so a day's TTL would
fill Redis at /predict's rates); :func:`shapcore.jobs.queue.job_status` reads them like a finished job.
No torch here (the API imports this module).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from shapcore.jobs.artifact import artifact_key
from shapcore.jobs.queue import PREFIX
from shapcore.jobs.settings import ExplainSettings


def inline_key(job_id: str) -> str:
    return f"{PREFIX}inline:{job_id}"


def store_inline(
    connection: Any,
    settings: ExplainSettings,
    result: dict[str, Any],
    parameters: dict[str, Any],
    artifact: bytes,
    owner: str | None = None,
) -> str:
    """Keep a result answered in the request; returns its new id (a UUID, like a job's)."""
    job_id = str(uuid.uuid4())
    now = datetime.now(UTC).isoformat()
    doc = {"result": result, "parameters": parameters, "owner": owner, "created_at": now}
    ttl = settings.explain_fast_result_ttl_s
    with connection.pipeline(transaction=True) as pipe:
        pipe.set(artifact_key(job_id), artifact, ex=ttl)
        pipe.set(inline_key(job_id), json.dumps(doc), ex=ttl)
        pipe.execute()
    return job_id


def inline_status(connection: Any, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
    """The status document of a kept inline result (always finished), or None: unknown, expired,
    or (``owner`` given) another key's."""
    raw = connection.get(inline_key(job_id))
    if raw is None:
        return None
    doc = json.loads(raw)
    if owner is not None and doc.get("owner") != owner:
        return None
    created = doc.get("created_at")
    return {
        "job_id": job_id,
        "status": "finished",
        "queue_position": None,
        "progress": 1.0,
        "stage": "finished",
        "result": doc["result"],
        "error": None,
        "parameters": doc.get("parameters"),
        "attempts": 1,
        "created_at": created,
        "started_at": created,
        "ended_at": created,
    }
