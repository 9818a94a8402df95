"""An explanation job's limits in time, with a real ``python -m worker`` and a real service on
the real Redis: EXPLAIN_JOB_TIMEOUT_S (a job over it fails with a clear reason, and the worker
takes the next job) and EXPLAIN_RESULT_TTL_S (after it the job is gone: 404 with a clear
message, and the same request makes a new job instead of returning the expired one).

States are polled; the deadlines given to wait_for only guard against a hang."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.support.services import image_file as files
from tests.support.workers import wait_for

pytestmark = pytest.mark.timeout(600)

QUEUE = f"explain-lifecycle-{uuid.uuid4().hex[:6]}"
JOB_TIMEOUT_S = 8
RESULT_TTL_S = 60  # the smallest EXPLAIN_RESULT_TTL_S allowed
LIMITS = {
    "EXPLAIN_QUEUE": QUEUE,
    "EXPLAIN_JOB_TIMEOUT_S": str(JOB_TIMEOUT_S),
    "EXPLAIN_RESULT_TTL_S": str(RESULT_TTL_S),
    "EXPLAIN_RETRIES": "0",
}
SMALL = {"segments": "12", "samples": "60"}
#: Far more work than JOB_TIMEOUT_S allows on one torch thread (2000 samples take seconds).
HUGE = {"segments": "50", "samples": "20000"}
#: Guards against a hang, not speed claims.
JOB_GUARD_S = 240
EXPIRY_GUARD_S = RESULT_TTL_S + 240


def ended(client: httpx.Client, job_id: str) -> dict:
    def done() -> dict | None:
        doc = client.get(f"/explain/{job_id}").json()
        return doc if doc["status"] in ("finished", "failed") else None

    return wait_for(done, JOB_GUARD_S, f"job {job_id} to end", interval=0.5)


@pytest.fixture(scope="module")
def lifecycle(start_service, start_worker, service_registry, explain_redis_url):
    svc = start_service(env={**LIMITS, "REDIS_URL": explain_redis_url, "WARMUP": "false"})
    worker = start_worker(service_registry, env=LIMITS)
    yield svc.client, worker
    worker.stop()
    svc.stop()


def test_a_job_over_the_time_limit_fails_and_the_next_one_runs(lifecycle, cifar_jpeg):
    client, worker = lifecycle
    big = client.post("/explain", files=files(cifar_jpeg), data={**HUGE, "seed": "7001"})
    assert big.status_code == 202, big.text
    doc = ended(client, big.json()["job_id"])
    assert doc["status"] == "failed", (doc["status"], worker.log_tail())
    assert doc["result"] is None
    error = doc["error"].lower()
    assert "timeout" in error or "time limit" in error, doc["error"]
    # The limit that stopped it is EXPLAIN_JOB_TIMEOUT_S, not RQ's own 180-s default (which a job
    # enqueued without its timeout would get, and which also ends a HUGE job within JOB_GUARD_S).
    assert f"({JOB_TIMEOUT_S} seconds)" in doc["error"], doc["error"]
    heatmap = client.get(big.json()["heatmap_url"])
    assert heatmap.status_code == 409 and heatmap.json()["error"]["code"] == "explanation_failed"

    assert worker.proc.poll() is None, worker.log_tail()
    small = client.post("/explain", files=files(cifar_jpeg), data={**SMALL, "seed": "7002"})
    assert small.status_code == 202, small.text
    doc = ended(client, small.json()["job_id"])
    assert doc["status"] == "finished", (doc, worker.log_tail())


def test_a_result_expires_after_its_ttl(lifecycle, cifar_jpeg):
    client, worker = lifecycle
    fields = {**SMALL, "seed": "7003"}
    first = client.post("/explain", files=files(cifar_jpeg), data=fields)
    assert first.status_code == 202, first.text
    job_id = first.json()["job_id"]
    assert ended(client, job_id)["status"] == "finished", worker.log_tail()
    assert client.get(first.json()["heatmap_url"]).status_code == 200
    again = client.post("/explain", files=files(cifar_jpeg), data=fields)
    assert again.status_code == 200 and again.json()["job_id"] == job_id  # still kept: deduplicated

    gone = wait_for(
        lambda: (r := client.get(f"/explain/{job_id}")).status_code == 404 and r,
        EXPIRY_GUARD_S,
        f"job {job_id} to expire (EXPLAIN_RESULT_TTL_S={RESULT_TTL_S})",
        interval=1.0,
    )
    error = gone.json()["error"]
    assert error["code"] == "not_found" and "expired" in error["message"] and job_id in error["message"], error
    assert client.get(first.json()["heatmap_url"]).status_code == 404

    anew = client.post("/explain", files=files(cifar_jpeg), data=fields)
    assert anew.status_code == 202, anew.text
    assert anew.json()["job_id"] != job_id and anew.json()["deduplicated"] is False
    assert ended(client, anew.json()["job_id"])["status"] == "finished", worker.log_tail()
