#!/usr/bin/env python
"""Soak: POST /predict and POST /explain together, above capacity, for a bounded time, with memory watched.

Reproduction (the 10-minute figures of BENCHMARKS.md; a quiet machine, nothing else running):

    .venv/bin/pip install -e '.[bench]'     # aiohttp: a client light enough to keep its schedule
    .venv/bin/python bench/soak.py --registry models --label cpu-10min

That starts a private redis-server (unless --redis-url), `python -m service` and one
`python -m worker` with their default settings (--env adds KEY=VALUE settings to both), all on
127.0.0.1. To load running processes instead, attach to them (loopback only):

    .venv/bin/python bench/soak.py --url http://127.0.0.1:8000 --api-pid PID --worker-pid PID

Phases:
1. capacity, unless both rates are given: /predict closed-loop at --capacity-concurrency for
   --capacity-s (answers per second), then --capacity-jobs explanation jobs submitted at once
   (jobs finished per second by the worker);
2. warm-up (--warmup-s) at the soak rates, not recorded;
3. the soak (--duration-s, default 600): open loop at --predict-rate and --explain-rate
   (default: twice each measured capacity). Every request leaves on its own schedule, whether
   or not earlier ones were answered, up to --max-in-flight outstanding (beyond: counted as
   shed by the client, not sent). Every /explain uses a new seed, so each accepted one is a job;
4. drain: every accepted job is followed until it ends (at most --drain-s).

The client is aiohttp when installed, else httpx (several times more CPU per request): the
summary says when the client fell behind its own schedule, i.e. the offered rate was not reached.

Recorded: answers by endpoint and status; served (2xx); refusals (429, 503); other 5xx (goal 0);
transport errors and client timeouts (goal 0); /predict p50/p95/p99 latency; explain jobs
accepted, finished, failed, unknown to the API ("lost", goal 0), still pending after the drain
(goal 0); RSS at the start and end of the soak for the API, the worker's parent and its work
horse (the peak seen in the first and the last fifth), growth (goal under 10 %); CPU used.
The JSON goes to --out (bench/results/soak-<label>-<time>.json); a summary is printed. Exit
status 0 when every goal is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from load_predict import first_cat, free_port, multipart, percentile  # noqa: E402

#: Goal on RSS growth between the start and the end of the soak.
RSS_GROWTH_GOAL = 0.10


# -- processes --------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and of its children that have ended (a worker's finished horses)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@dataclass
class Started:
    """Processes this run started (stopped at the end) and where their logs go."""

    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    temp: Path | None = None

    def stop(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT if name == "api" else signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)


def start_stack(args: argparse.Namespace, started: Started) -> tuple[str, int, int]:
    """Redis (private unless --redis-url), the API and one worker: (url, api pid, worker pid)."""
    import httpx

    args.logs.mkdir(parents=True, exist_ok=True)
    redis_url = args.redis_url
    if redis_url is None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not on PATH: pass --redis-url")
        started.temp = Path(tempfile.mkdtemp(prefix="shapserve-soak-redis-"))
        port = free_port()
        redis_proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(started.temp),
                "--logfile",
                str(args.logs / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        started.procs.append(("redis", redis_proc))
        redis_url = f"redis://127.0.0.1:{port}/0"
    api_port = free_port()
    env = {
        **os.environ,
        "MODEL_REGISTRY": str(args.registry),
        "REDIS_URL": redis_url,
        "EXPLAIN_QUEUE": args.queue,
        "HOST": "127.0.0.1",
        "PORT": str(api_port),
        "PYTHONUNBUFFERED": "1",
    }
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    with (args.logs / "api.log").open("wb") as log:
        api = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    started.procs.append(("api", api))
    with (args.logs / "worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    started.procs.append(("worker", worker))
    url = f"http://127.0.0.1:{api_port}"
    deadline = time.monotonic() + 300
    ready = listening = False
    while not (ready and listening):
        for name, proc in started.procs:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}: see {args.logs}/{name}.log")
        if time.monotonic() > deadline:
            raise SystemExit(f"the API or the worker did not start in 300 s: see {args.logs}")
        with contextlib.suppress(httpx.HTTPError):
            ready = ready or httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        listening = listening or "Listening on" in (args.logs / "worker.log").read_text(errors="replace")
        time.sleep(0.5)
    return url, api.pid, worker.pid


# -- load ----------------------------------------------------------------------------------------------


@dataclass
class Tally:
    answers: Counter = field(default_factory=Counter)  # (endpoint, status or error kind) -> count
    shed: Counter = field(default_factory=Counter)  # endpoint -> requests not sent (in-flight cap)
    predict_ms: list[float] = field(default_factory=list)  # answered 200
    jobs: list[str] = field(default_factory=list)  # accepted explanation jobs
    in_flight: int = 0
    #: endpoint -> how late the last request left, seconds: over ~1 s the client could not keep
    #: its schedule (a busy machine) and the offered rate was not reached.
    send_lag_s: dict[str, float] = field(default_factory=dict)


class ClientTimeout(Exception):
    """No answer within --timeout."""


class TransportError(Exception):
    """Connection refused or reset, protocol error: no HTTP answer at all."""


class HttpClient:
    """aiohttp when installed (``pip install -e '.[bench]'``: several times less CPU per request
    than httpx, so the client is less often the bottleneck), else httpx."""

    def __init__(self, url: str, connections: int, timeout: float, prefer: str = "auto") -> None:
        self.url = url
        aiohttp = None
        if prefer in ("auto", "aiohttp"):
            try:
                import aiohttp
            except ModuleNotFoundError:
                if prefer == "aiohttp":
                    raise SystemExit("--client aiohttp: aiohttp is not installed (pip install -e '.[bench]')") from None
        self.kind = "aiohttp" if aiohttp else "httpx"
        if aiohttp:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=connections), timeout=aiohttp.ClientTimeout(total=timeout)
            )
        else:
            import httpx

            limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
            self._session = httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits)

    async def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, params: dict | None = None
    ) -> tuple[int, bytes]:
        """(status, body); raises :class:`ClientTimeout` or :class:`TransportError`."""
        if self.kind == "aiohttp":
            import aiohttp

            try:
                async with self._session.request(
                    method, self.url + path, data=body, headers=headers, params=params
                ) as resp:
                    return resp.status, await resp.read()
            except TimeoutError:
                raise ClientTimeout() from None
            except aiohttp.ClientError as exc:
                raise TransportError(type(exc).__name__) from None
        import httpx

        try:
            resp = await self._session.request(method, path, content=body, headers=headers, params=params)
        except httpx.TimeoutException:
            raise ClientTimeout() from None
        except httpx.HTTPError as exc:
            raise TransportError(type(exc).__name__) from None
        return resp.status_code, resp.content

    async def close(self) -> None:
        await (self._session.close() if self.kind == "aiohttp" else self._session.aclose())


class Load:
    """The requests: /predict's multipart body built once, /explain's with a new seed each time
    (its parameters are form fields beside the file)."""

    def __init__(self, client: HttpClient, image: bytes, filename: str, explain_params: dict[str, str]) -> None:
        self.client = client
        self.image, self.filename = image, filename
        self.body, ctype = multipart(image, filename)
        self.headers = {"content-type": ctype}
        self.explain_params = explain_params
        self.seed = random.SystemRandom().randrange(2**31)

    async def send(self, endpoint: str, tally: Tally) -> None:
        tally.in_flight += 1
        body, headers = self.body, self.headers
        if endpoint == "explain":
            self.seed = (self.seed + 1) % 2**32
            body, ctype = multipart(self.image, self.filename, {**self.explain_params, "seed": str(self.seed)})
            headers = {"content-type": ctype}
        start = time.perf_counter()
        try:
            status, data = await self.client.request("POST", f"/{endpoint}", body, headers)
        except ClientTimeout:
            tally.answers[(endpoint, "client_timeout")] += 1
            return
        except TransportError as exc:
            tally.answers[(endpoint, f"transport:{exc}")] += 1
            return
        finally:
            tally.in_flight -= 1
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        tally.answers[(endpoint, status)] += 1
        if endpoint == "predict" and status == 200:
            tally.predict_ms.append(elapsed_ms)
        elif endpoint == "explain" and status in (200, 202):
            tally.jobs.append(json.loads(data)["job_id"])


async def open_loop(load: Load, endpoint: str, rate: float, seconds: float, tally: Tally, cap: int) -> None:
    """Requests at ``rate`` per second for ``seconds``, each on its own schedule (no waiting for answers)."""
    if rate <= 0:
        return
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()
    t0 = loop.time()
    n = 0
    while n / rate < seconds:
        # Always yield (sleep(0) when behind schedule): the answers are handled on this loop too.
        await asyncio.sleep(max(0.0, t0 + n / rate - loop.time()))
        if tally.in_flight >= cap:
            tally.shed[endpoint] += 1
        else:
            task = asyncio.create_task(load.send(endpoint, tally))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        n += 1
    tally.send_lag_s[endpoint] = round(max(0.0, loop.time() - (t0 + (n - 1) / rate)), 3)
    if tasks:
        await asyncio.gather(*tasks)


async def predict_capacity(load: Load, concurrency: int, seconds: float) -> float:
    """Closed loop: ``concurrency`` clients, each sending again on every answer; answers (200) per second."""
    tally = Tally()
    stop = time.monotonic() + min(3.0, seconds)

    async def client() -> None:
        while time.monotonic() < stop:
            await load.send("predict", tally)

    await asyncio.gather(*(client() for _ in range(concurrency)))  # warm-up, not counted
    tally = Tally()
    start = time.monotonic()
    stop = start + seconds
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return len(tally.predict_ms) / (time.monotonic() - start)


async def job_states(client: HttpClient, ids: list[str], concurrency: int = 16) -> dict[str, str]:
    """{job id: finished | failed | queued | started | lost (404) | unreachable}, via GET /explain/{id}."""
    out: dict[str, str] = {}
    sem = asyncio.Semaphore(concurrency)

    async def one(job_id: str) -> None:
        async with sem:
            try:
                status, data = await client.request("GET", f"/explain/{job_id}")
            except (ClientTimeout, TransportError):
                out[job_id] = "unreachable"
                return
        if status == 404:
            out[job_id] = "lost"
        elif status == 200:
            out[job_id] = json.loads(data)["status"]
        else:
            out[job_id] = "unreachable"

    await asyncio.gather(*(one(j) for j in ids))
    return out


async def explain_capacity(load: Load, jobs: int, timeout: float = 600) -> float:
    """``jobs`` explanation jobs submitted at once; jobs finished per second by the worker(s)."""
    tally = Tally()
    start = time.monotonic()
    await asyncio.gather(*(load.send("explain", tally) for _ in range(jobs)))
    if not tally.jobs:
        raise SystemExit(f"no explanation job was accepted: {dict(tally.answers)}")
    while time.monotonic() - start < timeout:
        states = await job_states(load.client, tally.jobs)
        if all(s in ("finished", "failed") for s in states.values()):
            return len(tally.jobs) / (time.monotonic() - start)
        await asyncio.sleep(0.2)
    raise SystemExit(f"{jobs} explanation jobs did not end in {timeout:.0f} s")


async def sample_memory(pids: dict[str, int | None], samples: list[dict], interval: float, t0: float) -> None:
    while True:
        row: dict[str, Any] = {"t": round(time.monotonic() - t0, 2)}
        for role, pid in pids.items():
            if pid is not None:
                row[role] = rss_kib(pid)
        if pids.get("worker"):
            horses = [rss_kib(p) for p in children(pids["worker"])]
            horses = [h for h in horses if h]
            row["horse"] = max(horses) if horses else None
        samples.append(row)
        await asyncio.sleep(interval)


def memory_summary(samples: list[dict]) -> dict[str, dict[str, Any]]:
    """Per role: RSS (KiB) at the start and end and the growth. The horse comes and goes with
    each job: its figure is the peak seen in the first and the last fifth of the soak."""
    out: dict[str, dict[str, Any]] = {}
    if not samples:
        return out
    span = samples[-1]["t"] - samples[0]["t"]
    first = [s for s in samples if s["t"] <= samples[0]["t"] + span / 5]
    last = [s for s in samples if s["t"] >= samples[-1]["t"] - span / 5]
    for role in ("api", "worker", "horse"):
        if role == "horse":
            start = max((s.get("horse") or 0 for s in first), default=0) or None
            end = max((s.get("horse") or 0 for s in last), default=0) or None
        else:
            start = next((s[role] for s in samples if s.get(role)), None)
            end = next((s[role] for s in reversed(samples) if s.get(role)), None)
        if start is None and end is None:
            continue
        growth = (end - start) / start if start and end else None
        out[role] = {"start_kib": start, "end_kib": end, "growth": growth}
    return out


async def soak(args: argparse.Namespace, url: str, pids: dict[str, int | None], image: bytes, filename: str) -> dict:
    explain_params = {"segments": str(args.explain_segments), "samples": str(args.explain_samples)}
    client = HttpClient(url, args.max_in_flight, args.timeout, args.client)
    try:
        load = Load(client, image, filename, explain_params)
        capacity: dict[str, float | None] = {"predict_per_s": None, "explain_jobs_per_s": None}
        predict_rate, explain_rate = args.predict_rate, args.explain_rate
        if predict_rate is None:
            print(
                f"capacity: /predict closed loop, C={args.capacity_concurrency}, {args.capacity_s:.0f} s ...",
                file=sys.stderr,
                flush=True,
            )
            capacity["predict_per_s"] = await predict_capacity(load, args.capacity_concurrency, args.capacity_s)
            predict_rate = 2.0 * capacity["predict_per_s"]
        if explain_rate is None:
            print(f"capacity: {args.capacity_jobs} explanation jobs ...", file=sys.stderr, flush=True)
            capacity["explain_jobs_per_s"] = await explain_capacity(load, args.capacity_jobs)
            explain_rate = 2.0 * capacity["explain_jobs_per_s"]
        print(
            f"rates: /predict {predict_rate:.2f}/s, /explain {explain_rate:.3f}/s; warm-up {args.warmup_s:.0f} s, "
            f"soak {args.duration_s:.0f} s",
            file=sys.stderr,
            flush=True,
        )

        async def mixed(seconds: float, tally: Tally) -> None:
            await asyncio.gather(
                open_loop(load, "predict", predict_rate, seconds, tally, args.max_in_flight),
                open_loop(load, "explain", explain_rate, seconds, tally, args.max_in_flight),
            )

        warm = Tally()
        await mixed(args.warmup_s, warm)

        tally = Tally()
        samples: list[dict] = []
        cpu_pids = {k: v for k, v in pids.items() if v}
        cpu0 = {k: cpu_seconds(p) for k, p in cpu_pids.items()}
        client_cpu0 = time.process_time()
        t0 = time.monotonic()
        sampler = asyncio.create_task(sample_memory(pids, samples, args.sample_interval_s, t0))
        await mixed(args.duration_s, tally)
        elapsed = time.monotonic() - t0
        sampler.cancel()
        cpu = {f"{k}_cores": round((cpu_seconds(p) - cpu0[k]) / elapsed, 3) for k, p in cpu_pids.items()}
        cpu["client_cores"] = round((time.process_time() - client_cpu0) / elapsed, 3)

        print(
            f"drain: following {len(tally.jobs)} explanation jobs (at most {args.drain_s:.0f} s) ...",
            file=sys.stderr,
            flush=True,
        )
        ids = sorted(set(tally.jobs) | set(warm.jobs))
        drain_start = time.monotonic()
        states = await job_states(client, ids)
        while any(s not in ("finished", "failed", "lost") for s in states.values()):
            if time.monotonic() - drain_start > args.drain_s:
                break
            await asyncio.sleep(1.0)
            pending = [j for j, s in states.items() if s not in ("finished", "failed", "lost")]
            states.update(await job_states(client, pending))
        drain_s = time.monotonic() - drain_start
    finally:
        await client.close()

    return {
        "client": client.kind,
        "capacity": capacity,
        "rates": {"predict_per_s": predict_rate, "explain_per_s": explain_rate},
        "elapsed_s": round(elapsed, 2),
        "tally": tally,
        "warmup_answers": {f"{e} {s}": n for (e, s), n in sorted(warm.answers.items(), key=str)},
        "job_states": Counter(states.values()),
        "drain_s": round(drain_s, 2),
        "memory_samples": samples,
        "cpu": cpu,
    }


# -- report --------------------------------------------------------------------------------------------------


def summarize(run: dict) -> dict[str, Any]:
    tally: Tally = run["tally"]
    answers = tally.answers
    by_endpoint: dict[str, dict[str, int]] = {}
    for (endpoint, status), n in answers.items():
        by_endpoint.setdefault(endpoint, {})[str(status)] = n

    def count(pred) -> int:
        return sum(n for (_, s), n in answers.items() if pred(s))

    served = count(lambda s: isinstance(s, int) and 200 <= s < 300)
    refusals = {"429": count(lambda s: s == 429), "503": count(lambda s: s == 503)}
    other_5xx = count(lambda s: isinstance(s, int) and s >= 500 and s != 503)
    other_4xx = count(lambda s: isinstance(s, int) and 400 <= s < 500 and s != 429)
    transport = count(lambda s: isinstance(s, str))
    states = run["job_states"]
    memory = memory_summary(run["memory_samples"])
    lat = tally.predict_ms
    goals = {
        "other_5xx_zero": other_5xx == 0,
        "transport_errors_zero": transport == 0,
        "no_lost_jobs": states.get("lost", 0) == 0,
        "no_pending_jobs_after_drain": all(states.get(k, 0) == 0 for k in ("queued", "started", "unreachable")),
        # The API and the worker's parent must be measured; the horse only exists while a job runs.
        "rss_growth_under_10pct": all(
            (m["growth"] is not None or role == "horse") and (m["growth"] or 0.0) < RSS_GROWTH_GOAL
            for role, m in memory.items()
        ),
    }
    return {
        "sent": sum(answers.values()),
        "served_2xx": served,
        "refusals": refusals,
        "other_5xx": other_5xx,
        "other_4xx": other_4xx,
        "transport_errors": transport,
        "shed_by_client": dict(tally.shed),
        "client_send_lag_s": dict(tally.send_lag_s),
        "by_endpoint": by_endpoint,
        "predict_latency_ms": {
            "n": len(lat),
            "p50": round(percentile(lat, 50), 2),
            "p95": round(percentile(lat, 95), 2),
            "p99": round(percentile(lat, 99), 2),
            "max": round(max(lat), 2) if lat else None,
        },
        "predict_served_per_s": round(by_endpoint.get("predict", {}).get("200", 0) / run["elapsed_s"], 2),
        "explain_jobs": {
            "accepted": sum(states.values()),
            "accepted_in_soak": len(tally.jobs),
            **{k: v for k, v in sorted(states.items())},
        },
        "memory": memory,
        "goals": goals,
        "goals_met": all(goals.values()),
    }


def report(result: dict) -> str:
    s = result["summary"]
    lat = s["predict_latency_ms"]
    jobs = s["explain_jobs"]
    lines = [
        f"soak {result['label']}: {result['settings']['duration_s']:.0f} s of requests at /predict "
        f"{result['rates']['predict_per_s']:.1f}/s + /explain {result['rates']['explain_per_s']:.2f}/s, the last "
        f"answer after {result['elapsed_s']:.0f} s (capacity: {result['capacity']}; client: {result['client']})",
        f"  sent {s['sent']}, served {s['served_2xx']} (predict {s['predict_served_per_s']}/s), refusals "
        f"429: {s['refusals']['429']}, 503: {s['refusals']['503']}; other 5xx: {s['other_5xx']}; other 4xx: "
        f"{s['other_4xx']}; transport errors: {s['transport_errors']}; shed by the client: {s['shed_by_client']}",
        f"  /predict latency: p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms (n={lat['n']})",
        f"  client schedule lag at the end (s): {s['client_send_lag_s']}"
        + (
            "  <- the client fell behind: the offered rate was not reached"
            if max(s["client_send_lag_s"].values(), default=0.0) > 1.0
            else ""
        ),
        f"  explain jobs: {jobs} (drain {result['drain_s']:.0f} s)",
    ]
    for role, m in s["memory"].items():
        growth = f"{m['growth']:+.1%}" if m["growth"] is not None else "n/a"
        lines.append(
            f"  RSS {role}: {m['start_kib'] / 1024 if m['start_kib'] else 0:.0f} MiB -> "
            f"{m['end_kib'] / 1024 if m['end_kib'] else 0:.0f} MiB ({growth})"
        )
    if not s["memory"]:
        lines.append("  RSS not measured (attached without --api-pid / --worker-pid)")
    lines.append(f"  CPU (cores): {result['cpu']}")
    lines.append("  goals: " + ", ".join(f"{k} {'OK' if v else 'FAILED'}" for k, v in s["goals"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench/soak.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="attach to this API (loopback) instead of starting one")
    p.add_argument("--api-pid", type=int, help="with --url: the API's pid, for its RSS")
    p.add_argument("--worker-pid", type=int, help="with --url: the worker's pid (the parent), for its RSS")
    p.add_argument("--registry", type=Path, default=ROOT / "models", help="registry of the API and worker started")
    p.add_argument("--redis-url", help="Redis of the API and worker started (default: a private redis-server)")
    p.add_argument("--queue", default="explain-soak", help="EXPLAIN_QUEUE of the API and worker started")
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="extra settings for both")
    p.add_argument("--logs", type=Path, default=Path("/tmp/shapserve-soak"), help="logs of the processes started")
    p.add_argument("--duration-s", type=float, default=600.0, help="length of the soak (default 10 min)")
    p.add_argument("--warmup-s", type=float, default=30.0, help="load at the soak rates before recording")
    p.add_argument("--predict-rate", type=float, help="/predict per second (default: 2 x measured capacity)")
    p.add_argument("--explain-rate", type=float, help="/explain per second (default: 2 x measured capacity)")
    p.add_argument("--capacity-s", type=float, default=15.0, help="length of the /predict capacity measurement")
    p.add_argument("--capacity-concurrency", type=int, default=16, help="clients of the capacity measurement")
    p.add_argument("--capacity-jobs", type=int, default=6, help="jobs of the /explain capacity measurement")
    p.add_argument("--explain-segments", type=int, default=25, help="segments of each explanation")
    p.add_argument("--explain-samples", type=int, default=300, help="samples of each explanation")
    p.add_argument("--max-in-flight", type=int, default=300, help="outstanding requests beyond which none is sent")
    p.add_argument("--timeout", type=float, default=30.0, help="client timeout per request, seconds")
    p.add_argument("--client", choices=["auto", "aiohttp", "httpx"], default="auto", help="auto: aiohttp if installed")
    p.add_argument("--drain-s", type=float, default=300.0, help="longest wait for accepted jobs after the soak")
    p.add_argument("--sample-interval-s", type=float, default=2.0, help="RSS sampling interval")
    p.add_argument("--image", type=Path, help="image sent (default: the first cat of --data)")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz")
    p.add_argument("--label", default="run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the JSON goes")
    args = p.parse_args(argv)

    if args.url and not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        p.error("--url must be a loopback address")
    if args.image:
        image, image_name = args.image.read_bytes(), args.image.name
    else:
        image, image_name = first_cat(args.data)
    started_at = datetime.now(UTC)
    stack = Started()
    try:
        if args.url:
            url, pids = args.url.rstrip("/"), {"api": args.api_pid, "worker": args.worker_pid}
        else:
            print("starting redis, the API and a worker ...", file=sys.stderr, flush=True)
            url, api_pid, worker_pid = start_stack(args, stack)
            pids = {"api": api_pid, "worker": worker_pid}
        run = asyncio.run(soak(args, url, pids, image, image_name))
    finally:
        stack.stop()
    result = {
        "label": args.label,
        "date": started_at.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cores": len(os.sched_getaffinity(0)),
        "attached": bool(args.url),
        "client": run["client"],
        "settings": {
            "duration_s": args.duration_s,
            "warmup_s": args.warmup_s,
            "explain_segments": args.explain_segments,
            "explain_samples": args.explain_samples,
            "max_in_flight": args.max_in_flight,
            "timeout_s": args.timeout,
            "env": args.env,
        },
        "image": {"name": image_name, "bytes": len(image)},
        "capacity": run["capacity"],
        "rates": run["rates"],
        "elapsed_s": run["elapsed_s"],
        "drain_s": run["drain_s"],
        "cpu": run["cpu"],
        "warmup_answers": run["warmup_answers"],
        "summary": summarize(run),
        "memory_samples": run["memory_samples"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"soak-{args.label}-{started_at:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2))
    print(report(result))
    print(f"\nJSON: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0 if result["summary"]["goals_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
