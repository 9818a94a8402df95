"""Overload: beyond PREDICT_QUEUE_BUDGET_MS of queued work, /predict is refused before its upload
is read (503 ``overloaded`` with Retry-After), every request gets an answer, and a flood that
ignores Retry-After does not starve the requests that are let in.

The refusals are checked by what they cost, not by the clock: a refused request is counted in
``shapserve_predict_shed_total`` and never reaches a forward pass
(``shapserve_predicted_images_total`` grows by the answered ones only); the flood's goodput is
the service's own count of answers against its own forward-pass rate.
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
from service.overload import BURST_S, RefusalPacer
from tests.support.flood_client import flood, flood_async
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


def test_under_overload_a_wrong_key_is_still_told_so(own_service, cifar_jpeg: bytes) -> None:
    """The gate refuses for overload only a request with a valid key: the others go on to be told 403."""
    from service.auth import mint

    secret, key = mint("flood")
    svc = own_service(env={"API_KEYS": key.entry(), "BATCH_MAX_SIZE": "1", "PREDICT_QUEUE_BUDGET_MS": "1"})
    good = {"Authorization": f"Bearer {secret}"}
    assert svc.client.post("/predict", files=image_file(cifar_jpeg), headers=good).status_code == 200

    async def scenario() -> tuple[list[int], dict]:
        flooding = asyncio.ensure_future(flood_async(svc.url, cifar_jpeg, 32, 3.0, 5000, headers=good))
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=svc.url, timeout=30) as client:
            wrong = await asyncio.gather(
                *(client.post("/predict", files=image_file(cifar_jpeg), headers={"X-API-Key": "sk-wrong"})
                  for _ in range(8))
            )  # fmt: skip
        return [r.status_code for r in wrong], await flooding

    wrong, flooded = asyncio.run(scenario())
    assert flooded[503] > 0, flooded  # the valid key's flood was refused for overload meanwhile
    assert wrong == [403] * 8


def test_queue_wait_counts_the_work_ahead() -> None:
    """None before any forward pass, 0 when idle, then the images ahead / images per second (and,
    for the gate, the newcomer's own batch: as big as the queue it joins, at most a full one)."""
    gate = threading.Event()

    def run(batch: list[torch.Tensor]) -> tuple[str, list[int]]:
        gate.wait(10)
        time.sleep(0.02)
        return "v", [0] * sum(int(t.shape[0]) for t in batch)

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(run, pool, max_size=4, max_wait_s=0.0)
            batcher.start()
            assert batcher.queue_wait_s() is None and batcher.answer_eta_s() is None
            gate.set()
            await batcher.submit(torch.zeros(2, 3, 2, 2, dtype=torch.uint8))
            assert batcher.queue_wait_s() == 0.0  # idle: nothing ahead
            assert batcher.answer_eta_s() == 0.0  # an idle service refuses nothing, whatever the budget
            rate = batcher._rate
            gate.clear()  # hold the next forward pass: its images are ahead of newcomers
            task = asyncio.ensure_future(batcher.submit(torch.zeros(3, 3, 2, 2, dtype=torch.uint8)))
            while not batcher.queue_wait_s():
                await asyncio.sleep(0.005)
            assert batcher.queue_wait_s() == pytest.approx(3 / rate)
            # the gate's figure: the work ahead plus the newcomer's own batch, as big as the queue
            # it joins: nothing waits to start, so a batch of its own image alone
            assert batcher.answer_eta_s() == pytest.approx(3 / rate + 1 / rate)
            queued = [asyncio.ensure_future(batcher.submit(torch.zeros(3, 3, 2, 2, dtype=torch.uint8)))]
            while batcher.queue_wait_s() < 6 / rate - 1e-9:
                await asyncio.sleep(0.005)
            assert batcher.answer_eta_s() == pytest.approx(6 / rate + 4 / rate)  # 3 waiting + itself
            queued.append(asyncio.ensure_future(batcher.submit(torch.zeros(3, 3, 2, 2, dtype=torch.uint8))))
            while batcher.queue_wait_s() < 9 / rate - 1e-9:
                await asyncio.sleep(0.005)
            assert batcher.answer_eta_s() == pytest.approx(9 / rate + 4 / rate)  # a deep queue: one full batch
            gate.set()
            await asyncio.gather(task, *queued)
            await batcher.stop()

    asyncio.run(scenario())


def test_the_pacer_sends_a_burst_at_once_then_one_refusal_per_interval() -> None:
    pacer = RefusalPacer(100.0)  # 10 ms apart, a burst of 0.1 s = 10 at once
    delays = [pacer.delay(50.0, max_wait_s=1.0) for _ in range(30)]
    burst = round(BURST_S * 100)
    assert delays[: burst + 1] == pytest.approx([0.0] * (burst + 1), abs=1e-9)
    assert delays[burst + 1 :] == pytest.approx([0.01 * i for i in range(1, 30 - burst)])
    # never longer than the refusal's own Retry-After, and such a refusal takes no slot
    assert pacer.delay(50.0, max_wait_s=0.05) == 0.05
    assert pacer.delay(50.0, max_wait_s=1.0) == pytest.approx(0.01 * (30 - burst))
    # an idle second later the burst is available again
    assert pacer.delay(52.0, max_wait_s=1.0) == 0.0
    assert RefusalPacer(0).delay(50.0, max_wait_s=1.0) == 0.0  # no pace


# -- a flood that ignores Retry-After ---------------------------------------------------------------------------

#: Closed-loop connections of the reference phase: a full batch's worth, queueing well under the budget.
PEAK_CONNECTIONS = 32
#: The flood: far more connections than the budget lets in, each retrying at once when refused.
FLOOD_CONNECTIONS = 256
#: How many budgets' worth of images the flood queues: the budget is sized from the capacity a first
#: service measured. The default 500 ms did not do: a 2-core Zen 5 answers 256 connections within it
#: (~850 images/s), the flood overloaded nothing, and MAX_CONCURRENT_REQUESTS is reached first when
#: there are more connections than the budget admits.
FLOOD_OVER_BUDGET = 3.0
PEAK_SECONDS, FLOOD_SECONDS = 4.0, 8.0
#: The flood's goodput must reach this share of the rate the forward pass sustains at full batches.
#: The code before issue 27's change got 36 % here (its event loop spent ~85 % of its time refusing), and
#: so did a planted 2 ms of work per refusal (35 %); this code 76-88 % on a machine shared with other runs.
#: On a quiet 2-core Zen 5 (2026-12-08, the budget sized from its capacity: ~105 ms): 90 % of the 556
#: answers/s the service gave unloaded, and 54 % with the planted 2 ms per refusal.
MIN_SHARE_OF_CAPACITY = 0.6


def _counts(text: str) -> dict[str, float]:
    return {
        "ok": metric(text, "shapserve_http_requests_total", route="/predict", method="POST", status="200"),
        "shed": metric(text, "shapserve_predict_shed_total"),
        "images": metric(text, "shapserve_predicted_images_total"),
        "forward_s": metric(text, "shapserve_inference_duration_seconds_sum"),
        "batches": metric(text, "shapserve_batch_size_count"),
    }


def _phase(svc, image: bytes, connections: int, seconds: float) -> dict[str, float]:
    """One closed-loop phase; the service's counts over it, and how long it took."""
    before = _counts(svc.client.get("/metrics").text)
    start = time.monotonic()
    statuses = flood(svc.url, image, connections=connections, seconds=seconds)
    elapsed = time.monotonic() - start
    after = _counts(svc.client.get("/metrics").text)
    delta = {k: after[k] - before[k] for k in after}
    assert set(statuses) <= {200, 503}, statuses  # every request answered, no error, no reset
    assert delta["ok"] == statuses[200], (delta, statuses)  # what the clients got is what the service counted
    delta["elapsed"] = elapsed
    return delta


def test_a_flood_that_ignores_retry_after_still_gets_answers(own_service, cifar_jpeg: bytes) -> None:
    """Goodput under a flood of retry-at-once clients, from the service's own metrics.

    Capacity is the rate of the forward pass itself (images per second of
    ``shapserve_inference_duration_seconds``), the better of a phase where a full batch's worth of
    clients keeps it busy and the flood itself, or the answers a second of that first phase where
    they are fewer (the HTTP path, not the forward pass, is the limit on a fast CPU); the flood's
    goodput is the 200s the service counted over it. Both move together when the machine is
    shared. A refusal path that costs the event loop real time (planted: 2 ms of work per refusal)
    leaves the forward pass waiting for batches, and this fails.
    """
    probe = own_service()
    assert probe.client.post("/predict", files=image_file(cifar_jpeg)).status_code == 200
    _phase(probe, cifar_jpeg, PEAK_CONNECTIONS, 1.0)
    measured = _phase(probe, cifar_jpeg, PEAK_CONNECTIONS, 2.0)
    probe.stop()
    rate = measured["images"] / measured["forward_s"]
    budget_ms = min(500.0, max(50.0, 1000.0 * FLOOD_CONNECTIONS / (FLOOD_OVER_BUDGET * rate)))
    svc = own_service(env={"PREDICT_QUEUE_BUDGET_MS": f"{budget_ms:.0f}"})
    assert svc.client.post("/predict", files=image_file(cifar_jpeg)).status_code == 200
    _phase(svc, cifar_jpeg, PEAK_CONNECTIONS, 1.0)  # warm-up: batch sizes and the rate estimate settle
    peak = _phase(svc, cifar_jpeg, PEAK_CONNECTIONS, PEAK_SECONDS)
    storm = _phase(svc, cifar_jpeg, FLOOD_CONNECTIONS, FLOOD_SECONDS)
    # the best rate the forward pass showed, in either phase: smaller batches in one are no excuse; but
    # no more than the service answered without overload, where its HTTP path is the slower part (the
    # Zen 5: 546 answers/s with the forward pass able to do 785 images/s)
    forward = max(peak["images"] / peak["forward_s"], storm["images"] / max(1e-9, storm["forward_s"]))
    capacity = min(forward, peak["ok"] / peak["elapsed"])
    goodput = storm["ok"] / storm["elapsed"]
    report = (
        f"flood of {FLOOD_CONNECTIONS} at a {budget_ms:.0f} ms budget: {storm['ok']:.0f} answered, "
        f"{storm['shed']:.0f} refused in "
        f"{storm['elapsed']:.1f} s = {goodput:.1f}/s, {goodput / capacity:.0%} of the capacity {capacity:.1f}/s "
        f"(the forward pass's {forward:.1f} images/s; reference phase of {PEAK_CONNECTIONS}: "
        f"{peak['ok'] / peak['elapsed']:.1f}/s, mean batch {peak['images'] / peak['batches']:.1f}); flood: mean batch "
        f"{storm['images'] / max(1.0, storm['batches']):.1f}, forward busy {storm['forward_s'] / storm['elapsed']:.0%})"
    )
    print(report)
    assert storm["shed"] > 0, f"the flood did not overload the service: {report}"
    assert goodput >= MIN_SHARE_OF_CAPACITY * capacity, report
    assert svc.client.post("/predict", files=image_file(cifar_jpeg)).status_code == 200
