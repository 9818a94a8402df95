"""``python -m worker``: an RQ worker on the ``explain`` queue with the model preloaded.

Configuration comes from the environment (see :mod:`shapcore.jobs.settings`): ``REDIS_URL``,
``MODEL_REGISTRY``, ``MODEL_VERSION`` and the ``EXPLAIN_*`` knobs. Run one per core group (on
CUDA: per GPU, ``EXPLAIN_DEVICE=cuda:N``); several workers on one Redis share the queue.
SIGTERM/SIGINT: finish the current job, then exit (a second one stops at once). Exit status 2:
a configuration error (message on stderr); 3: Redis unreachable at start.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

# Thread pools that busy-wait are ruinous on a CPU shared with other busy processes (the
# API, training): measured on the 2-core VM with another process computing, a 2-thread
# torch forward pass ran ~15x slower with GNU OpenMP's spinning waits, and KernelSHAP's
# small least-squares solves ~150x slower with OpenBLAS threads (57 ms vs 0.35 ms each).
# Torch's pool sleeps when idle; NumPy's BLAS gets one thread (its matrices are 2000x50).
# Both must be set before torch / numpy are imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--name", default=None, help="worker name (default: explain-<host>-<pid>)")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")
    args = parser.parse_args(argv)

    from pydantic import ValidationError

    from shapcore.jobs.settings import get_explain_settings

    try:
        settings = get_explain_settings()
    except ValidationError as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    level = (args.log_level or settings.explain_log_level).upper()

    from shapcore.errors import UserError

    try:
        runtime, rt, fork = _prepare(settings)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from shapcore.jobs.client import connect
    from shapcore.jobs.failures import on_work_horse_killed
    from shapcore.jobs.queue import get_queue
    from worker.worker import ExplainWorker, InProcessExplainWorker

    connection = connect(settings.redis_url)
    try:
        connection.ping()
    except Exception as exc:
        print(f"error: Redis is not reachable at {settings.redis_url}: {exc}", file=sys.stderr)
        return 3

    name = args.name or f"explain-{socket.gethostname()}-{os.getpid()}"
    worker_class = ExplainWorker if fork else InProcessExplainWorker
    worker = worker_class(
        [get_queue(connection, settings)],
        connection=connection,
        name=name,
        default_result_ttl=settings.explain_result_ttl_s,
        job_monitoring_interval=settings.explain_monitor_interval_s,
        maintenance_interval=settings.explain_maintenance_interval_s,
        worker_ttl=settings.explain_worker_ttl_s,
        work_horse_killed_handler=on_work_horse_killed,
    )
    worker.heartbeat_grace = settings.explain_heartbeat_grace_s
    if fork:
        worker.horse_threads = settings.torch_threads()
    metrics_note = ""
    if settings.explain_metrics_port:
        from worker.metrics import WorkerMetrics, serve_worker_metrics

        worker.metrics = WorkerMetrics()
        worker.metrics.describe_worker(name, settings.explain_queue, rt.version, str(runtime.device))
        try:
            serve_worker_metrics(settings.explain_metrics_port, settings.explain_metrics_host)
        except OSError as exc:
            print(f"error: {exc} (EXPLAIN_METRICS_PORT)", file=sys.stderr)
            return 2
        metrics_note = f", metrics on http://{settings.explain_metrics_host}:{settings.explain_metrics_port}/metrics"
    mode = "a forked work horse per job" if fork else "jobs in this process (no fork)"
    print(
        f"worker {name}: queue {settings.explain_queue!r} on {settings.redis_url}, model {rt.version} preloaded "
        f"on {runtime.device} ({rt.runtime.chosen}, {rt.runtime.precision}), {mode}, "
        f"{settings.torch_threads()} torch thread(s) per job{metrics_note}",
        file=sys.stderr,
        flush=True,
    )
    worker.work(burst=args.burst, logging_level=level, with_scheduler=settings.explain_retry_interval_s > 0)
    return 0


def _prepare(settings):
    """Resolve EXPLAIN_DEVICE and EXPLAIN_FORK, set torch's threads and preload the default
    version: returns (the runtime, the preloaded version, whether jobs fork). Raises
    :class:`shapcore.errors.UserError` on a bad setting or version.

    Imports and model loading happen here, in the parent, before any fork: every work horse
    inherits them (torch, shap, scikit-image, the weights, the background set).
    """
    from worker.runtime import configure_horse_threads, configure_parent_threads, forks_jobs, get_runtime

    runtime = get_runtime(settings)  # resolves EXPLAIN_DEVICE
    fork = forks_jobs(settings, runtime.device)
    if fork:  # one thread in the parent, each horse sets its own (worker.runtime)
        configure_parent_threads()
    else:  # the jobs run in this process: set once, here
        configure_horse_threads(settings.torch_threads())
    import shap  # noqa: F401
    import skimage.segmentation  # noqa: F401

    from worker import jobs as _jobs  # noqa: F401  (imported before any fork)

    return runtime, runtime.preload(), fork


if __name__ == "__main__":
    sys.exit(main())
