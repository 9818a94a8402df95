"""Explanations for the report, computed by the RQ workers as ordinary ``POST /explain`` jobs.

The report asks the running workers (``python -m worker``, or ``make run``) through the
one queue client the API uses (:class:`shapcore.jobs.client.ExplainClient`) with the one
checked request (:class:`shapcore.explain.request.ExplainRequest`): the same explainer code,
the same rules, the same deduplication (a second report of the same version and images reuses the finished jobs),
and as many workers as listen on the queue share the work. It reads each finished job's
result and its heatmap data (segmented pixels, superpixel labels) back from Redis.

The workers must read the registry the report reads (``MODEL_REGISTRY``): they explain
the version by its id.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from shapcore.errors import QueueFull, UserError
from shapcore.explain.request import ExplainRequest, InvalidRequest
from shapcore.heatmap import resample_nearest
from shapcore.jobs.client import ExplainClient
from shapcore.jobs.image import JobImage
from shapcore.jobs.queue import JobRequest
from shapcore.jobs.settings import ExplainSettings

#: Seconds without any live worker on the queue, with jobs still open, before the report gives up.
NO_WORKER_GRACE_S = 60.0
POLL_S = 0.5


@dataclass(frozen=True)
class Explained:
    """One finished explanation: the worker's result and the heatmap's data."""

    result: dict[str, Any]
    image: np.ndarray  # the segmented pixels, H x W x 3 uint8
    labels: np.ndarray  # superpixel id per pixel, H x W
    pixel_maps: np.ndarray | None  # (classes, h, w) for the pixel methods

    def attribution_map(self, cls: int) -> np.ndarray:
        """Class ``cls``'s attribution per pixel of the segmented image (H x W)."""
        if self.pixel_maps is not None:
            return resample_nearest(self.pixel_maps[cls].astype(np.float64), *self.labels.shape)
        values = np.asarray(self.result["classes"][cls]["shap_values"], dtype=np.float64)
        return values[self.labels]


def report_request(
    settings: ExplainSettings, segments: int | None = None, samples: int | None = None, background: str | None = None
) -> ExplainRequest:
    """What every report job asks for (the API's defaults unless the report's options say
    otherwise), checked by the API's own rules; :class:`UserError` naming the option at fault."""
    try:
        return ExplainRequest.build(settings, segments=segments, samples=samples, background=background)
    except InvalidRequest as exc:
        raise UserError(f"--{exc.field}: {exc}") from None


def explain_images(
    images: np.ndarray,
    targets: Sequence[int | None],
    version: str,
    request: ExplainRequest,
    settings: ExplainSettings,
    *,
    progress: bool = True,
) -> list[Explained]:
    """Explain ``images`` (uint8 N x 3 x 32 x 32, the pixels the model reads) with ``version``
    for ``targets`` (None: the top-1 class) on the workers; results in the input's order.

    Raises :class:`UserError` naming the remedy when Redis is unreachable, no worker listens,
    or a job fails (most often: the workers read another registry).
    """
    import redis

    if len(images) == 0:
        return []
    client = ExplainClient.connect(settings, timeout=max(5.0, settings.explain_redis_timeout_s))
    try:
        client.connection.ping()
    except redis.RedisError as exc:
        raise UserError(f"the report's explanations need Redis at {settings.redis_url} ({exc}); set REDIS_URL, "
                        "or --explain 0 for a report without them") from None  # fmt: skip
    _require_workers(client)
    requests = job_requests(images, targets, version, request)
    job_ids: list[str | None] = [None] * len(requests)
    done: dict[int, Explained] = {}
    # Keep a few jobs per live worker queued, not all of them: the queue's depth limit is the
    # API's too, and other users' jobs still get their turn between the report's.
    window = max(4, 2 * client.workers())
    bar = tqdm(total=len(requests), desc="explain", unit="image", disable=not progress)
    no_worker_since: float | None = None
    try:
        while len(done) < len(requests):
            open_jobs = [i for i, j in enumerate(job_ids) if j is not None and i not in done]
            for i in range(len(requests)):
                if len(open_jobs) >= window:
                    break
                if job_ids[i] is None:
                    try:
                        job, _ = client.submit(requests[i])
                    except QueueFull:
                        break  # the queue is busy: submit the rest as it drains
                    job_ids[i] = job.id
                    open_jobs.append(i)
            running = 0.0
            for i in open_jobs:
                doc = client.status(job_ids[i])
                if doc is None:
                    raise UserError(f"explanation job {job_ids[i]} vanished from Redis (expired or flushed)")
                if doc.status == "failed":
                    raise UserError(
                        f"the worker could not explain image {i} with version {version}: {doc.error} "
                        f"(the workers must read this registry: MODEL_REGISTRY)"
                    )
                if doc.status == "finished":
                    done[i] = _fetch(client, job_ids[i], doc.result.model_dump())
                    bar.update(1)
                else:
                    running += doc.progress
            bar.set_postfix_str(f"running {running:.1f}", refresh=False)
            if len(done) < len(requests):
                if client.workers() == 0:
                    no_worker_since = no_worker_since or time.monotonic()
                    if time.monotonic() - no_worker_since > NO_WORKER_GRACE_S:
                        _require_workers(client)
                else:
                    no_worker_since = None
                time.sleep(POLL_S)
    finally:
        bar.close()
    return [done[i] for i in range(len(requests))]


def job_requests(
    images: np.ndarray, targets: Sequence[int | None], version: str, request: ExplainRequest
) -> list[JobRequest]:
    """The jobs of ``images`` (CHW uint8, 32 x 32): the picture a 32 x 32 upload gives the API."""
    return [
        JobRequest(
            image=JobImage.from_arrays(np.ascontiguousarray(image.transpose(1, 2, 0)), np.ascontiguousarray(image)),
            model_version=version,
            explain=request.model_copy(update={"target": None if target is None else int(target)}),
        )
        for image, target in zip(images, targets, strict=True)
    ]


def _fetch(client: ExplainClient, job_id: str, result: dict[str, Any]) -> Explained:
    art = client.artifact(job_id)
    if art is None:
        raise UserError(f"explanation job {job_id} finished without its heatmap data (expired from Redis?)")
    return Explained(result, art.image, art.labels, art.pixel_maps)


def _require_workers(client: ExplainClient) -> None:
    settings = client.settings
    if client.workers() == 0:
        raise UserError(
            f"no worker listens on queue {settings.explain_queue!r} at {settings.redis_url}: start one with "
            "`python -m worker` (`make run` starts one) on this registry, or pass --explain 0 for a report "
            "without explanations"
        )
