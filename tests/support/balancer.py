"""HAProxy in front of API replicas, and a steady load through it (no tests here).

``start_balancer(replicas, log_path)``  ``haproxy -db`` with deploy/haproxy/haproxy.cfg as it is
                                        (the addresses through its environment variables) on free
                                        ports; a :class:`RunningBalancer`.
``SteadyLoad``                          threads that each send ``POST /predict`` through the
                                        balancer one after another, every request recorded
                                        (:class:`Sent`) with a unique ``X-Request-ID``, so that a
                                        client-side failure can be matched with the balancer's
                                        log line that says why it failed.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support.processes import ROOT, RunningProcess, free_port, wait_for

HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
#: One request's line in the balancer's log (the config's ``log-format``).
REQUEST_LINE = re.compile(
    r"req=(?P<req>\S*) status=(?P<status>-?\d+) term=(?P<term>\S+) server=(?P<backend>[^/\s]+)/(?P<server>\S+) "
    r"retries=(?P<retries>\+?\d+)"
)


def haproxy_binary() -> str:
    binary = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None
    )
    if binary is None:
        pytest.fail("haproxy is not installed (Debian's package; .ci/run installs it)")
    return binary


@dataclass(frozen=True)
class LogLine:
    """What the balancer logged of one request."""

    request_id: str
    status: int
    termination: str  # %tsc: two letters that say who ended the session and at which stage
    server: str
    retries: str  # %rc: retries made; a leading "+" when the request was redispatched


@dataclass
class RunningBalancer(RunningProcess):
    """A running ``haproxy -db`` and its ports."""

    port: int = 0
    stats_port: int = 0
    servers: dict[str, str] = field(default_factory=dict)  # name in the config -> replica URL

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def server_states(self) -> dict[str, dict[str, str]]:
        """The stats CSV's rows of the replicas: {server name: {status, check_status, ...}}."""
        text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {r["svname"]: r for r in rows if r["pxname"] == "replicas" and r["svname"] in self.servers}

    def wait_status(self, server: str, status: str, timeout: float = 60) -> dict[str, str]:
        """Wait until the balancer's health check puts ``server`` in ``status`` (UP, DOWN)."""

        def reached() -> dict[str, str] | None:
            row = self.server_states()[server]
            return row if row["status"] == status else None

        return wait_for(reached, timeout, f"the balancer to see {server} {status}", interval=0.1)

    def request_lines(self) -> dict[str, LogLine]:
        """Every request the balancer logged, by its X-Request-ID."""
        out = {}
        for m in REQUEST_LINE.finditer(self.log_tail(10_000_000)):
            out[m["req"]] = LogLine(m["req"], int(m["status"]), m["term"], m["server"], m["retries"])
        return out

    def stop(self) -> None:
        self.terminate(signal.SIGTERM, timeout=10)


def start_balancer(replicas: dict[str, str], log_path: Path) -> RunningBalancer:
    """HAProxy over ``replicas`` ({"api1": url, "api2": url}, the config's server names)."""
    binary = haproxy_binary()
    port, stats_port = free_port(), free_port()
    env = {
        "PATH": "/usr/sbin:/usr/bin:/bin",
        "SHAPSERVE_LB_BIND": f"127.0.0.1:{port}",
        "SHAPSERVE_LB_STATS": f"127.0.0.1:{stats_port}",
        **{f"SHAPSERVE_API_{name.removeprefix('api')}": url.removeprefix("http://") for name, url in replicas.items()},
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, "-db", "-f", str(HAPROXY_CFG)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    lb = RunningBalancer(proc=proc, log_path=log_path, env=env, port=port, stats_port=stats_port, servers=replicas)

    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {proc.returncode}:\n{lb.log_tail()}")
        try:
            return httpx.get(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, 20, "haproxy to listen", interval=0.1)
    return lb


@dataclass
class Sent:
    """One request of the load: when it was sent and ended (monotonic), and how it ended."""

    request_id: str
    started: float
    ended: float = 0.0
    status: int | None = None  # None: no HTTP answer at all
    error: str = ""  # the client-side exception, or the body of a non-2xx answer


class SteadyLoad:
    """``clients`` threads, each sending ``POST /predict`` to ``url`` as soon as its last answer is in."""

    def __init__(self, url: str, image: bytes, clients: int = 3) -> None:
        self.url, self.image, self.clients = url, image, clients
        self.sent: list[Sent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, client: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            n = 0
            while not self._stop.is_set():
                n += 1
                record = Sent(f"c{client}-{n}", time.monotonic())
                with self._lock:
                    self.sent.append(record)
                try:
                    r = http.post(
                        "/predict",
                        files={"file": ("cat.jpg", self.image, "image/jpeg")},
                        headers={"X-Request-ID": record.request_id},
                    )
                    record.status = r.status_code
                    if not 200 <= r.status_code < 300:
                        record.error = r.text[:200]
                except httpx.HTTPError as exc:
                    record.error = f"{type(exc).__name__}: {exc}"
                record.ended = time.monotonic()

    def __enter__(self) -> SteadyLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)

    def count(self) -> int:
        with self._lock:
            return len(self.sent)

    def wait_more(self, n: int, timeout: float = 120) -> None:
        """Wait until ``n`` more requests than now have been answered."""
        target = self.answered() + n
        wait_for(lambda: self.answered() >= target, timeout, f"{n} more answers", interval=0.05)

    def answered(self) -> int:
        with self._lock:
            return sum(1 for s in self.sent if s.ended)
