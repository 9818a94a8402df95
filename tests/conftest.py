"""Shared fixtures: real images, a smoke model trained once per session, the real Redis.

The real CIFAR-10 training archive (../shared/data/cifar10/train.tar.gz, or
$SHAPSERVE_TEST_DATA) is read at run time; a small archive of real images is cut from it
once per session so that tests stay fast.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = Path(
    os.environ.get("SHAPSERVE_TEST_DATA", ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz")
).resolve()
PER_CLASS = 30
TEST_REDIS_URL = os.environ.get("SHAPSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


def pytest_configure(config: pytest.Config) -> None:
    # Keep the dataset cache of the test session out of the user's home.
    cache = Path(config.rootpath) / ".pytest_cache" / "shapserve-cache"
    os.environ.setdefault("SHAPSERVE_CACHE", str(cache))


def cut_archive(src: Path, dest: Path, per_class: int, split: str = "train", skip: int = 0) -> Path:
    """Copy ``per_class`` images of each class from ``src`` into a new archive, after its first ``skip``."""
    counts: dict[str, int] = {}
    skipped: dict[str, int] = {}
    with tarfile.open(src, "r|*") as tin, tarfile.open(dest, "w:gz") as tout:
        for member in tin:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3:
                continue
            cls = parts[1]
            if skipped.get(cls, 0) < skip:
                skipped[cls] = skipped.get(cls, 0) + 1
                continue
            if counts.get(cls, 0) >= per_class:
                continue
            data = tin.extractfile(member).read()
            info = tarfile.TarInfo(f"{split}/{cls}/{parts[2]}")
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
            counts[cls] = counts.get(cls, 0) + 1
    return dest


@pytest.fixture(scope="session")
def shared_archive() -> Path:
    if not SHARED_ARCHIVE.is_file():
        pytest.fail(f"the real CIFAR-10 archive is missing: {SHARED_ARCHIVE} (set SHAPSERVE_TEST_DATA)")
    return SHARED_ARCHIVE


@pytest.fixture(scope="session")
def small_archive(shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/<class>/<image>: 30 real CIFAR-10 JPEGs per class (300 in all)."""
    return cut_archive(shared_archive, tmp_path_factory.mktemp("data") / "small.tar.gz", PER_CLASS)


@pytest.fixture(scope="session")
def small_test_archive(shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test/<class>/<image>: 10 real CIFAR-10 JPEGs per class that ``small_archive`` does not hold
    (the ones after its first PER_CLASS), so that evaluation sees held-out images."""
    dest = tmp_path_factory.mktemp("data") / "test.tar.gz"
    return cut_archive(shared_archive, dest, 10, split="test", skip=PER_CLASS)


@pytest.fixture(scope="session")
def smoke_model(small_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A registry holding one smoke-profile version (promoted): (registry path, version)."""
    from training.cli import main

    registry = tmp_path_factory.mktemp("registry")
    code = main(["--quiet", "--registry", str(registry), "train", "--data", str(small_archive),
                 "--profile", "smoke", "--promote"])
    assert code == 0
    from shapcore.registry import Registry

    reg = Registry(registry)
    return registry, reg.promoted()


@pytest.fixture(scope="session")
def cifar_jpeg(shared_archive: Path) -> bytes:
    """One real 32x32 CIFAR-10 JPEG (a cat)."""
    with tarfile.open(shared_archive, "r|*") as tar:
        for member in tar:
            if member.isfile() and "/cat/" in member.name:
                return tar.extractfile(member).read()
    raise AssertionError("no cat in the archive")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis at 127.0.0.1:6379, on a database number of the tests' own (flushed)."""
    import redis

    conn = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        conn.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {TEST_REDIS_URL}: {exc}")
    conn.flushdb()
    return TEST_REDIS_URL


# The running-service fixtures (`python -m service` in a subprocess): see tests/service_fixtures.py.
from service_fixtures import odd_images, service, service_registry, start_service  # noqa: E402, F401
