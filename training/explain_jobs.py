"""Explanations for the report, computed by the RQ workers as ordinary ``POST /explain`` jobs.

The report asks the running workers (``python -m worker``, or ``make run``) through the
job contract the API uses (:mod:`shapcore.jobs`): the same explainer code, the same
deduplication (a second report of the same version and images reuses the finished jobs),
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
from shapcore.heatmap import resample_nearest
from shapcore.jobs.artifact import artifact_key, unpack_artifact
from shapcore.jobs.image import JobImage
from shapcore.jobs.options import check_evaluations, check_samples, parse_background
from shapcore.jobs.queue import JobRequest, connect, get_queue, job_status, submit
from shapcore.jobs.settings import STORED_BACKGROUND, ExplainSettings

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


@dataclass(frozen=True)
class JobParams:
    """What every report job asks for (the API's defaults unless the report's options say otherwise)."""

    segments: int
    samples: int
    background: str
    seed: int
    method: str = "kernel"

    @classmethod
    def from_settings(
        cls,
        settings: ExplainSettings,
        segments: int | None = None,
        samples: int | None = None,
        background: str | None = None,
    ) -> JobParams:
        params = cls(
            segments=segments or settings.explain_default_segments,
            samples=samples or settings.explain_default_samples,
            background=background or settings.explain_default_background,
            seed=settings.explain_default_seed,
        )
        if not settings.explain_min_segments <= params.segments <= settings.explain_max_segments:
            raise UserError(f"--segments must be from {settings.explain_min_segments} to "
                            f"{settings.explain_max_segments} (got {params.segments})")  # fmt: skip
        if not settings.explain_min_samples <= params.samples <= settings.explain_max_samples:
            raise UserError(f"--samples must be from {settings.explain_min_samples} to "
                            f"{settings.explain_max_samples} (got {params.samples})")  # fmt: skip
        try:  # the API's own checks of a request
            spec = parse_background(params.background, STORED_BACKGROUND)
            check_samples(params.method, params.samples, params.segments)
            check_evaluations(params.samples, spec, settings.explain_max_evaluations)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        return cls(params.segments, params.samples, spec.name, params.seed, params.method)


def explain_images(
    images: np.ndarray,
    targets: Sequence[int | None],
    version: str,
    params: JobParams,
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
    conn = connect(settings.redis_url, timeout=max(5.0, settings.explain_redis_timeout_s))
    try:
        conn.ping()
    except redis.RedisError as exc:
        raise UserError(f"the report's explanations need Redis at {settings.redis_url} ({exc}); set REDIS_URL, "
                        "or --explain 0 for a report without them") from None  # fmt: skip
    queue = get_queue(conn, settings)
    _require_workers(conn, queue, settings)
    requests = job_requests(images, targets, version, params, settings)
    job_ids: list[str | None] = [None] * len(requests)
    done: dict[int, Explained] = {}
    # Keep a few jobs per live worker queued, not all of them: the queue's depth limit is the
    # API's too, and other users' jobs still get their turn between the report's.
    window = max(4, 2 * _worker_count(conn, queue))
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
                        job, _ = submit(conn, settings, requests[i])
                    except QueueFull:
                        break  # the queue is busy: submit the rest as it drains
                    job_ids[i] = job.id
                    open_jobs.append(i)
            running = 0.0
            for i in open_jobs:
                doc = job_status(conn, settings, job_ids[i])
                if doc is None:
                    raise UserError(f"explanation job {job_ids[i]} vanished from Redis (expired or flushed)")
                if doc["status"] == "failed":
                    raise UserError(
                        f"the worker could not explain image {i} with version {version}: {doc['error']} "
                        f"(the workers must read this registry: MODEL_REGISTRY)"
                    )
                if doc["status"] == "finished":
                    done[i] = _fetch(conn, job_ids[i], doc["result"])
                    bar.update(1)
                else:
                    running += doc["progress"]
            bar.set_postfix_str(f"running {running:.1f}", refresh=False)
            if len(done) < len(requests):
                if _worker_count(conn, queue) == 0:
                    no_worker_since = no_worker_since or time.monotonic()
                    if time.monotonic() - no_worker_since > NO_WORKER_GRACE_S:
                        _require_workers(conn, queue, settings)
                else:
                    no_worker_since = None
                time.sleep(POLL_S)
    finally:
        bar.close()
    return [done[i] for i in range(len(requests))]


def job_requests(
    images: np.ndarray, targets: Sequence[int | None], version: str, params: JobParams, settings: ExplainSettings
) -> list[JobRequest]:
    """The jobs of ``images`` (CHW uint8, 32 x 32): the picture a 32 x 32 upload gives the API."""
    return [
        JobRequest(
            image=JobImage.from_arrays(np.ascontiguousarray(image.transpose(1, 2, 0)), np.ascontiguousarray(image)),
            model_version=version,
            segments=params.segments,
            samples=params.samples,
            background=params.background,
            seed=params.seed,
            target=None if target is None else int(target),
            method=params.method,
            slic_compactness=settings.explain_slic_compactness,
        )
        for image, target in zip(images, targets, strict=True)
    ]


def _fetch(conn: Any, job_id: str, result: dict[str, Any]) -> Explained:
    data = conn.get(artifact_key(job_id))
    if data is None:
        raise UserError(f"explanation job {job_id} finished without its heatmap data (expired from Redis?)")
    image, labels, pixel_maps = unpack_artifact(data)
    return Explained(result, image, labels, pixel_maps)


def _worker_count(conn: Any, queue: Any) -> int:
    from rq import Worker

    return Worker.count(connection=conn, queue=queue)


def _require_workers(conn: Any, queue: Any, settings: ExplainSettings) -> None:
    if _worker_count(conn, queue) == 0:
        raise UserError(
            f"no worker listens on queue {settings.explain_queue!r} at {settings.redis_url}: start one with "
            "`python -m worker` (`make run` starts one) on this registry, or pass --explain 0 for a report "
            "without explanations"
        )
