"""The Redis layout of explanations, in one place (every key under ``shapserve:explain:``).

- the RQ queue ``explain`` (``rq:queue:explain``) and RQ's own job hashes and registries;
- ``dedup:<sha256>`` -> job id, for ``SET NX``: one job per (decoded pixels, model version,
  normalised parameters, owner), kept as long as the job's result can be;
- ``inline:<id>`` -> an answer given in the request (``method=fast``), kept for its URLs;
- ``artifact:<id>`` -> npz (explained picture, players' map, pixel maps) for the pictures;
- ``png:<id>:<variant>`` -> a rendered heatmap, players' map or faithfulness plot, cached;
- ``inflight:<queue>:<principal>`` -> the sorted set of one key's jobs in flight (the per-key cap).
"""

from __future__ import annotations

PREFIX = "shapserve:explain:"
INFLIGHT_PREFIX = f"{PREFIX}inflight:"


def dedup_key(digest: str) -> str:
    return f"{PREFIX}dedup:{digest}"


def inline_key(job_id: str) -> str:
    return f"{PREFIX}inline:{job_id}"


def artifact_key(job_id: str) -> str:
    return f"{PREFIX}artifact:{job_id}"


def png_key(job_id: str, variant: str) -> str:
    return f"{PREFIX}png:{job_id}:{variant}"


def inflight_key(queue_name: str, principal: str) -> str:
    return f"{INFLIGHT_PREFIX}{queue_name}:{principal}"
