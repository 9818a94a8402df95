"""Where the explanation worker runs its model (``EXPLAIN_DEVICE``) and how it runs its jobs
(``EXPLAIN_FORK``): the device resolution, the refusal of a CUDA worker without CUDA (a real
``python -m worker``), and the in-process worker that CUDA uses, run here on the CPU: a real
explanation end to end on the real Redis, its heartbeat renewed by its thread while the job
runs, and its job time limit enforced. The same worker on a GPU: tests/e2e/test_cuda.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from pydantic import ValidationError

from shapcore.errors import UserError
from shapcore.jobs.client import connect
from shapcore.jobs.queue import JobRequest, get_queue, submit
from shapcore.jobs.settings import ExplainSettings
from shapcore.registry import Registry
from tests.support.services import ROOT, free_port
from tests.support.workers import job_doc, job_image, wait_for
from worker.runtime import forks_jobs, worker_device

pytestmark = pytest.mark.timeout(300)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


# -- the device and the worker kind, resolved --------------------------------------------------------------


def test_explain_device_resolution() -> None:
    auto = worker_device(ExplainSettings())  # the default: auto
    assert auto == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert worker_device(ExplainSettings(explain_device="cpu")) == torch.device("cpu")
    for bad in ("gpu", "cuda:", "cuda:x", "CPU0", "mps", ""):
        with pytest.raises(ValidationError, match="explain_device"):
            ExplainSettings(explain_device=bad)


@no_cuda
def test_cuda_without_cuda_is_a_clear_error() -> None:
    for asked in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match=f"EXPLAIN_DEVICE={asked} but no CUDA device is visible"):
            worker_device(ExplainSettings(explain_device=asked))


def test_jobs_fork_on_the_cpu_and_run_in_process_on_cuda() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert forks_jobs(ExplainSettings(), cpu) is True
    assert forks_jobs(ExplainSettings(), cuda) is False
    assert forks_jobs(ExplainSettings(explain_fork=False), cpu) is False  # the in-process worker on a CPU
    assert forks_jobs(ExplainSettings(explain_fork=""), cpu) is True  # blank: unset, as compose passes it
    with pytest.raises(UserError, match="does not survive fork"):
        forks_jobs(ExplainSettings(explain_fork=True), cuda)


@no_cuda
def test_worker_asked_for_cuda_without_cuda_exits_2(smoke_model, explain_redis_url) -> None:
    env = {**os.environ, "MODEL_REGISTRY": str(smoke_model[0]), "REDIS_URL": explain_redis_url,
           "EXPLAIN_DEVICE": "cuda"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "worker"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "error: EXPLAIN_DEVICE=cuda but no CUDA device is visible" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# -- the in-process worker, on the CPU ---------------------------------------------------------------------


def _request(version: str, image: bytes, samples: int) -> JobRequest:
    return JobRequest.of(image=job_image(image), model_version=version, segments=50, samples=samples,
                      background="mean", seed=5, target=None)  # fmt: skip


def _entry_expiry(conn, queue, job_id: str) -> float | None:
    """When the job's entry in the started registry expires (its score), None without one."""
    scores = [s for member, s in conn.zrange(queue.started_job_registry.key, 0, -1, withscores=True)
              if member.decode().startswith(f"{job_id}:")]  # fmt: skip
    return max(scores) if scores else None


def test_in_process_worker_explains_and_renews_the_heartbeat(smoke_model, cifar_jpeg, start_worker, explain_redis_url):
    """EXPLAIN_FORK=false: no horse; a job running several monitoring intervals has its
    started-registry entry renewed (by the thread: nothing else renews it in a SimpleWorker; the
    status polls below would reclaim an expired entry at once), finishes at the first attempt
    and says where it ran; the worker's metrics count it and name the device."""
    registry: Path = smoke_model[0]
    version = Registry(registry).promoted()
    queue_name = "explain-test-in-process"
    settings = ExplainSettings(redis_url=explain_redis_url, explain_queue=queue_name, explain_retries=1)
    conn = connect(explain_redis_url, 2.0)
    queue = get_queue(conn, settings)
    port = free_port()
    # A 10-s grace (not the tests' 3 s): on a loaded machine the thread may be late by seconds; the
    # renewals are still counted below (the entry's expiry must move on at least twice).
    worker = start_worker(registry, env={"EXPLAIN_QUEUE": queue_name, "EXPLAIN_FORK": "false",
                                         "EXPLAIN_RETRIES": "1", "EXPLAIN_METRICS_PORT": str(port),
                                         "EXPLAIN_METRICS_HOST": "127.0.0.1",
                                         "EXPLAIN_HEARTBEAT_GRACE_S": "10"})  # fmt: skip
    assert "preloaded on cpu" in worker.log_tail() and "jobs in this process (no fork)" in worker.log_tail()

    # seconds on one torch thread (more on a busy machine): several 1-s monitoring intervals
    job, _ = submit(conn, settings, _request(version, cifar_jpeg, samples=5000))
    wait_for(lambda: _entry_expiry(conn, queue, job.id) or job_doc(conn, settings, job.id)["status"] == "failed",
             60, "the job to start", interval=0.05)  # fmt: skip
    first = _entry_expiry(conn, queue, job.id)
    expiries, horses = [first], set()
    while (doc := job_doc(conn, settings, job.id))["status"] == "started":  # reclaims an expired entry
        horses.update(worker.horses())
        if (now := _entry_expiry(conn, queue, job.id)) is not None and now != expiries[-1]:
            expiries.append(now)
        assert worker.proc.poll() is None, worker.log_tail()
        time.sleep(0.2)
    assert doc["status"] == "finished", (doc, worker.log_tail())
    assert doc["attempts"] == 1, doc  # never reclaimed as abandoned
    assert not horses  # nothing forked
    # The entry's expiry moved on while the job ran: renewed (the job's start sets it once and
    # nothing else in a SimpleWorker renews it), at least twice.
    assert len(expiries) >= 3 and expiries[-1] - first >= 2, (expiries, worker.log_tail())
    result = doc["result"]
    assert result["device"] == "cpu" and result["precision"] in ("fp32", "bf16")
    assert result["local_accuracy_residual"] < 1e-3

    def counted() -> str | None:  # the worker records the job just after RQ marks it finished
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return text if 'shapserve_worker_jobs_total{status="finished"} 1.0' in text else None

    text = wait_for(counted, 10, "the worker to count the job")
    assert 'device="cpu"' in text.split("shapserve_worker_info{", 1)[1].split("}", 1)[0]

    # the job time limit holds in process: RQ's SIGALRM ends an over-long job, the worker goes on
    slow = queue.enqueue("time.sleep", 60, job_timeout=2)
    wait_for(lambda: slow.refresh() or slow.get_status() == "failed", 30, "the over-long job to be stopped")
    assert "JobTimeoutException" in (slow.latest_result().exc_string or "")
    assert worker.proc.poll() is None, worker.log_tail()
    worker.stop()
