"""Asyncio dynamic batcher: concurrent requests share one forward pass.

One consumer task takes everything queued (up to ``max_size`` images) and hands it to the
inference executor, so the event loop never runs torch. With ``workers=1`` (the default)
forward passes never overlap: while one runs, new requests queue up and form the next
batch, so under load batches grow by themselves without any added wait. With
``workers=N`` up to N batches run at once (each on its own executor thread), a batch
being formed as soon as a worker is free.

Waiting is the exception, and bounded by ``max_wait_s``. A batch waits (1) for requests
known to be decoding right now (see :meth:`Batcher.expect`), and (2) until it holds as many
images as the service recently had in flight at its peak (decaying with a half-life of
``PEAK_HALF_LIFE_S``): with C clients in a closed loop, the half that was just answered
comes back within a millisecond or two, and one batch of C beats two of C/2 on a CPU.
A request that finds nothing else in flight, with no recent load, runs at once: an idle
service adds no latency.

With ``enabled=False`` every request gets a forward pass of its own (the baseline).
A request's images always travel in one batch, so they are all answered by one model version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from service import metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Half-life of the remembered peak demand that batches wait for (see Batcher._target).
PEAK_HALF_LIFE_S = 0.5
#: Weight of the newest forward pass in the images/s estimate behind :meth:`Batcher.expected_wait_s`.
RATE_WEIGHT = 0.2
#: run(list of uint8 (n_i, 3, H, W) tensors) -> (tag, one result row per image, in order).
RunBatch = Callable[[list[torch.Tensor]], tuple[T, list[Any]]]


@dataclass
class _Item:
    images: torch.Tensor
    future: asyncio.Future
    enqueued: float
    count: int = field(init=False)

    def __post_init__(self) -> None:
        self.count = int(self.images.shape[0])


class BatcherClosed(RuntimeError):
    """The batcher is shutting down."""


class Batcher(Generic[T]):
    def __init__(
        self,
        run: RunBatch[T],
        executor: Executor,
        *,
        max_size: int = 32,
        max_wait_s: float = 0.002,
        enabled: bool = True,
        workers: int = 1,
    ) -> None:
        self._run = run
        self._executor = executor
        self.max_size = max(1, int(max_size))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.enabled = enabled
        self._queue: deque[_Item] = deque()
        self._queued_images = 0
        self._incoming = 0
        self._wakeup: asyncio.Event | None = None
        self.workers = max(1, int(workers))
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._running_images = 0
        self._peak = 0.0
        self._peak_at = 0.0
        self._slots: asyncio.Semaphore | None = None
        self._closed = False
        self._rate: float | None = None  # images/s of one forward-pass worker, recent batches weighted most

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        self._task = asyncio.get_running_loop().create_task(self._consume(), name="batcher")

    async def stop(self) -> None:
        self._closed = True
        for task in [self._task, *self._running]:
            if task is not None:
                task.cancel()
        for task in [self._task, *self._running]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(BatcherClosed("the service is shutting down"))
        self._set_depth(0)

    # -- producers -----------------------------------------------------------------
    @contextlib.contextmanager
    def expect(self, images: int = 1) -> Iterator[None]:
        """Announce ``images`` that are being decoded and will be submitted shortly."""
        self._incoming += images
        try:
            yield
        finally:
            self._incoming -= images
            if self._wakeup is not None:
                self._wakeup.set()

    async def submit(self, images: torch.Tensor) -> tuple[T, list[Any]]:
        """Queue uint8 images (n, 3, H, W); returns (tag, one result row per image)."""
        if self._closed or self._task is None:
            raise BatcherClosed("the batcher is not running")
        loop = asyncio.get_running_loop()
        item = _Item(images, loop.create_future(), loop.time())
        self._queue.append(item)
        self._set_depth(self._queued_images + item.count)
        self._note_demand(item.enqueued)
        self._wakeup.set()
        return await item.future

    def _note_demand(self, now: float) -> None:
        """Track the recent peak of images in the service (queued, decoding or in a forward pass)."""
        active = self._queued_images + self._incoming + self._running_images
        self._peak = max(self._decayed_peak(now), float(active))
        self._peak_at = now

    def _decayed_peak(self, now: float) -> float:
        return self._peak * 0.5 ** (max(0.0, now - self._peak_at) / PEAK_HALF_LIFE_S)

    def _target(self, now: float) -> int:
        """How many images a batch waits for: the recent peak demand (1 when idle), at most max_size."""
        return max(1, min(self.max_size, int(self._decayed_peak(now) / self.workers + 1e-9)))

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def queue_wait_s(self, admitted: int = 0) -> float | None:
        """Seconds a request arriving now would wait before its own forward pass: the images
        ahead of it (queued, being decoded, in a forward pass; at least ``admitted``, the
        requests let in that the batcher may not have seen yet) at the images/s of recent
        forward passes; 0 on an idle service, None before the first forward pass."""
        if not self._rate:
            return None
        ahead = max(admitted, self._queued_images + self._incoming + self._running_images)
        return ahead / (self._rate * self.workers)

    def answer_eta_s(self, admitted: int = 0) -> float | None:
        """Seconds until a request arriving now would have its answer: the work ahead of it
        (:meth:`queue_wait_s`) plus its own batch on one forward-pass worker, counted as big as
        the queue it joins (the images waiting to start, and itself; at most a full batch); 0
        when nothing is ahead (an idle service), None before the first forward pass.

        The overload gate admits by this figure rather than by the wait alone (issue 27): admitted
        at ``wait <= budget``, a request still waited for its own batch after the budget, and the
        2xx p99 went past budget + one batch by the decode and HTTP time. Under overload the queue
        is deep and its own batch a full one, which leaves that batch as the margin for the
        estimate's error; below it the batch is small, so that a slow model (224 px on a CPU,
        a loaded machine) whose full batch alone takes the budget still admits concurrent requests."""
        wait = self.queue_wait_s(admitted)
        if not wait or self._rate is None:
            return wait
        own = min(self.max_size, self._queued_images + self._incoming + 1)
        return wait + own / self._rate

    def _note_rate(self, images: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate = images / seconds
        self._rate = rate if self._rate is None else (1 - RATE_WEIGHT) * self._rate + RATE_WEIGHT * rate

    # -- consumer ------------------------------------------------------------------
    def _set_depth(self, value: int) -> None:
        self._queued_images = value
        metrics.QUEUE_DEPTH.set(value)

    def _take(self, batch: list[_Item], size: int) -> int:
        """Move queued items into ``batch`` while they fit in ``max_size``."""
        while self._queue and (not batch or size + self._queue[0].count <= self.max_size):
            item = self._queue.popleft()
            batch.append(item)
            size += item.count
            if not self.enabled:
                break
        return size

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        wakeup = self._wakeup
        while True:
            await self._slots.acquire()  # a forward-pass worker is free
            try:
                while not self._queue:
                    wakeup.clear()
                    await wakeup.wait()
                batch: list[_Item] = []
                size = self._take(batch, 0)
                now = loop.time()
                target = self._target(now)
                if (
                    self.enabled
                    and self.max_wait_s > 0
                    and size < self.max_size
                    and (self._incoming > 0 or size < target)
                ):
                    deadline = now + self.max_wait_s
                    while size < self.max_size and (self._incoming > 0 or size < target):
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            break
                        wakeup.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(remaining):  # no extra task, unlike wait_for
                                await wakeup.wait()
                        size = self._take(batch, size)
            except BaseException:
                self._slots.release()
                raise
            self._set_depth(max(0, self._queued_images - size))
            now = loop.time()
            for item in batch:
                metrics.QUEUE_WAIT.observe(now - item.enqueued)
            task = loop.create_task(self._forward(batch, size))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _forward(self, batch: list[_Item], size: int) -> None:
        loop = asyncio.get_running_loop()
        self._running_images += size
        started = loop.time()
        try:
            tag, rows = await loop.run_in_executor(self._executor, self._run, [it.images for it in batch])
            self._note_rate(size, loop.time() - started)
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatcherClosed("the service is shutting down"))
            raise
        except Exception as exc:
            log.exception("forward pass of %d image(s) failed", size)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self._running_images -= size
            self._slots.release()
        start = 0
        for item in batch:
            if not item.future.done():  # the client may have gone away
                item.future.set_result((tag, rows[start : start + item.count]))
            start += item.count
