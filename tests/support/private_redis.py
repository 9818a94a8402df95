"""A ``redis-server`` of a test's own: a free port, AOF on, no RDB snapshots, data in tmp.

For the tests that restart Redis, and for those that must not lose a job when another pytest
session starts beside them on the same machine: every session flushes the shared databases
once (tests/support/redisdb.py). Never touches 6379.

``private_redis`` (fixture): a started :class:`PrivateRedis`, killed at the end of the test.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import free_port, wait_for


class PrivateRedis:
    """A ``redis-server`` of the test's own: free port, AOF on, no RDB snapshots, data in ``folder``."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH")
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.folder / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.folder / 'redis.log').read_text()[-2000:]}")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(answers, 20, "the private redis-server", interval=0.05)
        client.close()

    def stop(self) -> None:
        """SIGTERM: Redis fsyncs the AOF and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()
