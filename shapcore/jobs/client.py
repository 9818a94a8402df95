"""The one client of the explanation queue: submit, status, wait, inline answers, artifacts.

The service (``POST /explain`` and its reads), the report (``python -m training report``),
``bench/`` and the tests all go through :class:`ExplainClient`, so the job contract (payload,
dedupe, limits, the status document, the Redis layout of :mod:`shapcore.jobs.keys`) has one
implementation. Its methods block (redis-py): the API runs them in a thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from shapcore.explain.status import JobStatus
from shapcore.jobs import inline, queue, status
from shapcore.jobs.artifact import unpack_artifact
from shapcore.jobs.keys import artifact_key
from shapcore.jobs.queue import JobRequest, valid_job_id
from shapcore.jobs.settings import ExplainSettings


@dataclass(frozen=True)
class Artifact:
    """What a finished explanation keeps for its pictures."""

    image: np.ndarray  # the explained picture, H x W x 3 uint8
    labels: np.ndarray  # the player of every pixel, H x W
    pixel_maps: np.ndarray | None  # (classes, h, w) for the pixel methods


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


class ExplainClient:
    """The queue of ``settings`` on ``connection`` (a redis-py client: :func:`connect`)."""

    def __init__(self, connection: Any, settings: ExplainSettings) -> None:
        self.connection = connection
        self.settings = settings

    @classmethod
    def connect(cls, settings: ExplainSettings, timeout: float | None = None) -> ExplainClient:
        return cls(connect(settings.redis_url, timeout), settings)

    @property
    def queue(self) -> Any:
        return queue.get_queue(self.connection, self.settings)

    def submit(self, request: JobRequest, owner: str | None = None, principal: str | None = None) -> tuple[Any, bool]:
        """(job, created): see :func:`shapcore.jobs.queue.submit`."""
        return queue.submit(self.connection, self.settings, request, owner, principal)

    def job_state(self, job: Any) -> str:
        """The public state of an RQ job this client holds (queued, started, finished, failed)."""
        return status.public_status(job.get_status())

    def status(self, job_id: str, owner: str | None = None) -> JobStatus | None:
        """The status document, or None: unknown, expired, or (``owner`` given) another key's."""
        if not valid_job_id(job_id):
            return None
        return status.job_status(self.connection, self.settings, job_id, owner)

    def store_inline(self, result: dict[str, Any], parameters: dict[str, Any], artifact: bytes,
                     owner: str | None = None) -> str:  # fmt: skip
        """Keep an answer given in the request; returns its id."""
        return inline.store_inline(self.connection, self.settings, result, parameters, artifact, owner)

    def artifact(self, job_id: str) -> Artifact | None:
        """The picture data of a finished explanation, or None when it expired."""
        data = self.connection.get(artifact_key(job_id))
        return None if data is None else Artifact(*unpack_artifact(data))

    def workers(self) -> int:
        """Workers listening on the queue now."""
        from rq import Worker

        return Worker.count(connection=self.connection, queue=self.queue)

    def wait(self, job_ids: Iterable[str], timeout_s: float, poll_s: float = 0.2) -> dict[str, JobStatus]:
        """Poll until every job finished or failed; TimeoutError naming the ones still open."""
        pending, done = list(job_ids), {}
        deadline = time.monotonic() + timeout_s
        while pending:
            for job_id in list(pending):
                doc = self.status(job_id)
                if doc is None:
                    raise LookupError(f"explanation job {job_id} is unknown (expired or flushed)")
                if doc.status in ("finished", "failed"):
                    done[job_id] = doc
                    pending.remove(job_id)
            if pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"explanation jobs not finished after {timeout_s:.0f} s: {pending}")
                time.sleep(poll_s)
        return done

