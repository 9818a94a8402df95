"""What every process-starting fixture shares (no fixtures here): a free port, a wait loop,
``python -m <module>`` started with its output in a log file, and its stop.

The service (:mod:`tests.support.services`), the worker (:mod:`tests.support.workers`) and the
private ``redis-server`` (:mod:`tests.support.redisdb`) are all started and stopped through these.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: The repository's root (the working directory of every process the suite starts).
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.25) -> object:
    """``predicate()``'s first truthy value, polled every ``interval`` s; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """``args`` started in the repository's root, stdout and stderr into ``log_path``."""
    with log_path.open("wb") as log_file:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)


def python_module(module: str) -> list[str]:
    """The command line of ``python -m module`` with this interpreter."""
    return [sys.executable, "-m", module]


def child_env(**overrides: str) -> dict[str, str]:
    """This process's environment (the session marker included, see tests/conftest.py) with
    unbuffered output, no pinned MODEL_VERSION, and ``overrides``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MODEL_VERSION", None)
    env.update(overrides)
    return env


@dataclass
class RunningProcess:
    """A subprocess started by a fixture, its environment and the file its output goes to."""

    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """``sig``, then SIGKILL if it is still running after ``timeout`` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
