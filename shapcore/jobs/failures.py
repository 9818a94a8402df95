"""What happens when an explanation job fails: RQ's callbacks keep the reason in the job's meta,
and :func:`failure_reason` makes what RQ recorded readable for the status document.

The worker counts outcomes in its own Prometheus series; nothing here counts.
"""

from __future__ import annotations

import os
from typing import Any


def on_job_failure(job: Any, connection: Any, exc_type: Any, exc_value: Any, tb: Any) -> None:
    """RQ failure callback (a raised error, a timeout, or an abandoned job found by cleanup)."""
    reason = describe_exception(exc_type, exc_value)
    _note_failure(job, reason)


def on_work_horse_killed(job: Any, retpid: Any, ret_val: Any, rusage: Any) -> None:
    """Worker(work_horse_killed_handler=...): the horse died without reporting (SIGKILL, OOM, crash)."""
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
