"""Overload: beyond PREDICT_QUEUE_BUDGET_MS of queued work, /predict is refused at once (503
``overloaded`` with Retry-After), and every request gets an answer.

The refusals are checked by what they cost, not by the clock: a refused request is counted in
``shapserve_predict_shed_total`` and never reaches a forward pass
(``shapserve_predicted_images_total`` grows by the answered ones only).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from service.batcher import Batcher
from tests.support.services import image_file, metric

CLIENTS = 48


async def _flood(url: str, body: bytes, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        return await asyncio.gather(
            *(client.post("/predict", files=image_file(body)) for _ in range(n)), return_exceptions=True
        )


def test_overload_is_refused_at_once_and_everyone_gets_an_answer(own_service, cifar_jpeg: bytes) -> None:
    # one image per forward pass and a budget of one millisecond: one request ahead is too many
    svc = own_service(env={"BATCH_MAX_SIZE": "1", "PREDICT_QUEUE_BUDGET_MS": "1"})
    assert svc.client.post("/predict", files=image_file(cifar_jpeg)).status_code == 200  # a rate to estimate with
    before = svc.client.get("/metrics").text
    answers = asyncio.run(_flood(svc.url, cifar_jpeg, CLIENTS))
    after = svc.client.get("/metrics").text

    errors = [a for a in answers if isinstance(a, BaseException)]
    assert not errors, errors[:3]
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 503}, codes
    ok, shed = codes.count(200), codes.count(503)
    assert ok >= 1 and shed >= 1, codes
    for a in answers:
        if a.status_code == 503:
            error = a.json()["error"]
            assert error["code"] == "overloaded" and "PREDICT_QUEUE_BUDGET_MS" in error["message"]
            assert int(a.headers["Retry-After"]) >= 1
    assert metric(after, "shapserve_predict_shed_total") - metric(before, "shapserve_predict_shed_total") == shed
    forwarded = metric(after, "shapserve_predicted_images_total") - metric(before, "shapserve_predicted_images_total")
    assert forwarded == ok, "a refused request reached the model"
    # the service is still there and answers once the flood has passed
    assert svc.client.post("/predict", files=image_file(cifar_jpeg)).status_code == 200


def test_no_budget_no_refusal(own_service, cifar_jpeg: bytes) -> None:
    """PREDICT_QUEUE_BUDGET_MS=0: the same flood waits its turn, every request answered 200."""
    svc = own_service(env={"BATCH_MAX_SIZE": "1", "PREDICT_QUEUE_BUDGET_MS": "0"})
    svc.client.post("/predict", files=image_file(cifar_jpeg))
    answers = asyncio.run(_flood(svc.url, cifar_jpeg, 16))
    assert [getattr(a, "status_code", a) for a in answers] == [200] * 16


def test_queue_wait_counts_the_work_ahead() -> None:
    """None before any forward pass, 0 when idle, then the images ahead / images per second."""
    gate = threading.Event()

    def run(batch: list[torch.Tensor]) -> tuple[str, list[int]]:
        gate.wait(10)
        time.sleep(0.02)
        return "v", [0] * sum(int(t.shape[0]) for t in batch)

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(run, pool, max_size=4, max_wait_s=0.0)
            batcher.start()
            assert batcher.queue_wait_s() is None
            gate.set()
            await batcher.submit(torch.zeros(2, 3, 2, 2, dtype=torch.uint8))
            assert batcher.queue_wait_s() == 0.0  # idle: nothing ahead
            rate = batcher._rate
            gate.clear()  # hold the next forward pass: its images are ahead of newcomers
            task = asyncio.ensure_future(batcher.submit(torch.zeros(3, 3, 2, 2, dtype=torch.uint8)))
            while not batcher.queue_wait_s():
                await asyncio.sleep(0.005)
            assert batcher.queue_wait_s() == pytest.approx(3 / rate)
            gate.set()
            await task
            await batcher.stop()

    asyncio.run(scenario())
