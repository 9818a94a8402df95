"""Fixtures and helpers for the explanation tests (no tests here): real workers.

``explain_redis_url``  (session, :mod:`tests.support.redisdb`) the explanation tests' own
                       database, flushed once.
``job_image(data)``    an upload's bytes as the decoded picture a job carries (as the API makes it).
``start_worker``       (session) factory: ``start_worker(registry, env=None)`` runs
                       ``python -m worker`` in a subprocess, waits until it listens and
                       returns a :class:`RunningWorker`; every worker is stopped at the end.

The fixtures are registered by tests/conftest.py; import the helpers with
``from tests.support.workers import ...``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.processes import RunningProcess, alive, child_env, children, python_module, spawn, wait_for

#: Small and fast knobs for tests: quick abandoned-job detection, one torch thread, the CPU's
#: forking worker (what the tests of horses and kills check) even where a GPU is visible; the
#: CUDA worker is started by its own tests (tests/e2e/test_cuda.py) with EXPLAIN_DEVICE=cuda. torchscript
#: (fp32): the tests compare served values with fp32 references, and ``auto`` times the runtimes at
#: start-up, which a loaded machine can tip either way (tests/shapcore/test_runtime_gate.py tests the gate).
FAST_WORKER_ENV = {
    "EXPLAIN_DEVICE": "cpu",
    "EXPLAIN_RUNTIME": "torchscript",
    "EXPLAIN_TORCH_THREADS": "1",
    "EXPLAIN_MONITOR_INTERVAL_S": "1",
    "EXPLAIN_HEARTBEAT_GRACE_S": "3",
    "EXPLAIN_MAINTENANCE_INTERVAL_S": "2",
    "EXPLAIN_WORKER_TTL_S": "20",
}


def job_image(data: bytes, max_pixels: int = 16_777_216, max_side: int = 512):
    """What POST /explain hands the worker for ``data`` (tests that submit jobs directly)."""
    from shapcore.images import explanation_input
    from shapcore.jobs.image import JobImage

    return JobImage.from_arrays(*explanation_input(data, max_pixels, max_side))


def job_doc(conn, settings, job_id: str) -> dict | None:
    """The status document of a job as GET /explain/{id} answers it (JSON), or None."""
    from shapcore.jobs.client import ExplainClient

    doc = ExplainClient(conn, settings).status(job_id)
    return None if doc is None else doc.model_dump(mode="json")


@dataclass
class RunningWorker(RunningProcess):
    """A ``python -m worker`` subprocess."""

    def wait_listening(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            if "Listening on" in self.log_tail(100_000):
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not listening after {timeout:.0f} s:\n{self.log_tail()}")

    def horses(self) -> list[int]:
        return [pid for pid in children(self.pid) if alive(pid)]

    def kill(self) -> None:
        """SIGKILL the worker's main process (its horse dies with it: PR_SET_PDEATHSIG)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.terminate(signal.SIGTERM, timeout=20)


@pytest.fixture(scope="session")
def start_worker(
    explain_redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RunningWorker]]:
    started: list[RunningWorker] = []
    logs = tmp_path_factory.mktemp("worker-logs")

    def start(registry: Path, env: dict[str, str] | None = None, wait: bool = True) -> RunningWorker:
        full_env = child_env(
            **{"REDIS_URL": explain_redis_url, "MODEL_REGISTRY": str(registry), **FAST_WORKER_ENV, **(env or {})}
        )
        log_path = logs / f"worker-{len(started)}.log"
        proc = spawn(python_module("worker"), full_env, log_path)
        worker = RunningWorker(proc=proc, log_path=log_path, env=full_env)
        started.append(worker)
        if wait:
            worker.wait_listening()
        return worker

    yield start
    for worker in started:
        worker.stop()


def wait_finished(client, status_url: str, timeout: float = 180) -> dict:
    """Poll ``GET status_url`` (an httpx client of the service) until the job is finished or failed."""

    def done():
        doc = client.get(status_url).json()
        return doc if doc["status"] in ("finished", "failed") else None

    return wait_for(done, timeout, f"{status_url} to finish")


def assert_nontrivial(values: object, atol: float, margin: float = 100.0) -> None:
    """SHAP values that an agreement check at ``atol`` can tell apart from zero and from each other.

    A one-epoch smoke model can give values that are all (nearly) zero, or all equal: two such
    arrays agree at any tolerance however wrong either computation is. So the largest value must
    stand ``margin`` times above ``atol``, and the values must spread by as much.
    """
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    assert np.isfinite(arr).all(), "SHAP values are not all finite"
    biggest, spread = float(np.abs(arr).max()), float(np.ptp(arr))
    assert biggest >= margin * atol, f"max |SHAP value| {biggest:.3g} is too close to the tolerance {atol:g}"
    assert spread >= margin * atol, f"SHAP values spread by only {spread:.3g}: near-equal values agree trivially"
