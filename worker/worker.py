"""The RQ worker class for explanations: RQ's forking ``Worker`` with the model preloaded.

Why fork (and not a non-forking ``SimpleWorker`` under a supervisor of our own)
------------------------------------------------------------------------------
- The model and its background set are loaded **once**, in the parent, before any job;
  each job runs in a horse forked from it and shares those pages copy-on-write (the
  weights are never written). Nothing is read from disk per job.
- A job that crashes the interpreter, is killed by the OOM killer (which picks the biggest
  process: the horse) or hangs in native code takes only its horse down. The parent sees
  it at once and RQ retries the job or fails it with the reason
  ("work horse died (signal 9)"); a hard time limit can always be enforced by killing it.
- RQ's parent already *is* the supervision: it heartbeats the job while the horse runs,
  and reclaims abandoned jobs of dead workers. A SimpleWorker runs jobs in the process that
  would have to heartbeat, so it sends none during a job and a SIGKILLed one leaves its job
  "started" until job timeout + 60 s; we would need a heartbeat thread and a restart loop.

The price is per job: a fork (milliseconds) and the horse's first forward pass building
its oneDNN primitives again (measured in BENCHMARKS.md). Torch and fork: the parent keeps
torch at one thread so that GNU OpenMP never starts a pool that the horse would inherit
broken (see :mod:`worker.runtime`).

Killed workers
--------------
- Horse killed (SIGKILL, OOM): the parent's monitor fails the job at once; RQ retries it
  (``EXPLAIN_RETRIES``) or marks it failed with the signal.
- Parent killed: the horse gets SIGKILL too (``PR_SET_PDEATHSIG``), so a job never runs
  twice. The job's heartbeat entry in the started registry stops being renewed and expires
  after ``EXPLAIN_MONITOR_INTERVAL_S + EXPLAIN_HEARTBEAT_GRACE_S`` (RQ hard-codes 60 s of
  grace; we make it configurable); then any worker's maintenance (every
  ``EXPLAIN_MAINTENANCE_INTERVAL_S``) or the next ``GET /explain/{id}`` retries the job or
  fails it with "the worker running this job died".
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time

from rq import Worker

from worker.runtime import configure_horse_threads, get_runtime

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


class ExplainWorker(Worker):
    """``Worker`` with a configurable heartbeat grace and horses that die with their parent."""

    heartbeat_grace = 30
    horse_threads = 1
    #: The worker's own Prometheus figures (:class:`worker.metrics.WorkerMetrics`), or None.
    metrics = None

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        if job.timeout and job.timeout > 0:
            remaining = max(0.0, job.timeout - working_time)
            return int(min(remaining, self.job_monitoring_interval)) + self.heartbeat_grace
        return self.job_monitoring_interval + self.heartbeat_grace

    def execute_job(self, job, queue) -> None:
        """Load the job's model version in the parent first (once), so that the horse inherits it.

        After a promotion the API asks for the new version: the first such job pays one load
        here, every later horse gets it for free (two versions are kept).
        """
        try:
            version = getattr(job.args[0], "model_version", None) if job.args else None
            if version:
                loaded = get_runtime().load(version)
                if self.metrics is not None:
                    self.metrics.model_loaded(loaded.version)
        except Exception as exc:  # the horse will fail the job with the same error, and say why
            log.warning("could not preload version for job %s: %s", job.id, exc)
        if self.metrics is None:
            super().execute_job(job, queue)
            return
        started = time.monotonic()
        self.metrics.busy.set(1)
        try:
            super().execute_job(job, queue)
        finally:
            self.metrics.busy.set(0)
            self._record_job(job, time.monotonic() - started)

    def _record_job(self, job, seconds: float) -> None:
        """Count the attempt from what the horse left in Redis (the parent holds the counters)."""
        try:
            job.refresh()
            status = job.get_status(refresh=False)
            status = getattr(status, "value", status)
            result = job.return_value(refresh=False) if status == "finished" else None
            self.metrics.job_ended(str(status), seconds, result)
        except Exception:  # metrics never fail a worker
            log.warning("could not record metrics of job %s", job.id, exc_info=True)

    def setup_work_horse_signals(self) -> None:
        super().setup_work_horse_signals()
        parent = os.getppid()
        _die_with_parent()
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        configure_horse_threads(self.horse_threads)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):  # not Linux
        log.debug("PR_SET_PDEATHSIG unavailable")
