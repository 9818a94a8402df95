"""A worker told to stop (SIGTERM, what Kubernetes sends on a scale-down, a rollout or a node
drain) finishes the job it is running, leaves the queued ones in the queue and exits 0: RQ's
warm shutdown, with real ``python -m worker`` processes on a private ``redis-server``.

Both worker classes: the forking one (the CPU's) and the in-process one (CUDA's, here on the
CPU with ``EXPLAIN_FORK=false``). The signal goes to the worker's own process only, as the
kubelet sends it to the container's first process (deploy/kubernetes runs ``python -m worker``
as that process, without a shell in between).
"""

from __future__ import annotations

import signal
import subprocess
from datetime import UTC, datetime

import pytest

from shapcore.jobs.client import connect
from shapcore.jobs.queue import JobRequest, get_queue, submit
from shapcore.jobs.settings import ExplainSettings
from tests.support.workers import job_doc, job_image, wait_for

pytestmark = pytest.mark.timeout(900)  # a guard against a hang (a first test may train the smoke model)

#: A job of several seconds on one torch thread: still running well after the signal.
LONG_SAMPLES = 1000
#: Deadlines that only guard against a hang; nothing here claims a speed.
HANG_GUARD_S = 180


@pytest.mark.parametrize("fork", ["true", "false"], ids=["forking", "in-process"])
def test_sigterm_mid_job_finishes_the_job_and_exits_0(fork, smoke_model, cifar_jpeg, start_worker, private_redis):
    from rq.job import Job

    registry, version = smoke_model
    queue_name = f"explain-warm-shutdown-{fork}"
    redis_url = private_redis.url()
    worker = start_worker(registry, env={"REDIS_URL": redis_url, "EXPLAIN_QUEUE": queue_name, "EXPLAIN_FORK": fork})
    settings = ExplainSettings(_env_file=None, redis_url=redis_url, explain_queue=queue_name)
    conn = connect(redis_url, 2.0)
    image = job_image(cifar_jpeg)

    def request(seed: int) -> JobRequest:
        return JobRequest.of(image, version, segments=50, samples=LONG_SAMPLES, background="mean", seed=seed,
                             target=None)  # fmt: skip

    running, created = submit(conn, settings, request(7101))
    assert created

    def started() -> Job | None:
        job = Job.fetch(running.id, connection=conn)
        return job if job.get_status() == "started" and float(job.meta.get("progress", 0)) > 0.05 else None

    wait_for(started, HANG_GUARD_S, "the job to start", interval=0.1)
    waiting, created = submit(conn, settings, request(7102))
    assert created
    horses = worker.horses() if fork == "true" else []
    assert fork == "false" or len(horses) == 1, worker.log_tail()

    signalled_at = datetime.now(UTC)
    worker.proc.send_signal(signal.SIGTERM)
    at = Job.fetch(running.id, connection=conn)
    assert at.get_status() == "started", "the job ended before the signal: make it longer"
    progress = float(at.meta.get("progress", 0))
    try:
        code = worker.proc.wait(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit after SIGTERM:\n{worker.log_tail()}")
    exited_s = (datetime.now(UTC) - signalled_at).total_seconds()
    print(f"\n{fork}: SIGTERM with the job at {progress:.0%}; the worker exited {exited_s:.1f} s later, status {code}")
    assert code == 0, worker.log_tail()
    assert "warm shut down requested" in worker.log_tail(100_000).lower(), worker.log_tail()

    # The running job ended after the signal, finished, on its first attempt: not cut short and retried.
    job = Job.fetch(running.id, connection=conn)
    assert job.get_status() == "finished", worker.log_tail()
    assert job.ended_at is not None and job.ended_at.replace(tzinfo=UTC) > signalled_at
    doc = job_doc(conn, settings, running.id)
    assert doc["status"] == "finished" and doc["attempts"] == 1, doc
    assert doc["result"]["local_accuracy_residual"] < 1e-3
    # The queued job was not taken by the stopping worker: it waits, in the queue, for the next one.
    assert Job.fetch(waiting.id, connection=conn).get_status() == "queued"
    assert waiting.id in get_queue(conn, settings).job_ids
    conn.close()
