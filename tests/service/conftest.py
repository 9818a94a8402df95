"""The API (``service``) in-process: the batcher with fake forward passes, and the whole app
(``create_app``) under FastAPI's TestClient, where a test can watch what runs inside it (the
same app over real HTTP, in its own process, is tests/e2e's)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.processes import wait_for


@pytest.fixture
def app_client(smoke_model: tuple[Path, str], redis_url: str) -> Iterator[Callable[..., object]]:
    """Factory: ``app_client(**settings)`` -> a ``TestClient`` over ``create_app(Settings(...))``
    with its lifespan running and the smoke model loaded from its registry, read only (no JIT, no
    warm-up, fp32, one torch thread: quick to load). Every client is closed (lifespan ended)
    after the test."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    clients: list[TestClient] = []

    def start(**overrides: object) -> TestClient:
        fields = {
            "model_registry": smoke_model[0],
            "redis_url": redis_url,
            "jit": False,
            "warmup": False,
            "runtime": "torchscript",
            "torch_threads": 1,
            "decode_threads": 1,
            **overrides,
        }
        client = TestClient(create_app(Settings(**fields)))
        client.__enter__()
        clients.append(client)
        wait_for(lambda: client.get("/readyz").status_code == 200, 120, "the in-process app to load its model", 0.1)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)
