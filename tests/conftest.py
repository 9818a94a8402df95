"""Shared fixtures: real images, a smoke model trained once per session, the real Redis, and
the processes every folder may start (services, workers, private Redis servers).

The real CIFAR-10 training archive (../shared/data/cifar10/train.tar.gz, or
$SHAPSERVE_TEST_DATA) is read at run time; a small archive of real images is cut from it
once per session so that tests stay fast.

The layout mirrors the code: ``tests/shapcore``, ``tests/service``, ``tests/worker``,
``tests/training`` (in-process tests of each package, each folder with its own conftest.py),
``tests/e2e`` (real uvicorn services, RQ workers and Redis over HTTP), and at the top the checks
of the repository as a whole (code shape, deployment files, this layout). The helpers are plain
modules under ``tests/support`` (imported, never loaded as plugins); the fixtures among them
are registered here, once.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import tarfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = Path(
    os.environ.get("SHAPSERVE_TEST_DATA", ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz")
).resolve()
PER_CLASS = 30


#: Inherited by every process the session starts (services and workers copy os.environ), so
#: that one re-parented to init when its parent died is still recognised as this session's.
SESSION_MARKER = "SHAPSERVE_TEST_SESSION"
#: How long processes still exiting at the session's end (a worker's horse) may take to go.
LEAK_GRACE_S = 10.0


def pytest_configure(config: pytest.Config) -> None:
    # Keep the dataset cache of the test session out of the user's home.
    cache = Path(config.rootpath) / ".pytest_cache" / "shapserve-cache"
    os.environ.setdefault("SHAPSERVE_CACHE", str(cache))
    os.environ[SESSION_MARKER] = uuid.uuid4().hex


def _stat(pid: str) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _carries_marker(pid: str, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def leftover_processes() -> dict[int, str]:
    """Live (not zombie) descendants of this pytest process, and any process carrying this
    session's marker (an orphan): {pid: command line}."""
    me = os.getpid()
    marker = f"{SESSION_MARKER}={os.environ.get(SESSION_MARKER, '')}".encode()
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(entry.name)) and st[0] != "Z":
            parents[int(entry.name)] = st[1]
    out: dict[int, str] = {}
    for pid, ppid in parents.items():
        chain, seen = ppid, set()
        while chain not in (0, 1, me) and chain in parents and chain not in seen:
            seen.add(chain)
            chain = parents[chain]
        if pid != me and (chain == me or _carries_marker(str(pid), marker)):
            try:
                out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return out


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a process started by a test or fixture outlives the session (every
    fixture must stop what it starts); the leftovers are listed, then killed."""
    deadline = time.monotonic() + LEAK_GRACE_S
    while (left := leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)  # polls for processes still on their way out
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"  pid {pid}: {cmd[:200]}" for pid, cmd in sorted(left.items())]
    message = "processes left running after the test session (a fixture does not stop them):\n" + "\n".join(lines)
    if reporter is not None:
        reporter.write_line(message, red=True)
    else:
        print(message)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


# The fixtures of tests/support, registered once for every folder: the suite's Redis databases
# and private servers, the running service (`python -m service`) and workers (`python -m worker`).
from tests.support.private_redis import private_redis  # noqa: E402, F401
from tests.support.redisdb import explain_redis_url, redis_url  # noqa: E402, F401
from tests.support.seaweed import s3_env, seaweed  # noqa: E402, F401
from tests.support.services import odd_images, own_service, service, service_registry, start_service  # noqa: E402, F401
from tests.support.workers import start_worker  # noqa: E402, F401
