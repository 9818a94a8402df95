"""The RQ worker classes for explanations: RQ's forking ``Worker`` on the CPU, an in-process one on CUDA.

:class:`ExplainWorker` (the CPU's, ``EXPLAIN_FORK`` unset or true) forks a work horse per job;
:class:`InProcessExplainWorker` (CUDA's, or ``EXPLAIN_FORK=false``) runs each job in its own
process. Both share :class:`ExplainWorkerMixin`: the version preload, the metrics, the
heartbeat grace and the riding out of Redis outages.

Why fork on the CPU (and not a non-forking ``SimpleWorker`` under a supervisor of our own)
-----------------------------------------------------------------------------------------
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
  "started" until job timeout + 60 s; we would need a heartbeat thread and a restart loop
  (on CUDA, where forking is not an option, that is what :class:`InProcessExplainWorker` adds).

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
  fails it with "the worker running this job died". With the defaults the job is back in the
  queue at most 5 + 20 + 15 = 40 s after the kill (monitor + grace + the maintenance period of
  an idle worker: :meth:`shapcore.jobs.settings.ExplainSettings.abandoned_job_bound_s`), not RQ's ten
  minutes.

Redis outages (a restart, a failover, a network blip)
-----------------------------------------------------
RQ's own loop retries only its blocking dequeue; a connection error anywhere else (the
heartbeats it sends while a horse runs, the suspension check, maintenance, the bookkeeping
after a job) ends ``work()`` and the process. :class:`ExplainWorker` instead rides the outage
out: it logs, keeps its horse running, waits for Redis with a short back-off
(``max_connection_wait_time``, 5 s) and goes on. A job whose horse could not report its end
while Redis was away stays "started" and is reclaimed like a killed worker's.

On CUDA: one process, no fork (:class:`InProcessExplainWorker`)
----------------------------------------------------------------
A CUDA context does not survive ``fork()``: a horse forked from a parent that initialised CUDA
cannot use it, and a horse that initialised its own would pay seconds of context creation and a
fresh upload of the weights on every job. So on CUDA (``EXPLAIN_DEVICE=auto`` with a GPU
visible, ``cuda`` or ``cuda:N``) the worker runs RQ's non-forking ``SimpleWorker``: the job runs
in the worker process, which holds the context, the model on the GPU (bf16 autocast where the
precision gate keeps it: :mod:`worker.runtime`) and the fills; the masks are built there
(:class:`shapcore.value.CoalitionModel`). What the forking parent did and a ``SimpleWorker``
does not is added back:

- a heartbeat thread (:class:`JobHeartbeat`) renews the job's entry in the started registry
  every ``EXPLAIN_MONITOR_INTERVAL_S`` while the job runs, as RQ's parent does in
  ``monitor_work_horse`` (``maintain_heartbeats``), with the same TTL (monitor + grace). A
  SIGKILLed worker's job is then reclaimed as quickly as the forking worker's.
- the job's time limit: RQ's ``SIGALRM`` death penalty raises in the job itself (the main
  thread). Python runs that handler between bytecodes, so a job stuck in native code is not
  interrupted; the heartbeat thread ends the process (SIGKILL) once the job is
  :data:`OVERRUN_KILL_S` past its limit, as RQ's parent kills such a horse, and the job is
  reclaimed as abandoned (retried or failed) while the process supervisor restarts the worker.
- torch's intra-op threads are set once at start (there is no horse to protect from OpenMP).
  RQ's scheduler process (``EXPLAIN_RETRY_INTERVAL_S > 0``) is still forked: it runs no torch,
  so it touches neither the CUDA context nor an OpenMP pool.

What is lost against a horse: a crash or an out-of-memory kill takes the worker down with the
job (the job is then reclaimed like a SIGKILLed worker's), and a second SIGTERM/SIGINT (cold
shutdown) fails the running job instead of leaving it to be retried. ``EXPLAIN_FORK=false``
runs this worker on the CPU too (the tests do, having no GPU); ``EXPLAIN_FORK=true`` on CUDA is
refused at start-up.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time

import redis
from rq import SimpleWorker, Worker

from worker.runtime import configure_horse_threads, get_runtime

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
#: What a lost Redis raises (redis-py has already retried the command by then).
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


#: How far past its time limit a job may run in an in-process worker before the heartbeat thread
#: ends the process (RQ's forking parent kills the horse at the same point).
OVERRUN_KILL_S = 60


class ExplainWorkerMixin:
    """What both worker classes add to RQ's: a configurable heartbeat grace, the version preload,
    the worker's metrics, and a worker that survives Redis outages. Mixed in before RQ's class."""

    heartbeat_grace = 20
    #: Longest pause between reconnection attempts (RQ: 60 s, so a worker could idle a minute
    #: after Redis came back).
    max_connection_wait_time = 5.0
    _maintenance_interrupted = False
    #: The worker's own Prometheus figures (:class:`worker.metrics.WorkerMetrics`), or None.
    metrics = None

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        if job.timeout and job.timeout > 0:
            remaining = max(0.0, job.timeout - working_time)
            return int(min(remaining, self.job_monitoring_interval)) + self.heartbeat_grace
        return self.job_monitoring_interval + self.heartbeat_grace

    def execute_job(self, job, queue) -> None:
        """Load the job's model version in the worker process first (once), so that a horse inherits it.

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
            self._execute_riding_out_outages(job, queue)
            return
        started = time.monotonic()
        self.metrics.busy.set(1)
        try:
            self._execute_riding_out_outages(job, queue)
        finally:
            self.metrics.busy.set(0)
            self._record_job(job, time.monotonic() - started)

    def _execute_riding_out_outages(self, job, queue) -> None:
        """RQ's fork-and-monitor; Redis lost around the end of the job does not end the worker.

        The heartbeats during the job are covered by :meth:`maintain_heartbeats`; what can still
        fail is RQ's bookkeeping once the horse has exited (reading the job's status when the
        horse failed, marking the worker idle). The job then keeps its "started" state and its
        expiring entry in the started registry, so the abandoned-job handling retries it.
        """
        try:
            super().execute_job(job, queue)
        except REDIS_ERRORS as exc:
            log.error(
                "Redis was unreachable when job %s ended (%s): it will be reclaimed as abandoned and retried",
                job.id,
                exc,
            )

    # -- Redis outages ------------------------------------------------------------------------

    def maintain_heartbeats(self, job, execution) -> None:
        """Renew the job's heartbeat; while Redis is away, keep the horse running and try again
        at the next monitoring tick (the entry has ``heartbeat_grace`` seconds to spare)."""
        try:
            super().maintain_heartbeats(job, execution)
        except REDIS_ERRORS as exc:
            log.warning("Redis unreachable while job %s runs (%s); the job goes on", job.id, exc)

    def heartbeat(self, timeout=None, pipeline=None) -> None:
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
            return
        try:
            super().heartbeat(timeout)
        except REDIS_ERRORS as exc:  # the worker key lives worker_ttl + 60 s: a missed renewal is harmless
            log.warning("Redis unreachable, worker heartbeat skipped (%s)", exc)

    def check_for_suspension(self, burst: bool) -> None:
        """First thing of every turn of RQ's loop: wait here until Redis answers."""
        self.wait_for_redis()
        if self._maintenance_interrupted:
            # RQ takes a 15-minute lock per queue for maintenance and releases it at the end; a
            # pass cut short by the outage would leave it, and with it abandoned jobs, for 15 min.
            try:
                for queue in self.queues:
                    queue.release_maintenance_lock()
                self._maintenance_interrupted = False
            except REDIS_ERRORS:
                return  # lost again: the next turn waits
        super().check_for_suspension(burst)

    def run_maintenance_tasks(self) -> None:
        try:
            super().run_maintenance_tasks()
        except REDIS_ERRORS as exc:
            self._maintenance_interrupted = True
            log.warning("Redis unreachable during maintenance (%s); trying again at the next one", exc)

    def teardown(self) -> None:
        try:
            super().teardown()
        except REDIS_ERRORS as exc:  # stopping during an outage: the worker key expires by itself
            log.warning("Redis unreachable at shutdown (%s); the worker's entry will expire", exc)

    def wait_for_redis(self) -> None:
        """Block until Redis answers a PING, retrying with back-off up to ``max_connection_wait_time``.

        A stop request (SIGTERM/SIGINT) interrupts the wait through RQ's signal handler.
        """
        delay = 0.5
        lost_at: float | None = None
        while True:
            try:
                self.connection.ping()
            except REDIS_ERRORS as exc:
                if lost_at is None:
                    lost_at = time.monotonic()
                    log.error("Redis unreachable (%s); waiting for it", exc)
                time.sleep(delay)
                delay = min(delay * 2, self.max_connection_wait_time)
                continue
            if lost_at is not None:
                log.warning("Redis reachable again after %.1f s", time.monotonic() - lost_at)
            return

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


class ExplainWorker(ExplainWorkerMixin, Worker):
    """RQ's forking ``Worker`` (the CPU's): horses that die with their parent and set their own
    torch threads."""

    horse_threads = 1

    def setup_work_horse_signals(self) -> None:
        super().setup_work_horse_signals()
        parent = os.getppid()
        _die_with_parent()
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        configure_horse_threads(self.horse_threads)


class InProcessExplainWorker(ExplainWorkerMixin, SimpleWorker):
    """RQ's ``SimpleWorker`` (CUDA's): each job runs in this process, its heartbeat renewed by a
    thread while it runs (see the module's docstring)."""

    def perform_job(self, job, queue, execution) -> bool:
        beat = JobHeartbeat(self, job, execution)
        beat.start()
        try:
            return super().perform_job(job, queue, execution)
        finally:
            beat.stop()


class JobHeartbeat:
    """A thread renewing one running job's heartbeat every ``job_monitoring_interval`` seconds.

    It calls the worker's ``maintain_heartbeats`` (the worker's key, the execution's entry in the
    started registry, the job's ``last_heartbeat``), as RQ's forking parent does between two
    waits for its horse. The registry entry is only ever updated (``ZADD XX``), never created, so
    a renewal racing the job's end cannot bring a finished job back.
    """

    def __init__(self, worker: InProcessExplainWorker, job, execution) -> None:
        self.worker, self.job, self.execution = worker, job, execution
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job.id}", daemon=True)
        self._started = time.monotonic()

    def start(self) -> None:
        self._started = time.monotonic()  # the job's clock starts right after (RQ's perform_job)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)  # a renewal in flight finishes (or its Redis command times out)

    def _run(self) -> None:
        while not self._stop.wait(self.worker.job_monitoring_interval):
            self._check_overrun()
            try:
                self.worker.maintain_heartbeats(self.job, self.execution)  # Redis errors: logged there
            except Exception:  # the next tick tries again; the entry has the grace to spare
                log.warning("heartbeat of job %s failed", self.job.id, exc_info=True)

    def _check_overrun(self) -> None:
        limit = self.job.timeout or self.worker.queue_class.DEFAULT_TIMEOUT  # what perform_job enforces
        if limit is None or limit < 0:
            return
        running = time.monotonic() - self._started
        if running > limit + OVERRUN_KILL_S:
            log.critical("job %s has run %.0f s, past its %s s limit, and its time-out did not stop it (stuck in "
                         "native code?): ending this worker; the job will be reclaimed as abandoned", self.job.id,
                         running, limit)  # fmt: skip
            os.kill(os.getpid(), signal.SIGKILL)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):  # not Linux
        log.debug("PR_SET_PDEATHSIG unavailable")
