"""The dynamic batcher in-process, with a fake forward pass that records its batches.

No test waits a fixed time for something to happen: each polls the batcher's state (see
:func:`until`), so a loaded machine makes them slower, never red.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from service.batcher import Batcher


class FakeModel:
    """Records the batch sizes it sees; answers each image with its first pixel value."""

    def __init__(self, block_first: bool = False) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not block_first:
            self.gate.set()
        self.fail_next = False

    def __call__(self, images: list[torch.Tensor]) -> tuple[str, list[int]]:
        self.entered.set()
        self.gate.wait(timeout=30)
        batch = torch.cat(images)
        self.batches.append(int(batch.shape[0]))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return "v1", [int(x) for x in batch[:, 0, 0, 0]]


def images(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown(wait=True)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


async def until(predicate, what: str, guard_s: float = 20.0) -> None:
    """Yield to the event loop until ``predicate()`` holds; ``guard_s`` only guards against a hang."""
    try:
        async with asyncio.timeout(guard_s):
            while not predicate():
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"not seen within the {guard_s:.0f} s guard: {what}") from None


def taken(batcher: Batcher) -> bool:
    """The consumer has taken every queued request into the batch it is forming."""
    return not batcher._queue


def test_an_idle_batcher_runs_at_once_even_with_a_long_max_wait(executor):
    async def main():
        model = FakeModel()
        batcher = Batcher(model, executor, max_size=8, max_wait_s=60.0)
        batcher.start()
        # Nothing else is queued or announced: no waiting for company (the guard is 5 s, max wait 60 s).
        tag, rows = await asyncio.wait_for(batcher.submit(images(7)), timeout=5)
        await batcher.stop()
        return tag, rows, model.batches

    assert run(main()) == ("v1", [7], [1])


def test_requests_queued_during_a_forward_pass_share_the_next(executor):
    async def main():
        model = FakeModel(block_first=True)
        batcher = Batcher(model, executor, max_size=8, max_wait_s=0.0)
        batcher.start()
        first = asyncio.create_task(batcher.submit(images(1)))
        await asyncio.to_thread(model.entered.wait, 10)
        rest = [asyncio.create_task(batcher.submit(images(v))) for v in range(2, 7)]
        await until(lambda: batcher.queued_images == 5, "five requests queued behind the running pass")
        model.gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.stop()
        return results, model.batches

    results, batches = run(main())
    assert batches == [1, 5]
    assert [rows for _, rows in results] == [[1], [2], [3], [4], [5], [6]]  # each request gets its own rows


def test_max_size_and_requests_are_never_split(executor):
    async def main():
        model = FakeModel(block_first=True)
        batcher = Batcher(model, executor, max_size=4, max_wait_s=0.0)
        batcher.start()
        first = asyncio.create_task(batcher.submit(images(0)))
        await asyncio.to_thread(model.entered.wait, 10)
        a = asyncio.create_task(batcher.submit(images(1, 2, 3)))
        b = asyncio.create_task(batcher.submit(images(4, 5)))  # does not fit beside a: next batch
        c = asyncio.create_task(batcher.submit(images(6, 7, 8, 9, 10, 11)))  # larger than max: alone
        await until(lambda: batcher.queued_images == 11, "a, b and c queued behind the running pass")
        model.gate.set()
        results = await asyncio.gather(first, a, b, c)
        await batcher.stop()
        return results, model.batches

    results, batches = run(main())
    assert batches == [1, 3, 2, 6]
    assert [rows for _, rows in results] == [[0], [1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]]


def test_batching_off_gives_each_request_its_own_forward(executor):
    async def main():
        model = FakeModel(block_first=True)
        batcher = Batcher(model, executor, max_size=8, max_wait_s=0.01, enabled=False)
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(images(v))) for v in range(5)]
        await asyncio.to_thread(model.entered.wait, 10)
        model.gate.set()
        results = await asyncio.gather(*tasks)
        await batcher.stop()
        return results, model.batches

    results, batches = run(main())
    assert batches == [1, 1, 1, 1, 1]
    assert [rows for _, rows in results] == [[0], [1], [2], [3], [4]]


def test_announced_requests_are_waited_for(executor):
    async def main():
        model = FakeModel()
        batcher = Batcher(model, executor, max_size=8, max_wait_s=5.0)
        batcher.start()

        decoded = asyncio.Event()

        async def slow_decode(value: int):
            with batcher.expect():
                await decoded.wait()  # still decoding until the test says otherwise
                img = images(value)
            return await batcher.submit(img)

        async def fast(value: int):
            return await batcher.submit(images(value))

        with batcher.expect():  # a request is decoding while the first one arrives
            pending = asyncio.create_task(fast(1))
            await asyncio.sleep(0)
            other = asyncio.create_task(slow_decode(2))
            await asyncio.sleep(0)
        # The first request is in a forming batch, held open for the one still decoding.
        await until(lambda: taken(batcher), "the first request taken into a batch")
        for _ in range(100):
            await asyncio.sleep(0)
        assert batcher.queued_images == 1 and not model.entered.is_set(), "the batch did not wait"
        decoded.set()
        results = await asyncio.gather(pending, other)
        await batcher.stop()
        return results, model.batches

    results, batches = run(main())
    assert batches == [2]
    assert [rows for _, rows in results] == [[1], [2]]


def test_a_failed_forward_fails_its_batch_only(executor):
    async def main():
        model = FakeModel()
        model.fail_next = True
        batcher = Batcher(model, executor, max_size=8, max_wait_s=0.0)
        batcher.start()
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(images(1))
        ok = await batcher.submit(images(2))
        await batcher.stop()
        return ok

    assert run(main()) == ("v1", [2])


def test_stop_fails_waiting_requests(executor):
    from service.batcher import BatcherClosed

    async def main():
        model = FakeModel(block_first=True)
        batcher = Batcher(model, executor, max_size=1, max_wait_s=0.0)
        batcher.start()
        first = asyncio.create_task(batcher.submit(images(1)))
        await asyncio.to_thread(model.entered.wait, 10)
        queued = asyncio.create_task(batcher.submit(images(2)))
        await until(lambda: batcher.queued_images == 1, "the second request queued")
        await batcher.stop()
        model.gate.set()
        for task in (first, queued):
            with pytest.raises(BatcherClosed):
                await task

    run(main())


def test_several_workers_run_batches_side_by_side():
    pool = ThreadPoolExecutor(2)
    both_inside = threading.Barrier(2, timeout=10)

    def run_batch(imgs: list[torch.Tensor]) -> tuple[str, list[int]]:
        both_inside.wait()  # only passes if two forward passes are running at the same time
        return "v1", [int(x) for x in torch.cat(imgs)[:, 0, 0, 0]]

    async def main():
        batcher = Batcher(run_batch, pool, max_size=1, max_wait_s=0.0, workers=2)
        batcher.start()
        results = await asyncio.gather(batcher.submit(images(1)), batcher.submit(images(2)))
        await batcher.stop()
        return results

    try:
        assert run(main()) == [("v1", [1]), ("v1", [2])]
    finally:
        pool.shutdown(wait=True)


def test_after_a_burst_batches_wait_for_the_recent_peak(executor, monkeypatch):
    """After a burst of 3, a lone request waits for company until its batch holds 3 again.

    The remembered peak decays with time (PEAK_HALF_LIFE_S); a long half-life here keeps it
    from decaying while a slow machine runs the test, and max_wait_s is only a guard: the
    batch closes because it reaches the peak, not because time runs out."""
    monkeypatch.setattr("service.batcher.PEAK_HALF_LIFE_S", 3600.0)

    async def main():
        model = FakeModel()
        batcher = Batcher(model, executor, max_size=8, max_wait_s=25.0)
        batcher.start()
        await asyncio.gather(*(batcher.submit(images(v)) for v in range(3)))  # peak demand: 3
        first = asyncio.create_task(batcher.submit(images(7)))
        await until(lambda: taken(batcher), "the lone request taken into a batch")
        for _ in range(100):
            await asyncio.sleep(0)
        assert model.batches == [3], "the lone request ran without waiting for the recent peak"
        second = asyncio.create_task(batcher.submit(images(8)))
        third = asyncio.create_task(batcher.submit(images(9)))
        results = await asyncio.gather(first, second, third)
        await batcher.stop()
        return results, model.batches

    results, batches = run(main())
    assert batches == [3, 3]
    assert [rows for _, rows in results] == [[7], [8], [9]]
