"""The RQ job: explain the picture the API decoded with the preloaded model, store the heatmap data.

Runs in a work horse forked from ``python -m worker`` (on CUDA: in that process itself),
which already holds the model and its background set (see :mod:`worker.runtime`). No
uploaded bytes reach it: the job holds the pixels the API decoded and checked
(:class:`shapcore.jobs.image.JobImage`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from shapcore.explain.result import ExplainResult
from shapcore.jobs.artifact import pack_artifact
from shapcore.jobs.keys import artifact_key
from shapcore.jobs.queue import JobRequest
from shapcore.jobs.settings import get_explain_settings
from worker.explain import explain_image
from worker.runtime import get_runtime

log = logging.getLogger(__name__)


def explain_job(request: JobRequest) -> dict[str, Any]:
    import torch
    from PIL import Image
    from rq import get_current_job

    settings = get_explain_settings()
    job = get_current_job()
    last_saved = [0.0]
    progress_failures = [0]

    def progress(fraction: float, stage: str) -> None:
        if job is None:
            return
        now = time.monotonic()
        if stage == "evaluating" and now - last_saved[0] < 0.5:
            return
        last_saved[0] = now
        job.meta["progress"] = round(float(fraction), 4)
        job.meta["stage"] = stage
        try:
            job.save_meta()
        except Exception as exc:  # progress is best effort; the result is what matters
            # One line per job, not a traceback every half second while Redis is away.
            progress_failures[0] += 1
            if progress_failures[0] == 1:
                log.warning("could not save progress of job %s (%s: %s); retrying quietly", job.id,
                            type(exc).__name__, exc)  # fmt: skip

    rt = get_runtime().load(request.model_version)
    pixels, model_input = request.image.arrays()
    explain = request.explain
    if explain.target is not None and not 0 <= explain.target < len(rt.class_names):
        raise ValueError(f"target {explain.target} is not a class of version {rt.version}")
    result, seg, attribution = explain_image(
        rt,
        explain,
        Image.fromarray(pixels, "RGB"),
        torch.from_numpy(model_input),
        batch_size=settings.explain_batch_size,
        slic_max_side=settings.explain_slic_max_side,
        progress=progress,
    )
    result = {"model_version": rt.version, "device": str(rt.device), "precision": rt.runtime.precision,
              "runtime": rt.runtime.summary(), **result, "parameters": request.params()}  # fmt: skip
    if job is not None:
        conn = job.connection
        result["job_id"] = job.id
        artifact = pack_artifact(seg.image, seg.labels, attribution.pixel_maps)
        conn.set(artifact_key(job.id), artifact, ex=settings.explain_result_ttl_s)
    # Checked against the published schema here, in the worker, not when a client reads it.
    result = ExplainResult.model_validate(result).model_dump(mode="json")
    # Checked against the published schema here, in the worker, not when a client reads it.
    result = ExplainResult.model_validate(result).model_dump(mode="json")
    log.info(
        "explained (%s) with %d segments, %s samples, background %s: %.2f s, %d evaluations, converged %s",
        result["method"],
        result["segments"]["count"],
        result["samples"],
        result["background"],
        result["duration_s"],
        result["model_evaluations"],
        result["convergence"].get("converged"),
    )
    return result
