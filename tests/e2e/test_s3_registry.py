"""The registry on S3-compatible storage, end to end, against a real S3 server (the session's
SeaweedFS, tests/support/seaweed.py): a smoke version published into it and promoted by the
training CLI, served by a real uvicorn and explained by a real RQ worker, each reading through a
cache of its own; hot swap on promotion; a corrupt version refused while the served one keeps
answering; the store unreachable at start-up and going away mid-run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shapcore.registry import WEIGHTS, Registry, new_version_id
from tests.support.processes import child_env, free_port, python_module, spawn, wait_for
from tests.support.seaweed import Seaweed
from tests.support.services import RunningService
from tests.support.services import image_file as files
from tests.support.workers import RunningWorker, wait_finished

QUEUE = "explain-s3"
SMALL_JOB = {"segments": "8", "samples": "40"}


@pytest.fixture(scope="module")
def s3_trained(
    seaweed: Seaweed, smoke_model: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, str]:
    """The session's smoke version published into a fresh S3 registry by the code training
    publishes with (:meth:`Registry.publish`, under a new id), promoted by ``python -m training
    promote``: (URL, version). A smoke training of its own would cost minutes on a loaded 2-core
    machine; training's writes to a registry are exactly ``check_writable``, ``publish``, ``promote``."""
    from training.cli import main

    src = Registry(smoke_model[0])
    loaded = src.load(smoke_model[1])
    url = seaweed.new_registry_url()
    with seaweed.environment():
        registry = Registry(url, cache=tmp_path_factory.mktemp("trainer-cache"))
        registry.check_writable()
        version = new_version_id()
        registry.publish(version, loaded.model.net, {**loaded.metadata, "version": version}, loaded.background(),
                         src.history(loaded.version))  # fmt: skip
        assert main(["--registry", url, "promote", version]) == 0
        assert Registry(url).promoted() == version
    return url, version


@pytest.fixture(scope="module")
def s3_stack(
    s3_trained: tuple[str, str],
    seaweed: Seaweed,
    start_service: Callable[..., RunningService],
    start_worker: Callable[..., RunningWorker],
    explain_redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningService, RunningWorker, Path]]:
    """The API (watching PROMOTED) and a worker on the S3 registry, each with a cache of its own:
    (service, worker, the worker's cache)."""
    url, _ = s3_trained
    caches = tmp_path_factory.mktemp("s3-caches")
    common = {**seaweed.env(), "EXPLAIN_QUEUE": QUEUE}
    svc = start_service(registry=url, env={**common, "MODEL_CACHE": str(caches / "api"), "REDIS_URL": explain_redis_url,
                                           "MODEL_WATCH_INTERVAL_S": "0.5", "WARMUP": "false"})  # fmt: skip
    worker = start_worker(url, env={**common, "MODEL_CACHE": str(caches / "worker")})
    yield svc, worker, caches / "worker"
    worker.stop()
    svc.stop()


def _wait_serving(svc: RunningService, version: str, timeout: float = 120) -> float:
    start = time.monotonic()
    wait_for(lambda: svc.client.get("/model").json().get("version") == version, timeout, f"{version} served")
    return time.monotonic() - start


def _publish_copy(url: str, of: str, seaweed: Seaweed, cache: Path) -> str:
    """Another version in the S3 registry: ``of``'s network published under a new id."""
    with seaweed.environment():
        registry = Registry(url, cache=cache)
        loaded = registry.load(of)
        version = new_version_id()
        registry.publish(version, loaded.model.net, {**loaded.metadata, "version": version},
                         loaded.background(), registry.history(of))  # fmt: skip
    return version


def test_published_into_s3_served_explained_and_hot_swapped(s3_trained, s3_stack, seaweed, cifar_jpeg, tmp_path):
    from training.cli import main

    url, first = s3_trained
    svc, _, worker_cache = s3_stack
    assert Registry(url, cache=tmp_path).remote and first in _versions(url, seaweed)
    _wait_serving(svc, first)
    r = svc.client.post("/predict", files=files(cifar_jpeg))
    assert r.status_code == 200 and r.json()["model"]["version"] == first
    job = svc.client.post("/explain", files=files(cifar_jpeg), data={**SMALL_JOB, "seed": "1"}).json()
    done = wait_finished(svc.client, job["status_url"])
    assert done["status"] == "finished" and done["result"]["model_version"] == first, done
    assert (next(worker_cache.glob(f"*/{first}")) / WEIGHTS).is_file()  # the worker's own copy

    # A promotion through the CLI reaches the API's watcher; the worker fetches the new version.
    second = _publish_copy(url, first, seaweed, tmp_path / "writer")
    with seaweed.environment():
        assert main(["--registry", url, "promote", second]) == 0
    took = _wait_serving(svc, second)
    print(f"promotion of {second} served after {took:.1f} s")
    assert svc.client.post("/predict", files=files(cifar_jpeg)).json()["model"]["version"] == second
    job = svc.client.post("/explain", files=files(cifar_jpeg), data={**SMALL_JOB, "seed": "2"}).json()
    done = wait_finished(svc.client, job["status_url"])
    assert done["status"] == "finished" and done["result"]["model_version"] == second, done

    # A version whose weights lost a bit in the store: refused by its sha256, the served one stays.
    third = _publish_copy(url, first, seaweed, tmp_path / "writer")
    seaweed.flip_byte(url, f"{third}/{WEIGHTS}")
    with seaweed.environment():
        assert main(["--registry", url, "promote", third]) == 0
    wait_for(lambda: f"{WEIGHTS} is corrupt" in svc.log_tail(100_000), 120, "the corrupt version refused")
    assert f"version {third}: {WEIGHTS} is corrupt: its sha256" in svc.log_tail(100_000)
    assert svc.client.get("/model").json()["version"] == second
    assert svc.client.post("/predict", files=files(cifar_jpeg)).json()["model"]["version"] == second
    with seaweed.environment():
        assert main(["--registry", url, "promote", second]) == 0


def _versions(url: str, seaweed: Seaweed) -> list[str]:
    with seaweed.environment():
        return Registry(url).versions()


def test_the_store_going_away_mid_run(s3_trained, s3_stack, seaweed, cifar_jpeg):
    url, _ = s3_trained
    svc, _, _ = s3_stack
    served = svc.client.get("/model").json()["version"]
    seaweed.stop()
    try:
        for _ in range(3):
            r = svc.client.post("/predict", files=files(cifar_jpeg))
            assert r.status_code == 200 and r.json()["model"]["version"] == served
        r = svc.client.post("/model/reload")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "registry_unavailable"
        assert f"registry {url}: cannot read PROMOTED" in r.json()["error"]["message"]
        wait_for(lambda: f"promoted-pointer watch: registry {url}: cannot" in svc.log_tail(100_000), 30,
                 "the watcher to report the store")  # fmt: skip
        # the worker explains the served version from its cache (a version never changes)
        job = svc.client.post("/explain", files=files(cifar_jpeg), data={**SMALL_JOB, "seed": "3"}).json()
        done = wait_finished(svc.client, job["status_url"])
        assert done["status"] == "finished" and done["result"]["model_version"] == served, done
        assert svc.client.get("/readyz").status_code == 200
    finally:
        seaweed.start()
    # back: the next reload loads again (SeaweedFS may answer 500 until its volumes re-register)
    wait_for(lambda: svc.client.post("/model/reload", json={"force": True}).status_code == 200, 60, "a reload")
    assert svc.client.get("/model").json()["version"] == served


def test_an_unreachable_store_at_start_up_is_one_clear_line(seaweed, tmp_path):
    """The API and a worker refuse to start (exit status 2) naming the registry and the cause."""
    url = "s3://models/nowhere"
    env = child_env(**{**seaweed.env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
                       "MODEL_REGISTRY": url, "MODEL_CACHE": str(tmp_path / "cache"),
                       "REDIS_URL": "redis://127.0.0.1:1/0", "PORT": str(free_port())})  # fmt: skip
    for module in ("service", "worker"):
        log = tmp_path / f"{module}.log"
        proc = spawn(python_module(module), env, log)
        assert proc.wait(timeout=120) == 2, log.read_text()
        text = log.read_text()
        assert f"error: registry {url}: cannot read PROMOTED: EndpointConnectionError" in text, text
