"""``make run`` / ``scripts/run.sh`` for real: an empty registry gets a first model, an
embedded Redis starts, the API and a worker serve (``/predict`` while the first model's explainer
is still being fitted in the background, ``method=fast`` answering "fitting, about N minutes
left" until the fit ends and the API picks the explainer up), ``scripts/run.sh train`` (``make train``)
promotes a new version that the running API switches to, and Ctrl-C (SIGINT to the
foreground process group, as a terminal sends it) leaves nothing running. The supervisor
restarts a SIGKILLed worker while the API serves on, and stops everything with a non-zero exit
on a crash loop.

The smoke profile on a small archive of real CIFAR-10 images stands in for the cpu
profile's 10 minutes (``TRAIN_PROFILE=smoke``); the venv is the one running the tests.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.services import free_port

ROOT = Path(__file__).resolve().parents[2]
RUN_SH = ROOT / "scripts" / "run.sh"


def tagged_processes(token: str) -> list[tuple[int, str]]:
    """Live processes whose environment carries ``token`` (every descendant of the script)."""
    found = []
    needle = f"SHAPSERVE_RUN_TEST_TOKEN={token}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z":
            found.append((int(entry.name), cmd))
    return found


def run_env(tmp_path: Path, token: str, **extra: str) -> dict[str, str]:
    dropped = ("REDIS_URL", "MODEL_VERSION", "PORT", "HOST", "API_KEYS", "API_KEYS_FILE", "REQUIRE_API_KEYS")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(
        SHAPSERVE_RUN_TEST_TOKEN=token,
        SKIP_INSTALL="1",
        VENV=sys.prefix,
        VAR_DIR=str(tmp_path / "var"),
        PYTHONUNBUFFERED="1",
        TORCH_THREADS="1",
        DECODE_THREADS="1",
        EXPLAIN_TORCH_THREADS="1",
        READY_TIMEOUT_S="240",
    )
    env.update(extra)
    return env


def wait_output(log: Path, proc: subprocess.Popen, pattern: str, timeout: float, start: int = 0) -> re.Match:
    """The first match of ``pattern`` in the output from offset ``start`` on, once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        match = re.compile(pattern).search(text, start)
        if match:
            return match
        if proc.poll() is not None:
            raise AssertionError(f"run.sh exited with {proc.returncode} before {pattern!r}:\n{text[-5000:]}")
        time.sleep(0.3)
    raise AssertionError(f"no {pattern!r} after {timeout:.0f} s:\n{log.read_text(errors='replace')[-5000:]}")


def test_run_trains_serves_switches_and_stops_on_ctrl_c(tmp_path: Path, small_archive: Path, cifar_jpeg: bytes) -> None:
    token = uuid.uuid4().hex
    registry = tmp_path / "registry"
    port = free_port()
    nobody = free_port()  # no Redis answers there: the script must start its own
    env = run_env(
        tmp_path, token, MODEL_REGISTRY=str(registry), PORT=str(port), LOCAL_REDIS_URL=f"redis://127.0.0.1:{nobody}/0",
        TRAIN_PROFILE="smoke", DATA=str(small_archive), MODEL_WATCH_INTERVAL_S="1", EXPLAIN_FIT_MINUTES="1.5",
        EXPLAIN_QUALITY_IMAGES="2", EXPLAIN_QUALITY_SAMPLES="64", EXPLAIN_FAST_MIN_RHO="-1",  # smoke: weak
    )  # fmt: skip
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", str(RUN_SH)], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,  # its own group: a terminal's Ctrl-C reaches all of it
        )  # fmt: skip
    try:
        wait_output(log, proc, r"shapserve is up", 900)  # a loaded 2-core machine: minutes
        text = log.read_text()
        assert f"the model registry {registry} is empty: training a first model (smoke profile" in text
        # the first model's held-out accuracy, and a warning: a smoke model is mostly wrong
        assert re.search(r"held-out accuracy \d+\.\d%, macro F1 0\.\d{3} on \d+ images", text), text[-3000:]
        assert "is low: predictions will often be wrong; `make train` trains the full profile" in text
        assert "fitting its amortised explainer in the background" in text, text[-3000:]
        redis_url = re.search(r"Redis: (redis://127\.0\.0\.1:(\d+)/0) \(embedded", text).group(1)
        base = f"http://127.0.0.1:{port}"
        for line in (f"API      {base}", f"docs     {base}/docs", f"metrics  {base}/metrics"):
            assert line in text
        assert (tmp_path / "var" / "redis" / "appendonlydir").is_dir(), "the embedded Redis keeps an AOF"

        client = httpx.Client(base_url=base, timeout=60)
        first = client.get("/readyz").json()["model"]["version"]
        assert [p.name for p in registry.iterdir() if not p.name.startswith(".") and p.is_dir()] == [first]
        image = {"file": ("cat.jpg", cifar_jpeg, "image/jpeg")}
        # the API serves before the explainer's fit ends: /predict answers, method=fast says it is coming
        assert client.post("/predict", files=image).status_code == 200
        fast = client.post("/explain", files=image, data={"method": "fast"})
        assert "fitted the amortised explainer of" not in log.read_text(), "the fit ended before the API served"
        assert fast.status_code == 409 and fast.json()["error"]["code"] == "explainer_fitting", fast.text
        assert re.search(r"about \d+ minute\(s\) left: `python -m training fit-explainer --version " + first,
                         fast.json()["error"]["message"]), fast.text  # fmt: skip
        # when the fit ends the running API picks the explainer up, its quality figures with it
        wait_output(log, proc, rf"fitted the amortised explainer of {first}: the API picked it up", 300)
        fast = client.post("/explain", files=image, data={"method": "fast"})
        assert fast.status_code == 200, fast.text
        assert fast.json()["result"]["explainer"]["quality"]["reference"]["samples"] == 64
        assert client.get("/model").json()["explainer"]["served"] is True
        assert client.get("/docs").status_code == 200 and client.get("/metrics").status_code == 200
        import redis

        assert redis.Redis.from_url(redis_url).ping()

        # `make train` in another terminal: the running API switches to the promoted version.
        train = subprocess.run(["bash", str(RUN_SH), "train"], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=900)  # fmt: skip
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        second = re.search(r"promoted (\S+): a running API switches", train.stdout).group(1)
        assert second != first and (registry / "PROMOTED").read_text().strip() == second
        deadline = time.monotonic() + 60
        while client.get("/readyz").json()["model"]["version"] != second:
            assert time.monotonic() < deadline, "the API did not switch to the promoted version"
            time.sleep(0.5)
        client.close()
        assert len(tagged_processes(token)) >= 3  # script, worker, API (Redis rewrites its environment block)
        redis_pid = int(re.search(r"\[redis\] .*\bpid=(\d+), just started", text).group(1))
        assert Path(f"/proc/{redis_pid}").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "SIGINT: stopping everything" in text and "[run] stopped: " in text
    deadline = time.monotonic() + 10
    while tagged_processes(token) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tagged_processes(token) == [], "left running after Ctrl-C"
    assert not Path(f"/proc/{redis_pid}").exists(), "the embedded Redis is still running"
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=2)


def test_a_redis_url_that_does_not_answer_stops_at_once(tmp_path: Path) -> None:
    token = uuid.uuid4().hex
    env = run_env(tmp_path, token, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", PORT=str(free_port()))
    proc = subprocess.run(["bash", str(RUN_SH)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "does not answer (unset REDIS_URL to start an embedded Redis)" in proc.stdout
    assert tagged_processes(token) == []


def test_a_port_in_use_is_named(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = run_env(tmp_path, uuid.uuid4().hex, PORT=str(port))
        proc = subprocess.run(["bash", str(RUN_SH)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use: choose another with PORT=..." in proc.stdout


def test_help_lists_the_settings() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "run.py"), "help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for name in ("MODEL_REGISTRY", "DATA", "TRAIN_MINUTES", "TRAIN_PROFILE", "REDIS_URL", "WORKERS", "PORT",
                 "EXPLAIN_FIT_MINUTES"):
        assert f"``{name}``" in proc.stdout


def start_up(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    """``scripts/run.sh`` (up) in a session of its own, its output in ``tmp_path/run.log``."""
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["bash", str(RUN_SH)], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    return proc, log


def stop_up(proc: subprocess.Popen) -> int:
    """Ctrl-C to the script's process group (when it still runs); its exit status."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def started_pids(text: str, name: str) -> list[int]:
    """The PIDs the supervisor said it started ``name`` with, in order."""
    return [int(pid) for pid in re.findall(rf"\[run\] started {name} \(pid (\d+)\)", text)]


def assert_all_gone(token: str, pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while tagged_processes(token) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tagged_processes(token) == [], "left running"
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} is still there"


def rq_workers(redis_url: str) -> dict[int, object]:
    """The RQ workers registered on the explain queue, by PID (their names end in -<pid>)."""
    import redis
    from rq import Worker

    conn = redis.Redis.from_url(redis_url)
    return {int(w.name.rsplit("-", 1)[1]): w for w in Worker.all(connection=conn)}


class ReadyzPoller(threading.Thread):
    """Polls GET /readyz until stopped, recording every answer (None: no answer)."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base, self.answers, self.halt = base, [], threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as client:
            while not self.halt.is_set():
                try:
                    self.answers.append(client.get("/readyz").status_code)
                except httpx.HTTPError:
                    self.answers.append(None)
                self.halt.wait(0.2)

    def stop(self) -> list[int | None]:
        self.halt.set()
        self.join(timeout=30)
        return self.answers


def test_a_killed_worker_is_restarted_while_the_api_serves_on(
    tmp_path: Path, smoke_model: tuple[Path, str], redis_url: str, cifar_jpeg: bytes
) -> None:
    from rq.job import Job

    registry, _ = smoke_model
    token, port = uuid.uuid4().hex, free_port()
    env = run_env(tmp_path, token, MODEL_REGISTRY=str(registry), PORT=str(port), REDIS_URL=redis_url)
    proc, log = start_up(tmp_path, env)
    base = f"http://127.0.0.1:{port}"
    pids: list[int] = []
    try:
        wait_output(log, proc, r"shapserve is up", 300)
        text = log.read_text()
        (old,), (api,) = started_pids(text, "worker"), started_pids(text, "api")
        pids += [old, api]
        assert old in rq_workers(redis_url) and old in [pid for pid, _ in tagged_processes(token)]

        poller = ReadyzPoller(base)
        poller.start()
        os.kill(old, signal.SIGKILL)
        # Post once the supervisor has seen the death (so has Redis, the dead worker's connection
        # closed): posted at once, the job could still be served to the dying worker's blocking
        # dequeue and sit abandoned until the reclaim, 60 s later.
        restarted = wait_output(log, proc, rf"\[run\] worker \(pid {old}\) ended: SIGKILL after [\d.]+ s; "
                                           r"restarting it in 1 s \(restart 1,", 60)  # fmt: skip
        client = httpx.Client(base_url=base, timeout=60)
        files = {"file": ("cat.jpg", cifar_jpeg, "image/jpeg")}
        r = client.post("/explain", files=files, data={"segments": "12", "samples": "60", "seed": "7"})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        new = wait_output(log, proc, r"\[run\] started worker \(pid (\d+)\)", 60, start=restarted.end())
        new = int(new.group(1))
        pids.append(new)
        deadline = time.monotonic() + 240
        while (status := client.get(f"/explain/{job_id}").json()["status"]) != "finished":
            assert status in ("queued", "started") and time.monotonic() < deadline, status
            assert proc.poll() is None
            time.sleep(0.5)
        answers = poller.stop()
        client.close()

        workers = rq_workers(redis_url)
        assert new != old and new in workers, "the new worker registered in RQ"
        job = Job.fetch(job_id, connection=workers[new].connection)
        assert job.worker_name == workers[new].name, "the new worker ran the job"
        assert job.enqueued_at < workers[new].birth_date, "the job was queued before the new worker was born"
        assert len(answers) >= 2 and set(answers) == {200}, answers
        assert started_pids(log.read_text(), "api") == [api] and Path(f"/proc/{api}").exists(), "the API kept running"
    finally:
        code = stop_up(proc)
    assert code == 0, log.read_text()[-3000:]
    assert_all_gone(token, pids)


def test_a_crash_loop_stops_everything_with_an_error(
    tmp_path: Path, smoke_model: tuple[Path, str], redis_url: str
) -> None:
    registry, _ = smoke_model
    token = uuid.uuid4().hex
    # A real misconfiguration: the API refuses to start (exit status 2) without keys, every time.
    env = run_env(tmp_path, token, MODEL_REGISTRY=str(registry), PORT=str(free_port()), REDIS_URL=redis_url,
                  REQUIRE_API_KEYS="true", RESTART_DELAY_S="0.5", RESTART_LIMIT="2")  # fmt: skip
    proc, log = start_up(tmp_path, env)
    try:
        code = proc.wait(timeout=300)
    finally:
        stop_up(proc)
    text = log.read_text()
    assert code == 1, text[-3000:]
    api = started_pids(text, "api")
    assert len(api) == 3, text[-3000:]
    for pid, delay, n in ((api[0], "0.5", 1), (api[1], "1", 2)):
        assert re.search(rf"\[run\] api \(pid {pid}\) ended: exit 2 after [\d.]+ s; restarting it in {delay} s "
                         rf"\(restart {n}, at most 2 within 300 s\)", text), text[-3000:]  # fmt: skip
    assert re.search(rf"\[run\] error: api is in a crash loop: it ended \(exit 2, pid {api[2]}, after [\d.]+ s\) "
                     r"after 2 restart\(s\) within 300 s; stopping everything", text), text[-3000:]  # fmt: skip
    assert "[run] stopped: " in text
    assert_all_gone(token, [*api, *started_pids(text, "worker")])
