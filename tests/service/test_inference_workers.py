"""INFERENCE_WORKERS in the app as ``create_app`` wires it: the number of forward passes that
really run at once, counted by a spy on the engine's forward pass (no timing is asserted).

The e2e test of this mode (tests/e2e/test_inference_modes.py) can only check that every answer
is right, which one worker gives too."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

#: How long a forward pass waits for a second one to join it: a guard against a hang only (the
#: pass goes on alone after it, and the count of overlapping passes says what happened).
JOIN_GUARD_S = 30.0


class OverlapSpy:
    """Wraps ``Engine.run_batch``: counts the passes inside it at once; a pass waits (up to the
    guard) until ``expected`` passes are inside together, so that an overlap that can happen does."""

    def __init__(self, real, expected: int) -> None:
        self.real, self.expected = real, expected
        self.lock = threading.Lock()
        self.inside = self.most = self.passes = 0
        self.together = threading.Event()
        self.first_inside = threading.Event()

    def __call__(self, engine, images):
        with self.lock:
            self.inside += 1
            self.passes += 1
            self.most = max(self.most, self.inside)
            if self.inside >= self.expected:
                self.together.set()
        self.first_inside.set()
        try:
            if not self.together.wait(JOIN_GUARD_S):
                self.together.set()  # the guard is spent once: no later pass waits for company
            return self.real(engine, images)
        finally:
            with self.lock:
                self.inside -= 1


def test_two_inference_workers_run_two_forward_passes_at_once(app_client, monkeypatch, cifar_jpeg):
    """INFERENCE_WORKERS=2, one image per batch: while a first /predict's forward pass runs, a
    second request gets a pass of its own beside it (a batcher or an executor that ignores the
    setting makes the second wait: at most one pass inside at a time)."""
    from service.engine import Engine

    spy = OverlapSpy(Engine.run_batch, expected=2)
    monkeypatch.setattr(Engine, "run_batch", lambda engine, images: spy(engine, images))
    client = app_client(inference_workers=2, batch_max_size=1, batch_max_wait_ms=0)
    files = {"file": ("cat.jpg", cifar_jpeg, "image/jpeg")}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/predict", files=files)
        assert spy.first_inside.wait(JOIN_GUARD_S), "the first request never reached a forward pass"
        second = pool.submit(client.post, "/predict", files=files)
        answers = [first.result(), second.result()]
    assert spy.most == 2, f"INFERENCE_WORKERS=2, but at most {spy.most} forward pass ran at a time"
    assert spy.passes == 2
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert answers[0].json()["predictions"] == answers[1].json()["predictions"]


def test_one_inference_worker_runs_one_forward_pass_at_a_time(app_client, monkeypatch, cifar_jpeg):
    """The default: passes never overlap (the spy expects one, so nothing waits)."""
    from service.engine import Engine

    spy = OverlapSpy(Engine.run_batch, expected=1)
    monkeypatch.setattr(Engine, "run_batch", lambda engine, images: spy(engine, images))
    client = app_client(inference_workers=1, batch_max_size=1, batch_max_wait_ms=0)
    files = {"file": ("cat.jpg", cifar_jpeg, "image/jpeg")}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: client.post("/predict", files=files), range(4)))
    assert [r.status_code for r in answers] == [200] * 4
    assert spy.passes == 4 and spy.most == 1
