"""Explanations answered in the request (``method=fast``), kept so that their URLs work.

An inline answer never enters the queue, yet it carries the same URLs as a job's
(``/explain/<id>``, ``/heatmap.png``, ``/segments.png``, ``/faithfulness.png``). Its result and
owner are kept under :func:`~shapcore.jobs.keys.inline_key` and its picture data under the
artifact key, both for ``EXPLAIN_FAST_RESULT_TTL_S`` (10 minutes: every fast request stores one,
so a day's TTL would fill Redis at /predict's rates); :func:`shapcore.jobs.status.job_status`
reads them like a finished job. No torch here (the API imports this module).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from shapcore.jobs.keys import artifact_key, inline_key
from shapcore.jobs.settings import ExplainSettings


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
