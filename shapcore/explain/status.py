"""The answers of ``POST /explain`` and ``GET /explain/{id}`` as types (their OpenAPI schemas).

:class:`JobStatus` is the one status document, for a queued job and for an answer given in
the request alike (built by :func:`shapcore.jobs.status.job_status`); :class:`ExplainAccepted`
is what POST answers. Both carry the job's URLs, so a client never builds one.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from shapcore.explain.result import ExplainResult


class JobState(StrEnum):
    queued = "queued"
    started = "started"
    finished = "finished"
    failed = "failed"


class JobLinks(BaseModel):
    """Where the job and its pictures are."""

    status_url: str | None = Field(None, description="GET: this document.")
    heatmap_url: str | None = Field(None, description="GET: the SHAP heatmap PNG, once finished.")
    segments_url: str | None = Field(
        None, description="GET: the players' map, a 16-bit greyscale PNG whose values index shap_values."
    )
    faithfulness_url: str | None = Field(None, description="GET: the deletion and insertion curves PNG.")

    @staticmethod
    def of(job_id: str | None, *, curves: bool = True) -> dict[str, str | None]:
        if job_id is None:
            return {"status_url": None, "heatmap_url": None, "segments_url": None, "faithfulness_url": None}
        url = f"/explain/{job_id}"
        return {"status_url": url, "heatmap_url": f"{url}/heatmap.png", "segments_url": f"{url}/segments.png",
                "faithfulness_url": f"{url}/faithfulness.png" if curves else None}  # fmt: skip


class JobStatus(JobLinks):
    """``GET /explain/{id}``: where a job is, and its result once finished."""

    job_id: str
    status: JobState
    queue_position: int | None = Field(None, description="1 = next; queued jobs only.")
    progress: float = Field(description="0..1")
    stage: str | None = None
    result: ExplainResult | None = Field(None, description="Once finished.")
    error: str | None = Field(None, description="Once failed (or a failed attempt being retried): the reason.")
    parameters: dict[str, Any] | None = None
    attempts: int
    created_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None


class ExplainAccepted(JobLinks):
    """``POST /explain``: the job (202), an identical finished one (200), or an inline answer (200)."""

    job_id: str | None = Field(description="None when an inline answer could not be kept (Redis away).")
    status: JobState
    deduplicated: bool
    model_version: str
    parameters: dict[str, Any]
    result: ExplainResult | None = Field(None, description="Inline methods: the answer itself.")
    stored: bool | None = Field(None, description="Inline methods: whether the answer was kept for its URLs.")
