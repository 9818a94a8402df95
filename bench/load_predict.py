#!/usr/bin/env python
"""Load benchmark of POST /predict over real HTTP, batcher on and off, plus the model's raw speed.

For each configuration (``batch``: dynamic batching on, ``nobatch``: one forward pass per
request) it starts its own ``python -m service`` (uvicorn) subprocess, then for each
concurrency C sends N requests keeping exactly C in flight (C asynchronous workers, each
sending its next request as soon as its previous answer arrives; aiohttp if installed,
else httpx), after a warm-up. The raw forward pass of the same model, prepared the same
way (shapcore.inference.build_forward, same torch threads) is measured in this process first:
batch-1 latency and batched throughput.

    .venv/bin/python bench/load_predict.py --registry models --label cpu-32px
    .venv/bin/python bench/load_predict.py --registry /tmp/reg224 --label smoke-224px

Prints a markdown report; writes JSON to bench/results/predict-<label>-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- helpers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[index]


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def machine_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine so far (all cores, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def training_running() -> bool:
    """Is a `python -m training` process running on this machine (it competes for the CPU)?"""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"-m training" in cmd and b" train " in cmd:
            return True
    return False


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def first_cat(archive: Path) -> tuple[bytes, str]:
    """The first cat of the CIFAR-10 archive (as the tests' ``cifar_jpeg`` fixture)."""
    import tarfile

    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            if member.isfile() and "/cat/" in member.name:
                return tar.extractfile(member).read(), Path(member.name).name
    raise SystemExit(f"no cat in {archive}")


def multipart(image: bytes, filename: str, fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body: form ``fields`` (e.g. /explain's parameters), then ``file``."""
    boundary = "shapservebench0123456789"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in (fields or {}).items()
    ]
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    body = b"".join(parts) + head + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def scrape(url: str) -> dict[str, float]:
    """The batcher/inference series of /metrics, summed over labels."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "shapserve_batch_size_sum",
        "shapserve_batch_size_count",
        "shapserve_inference_duration_seconds_sum",
        "shapserve_inference_duration_seconds_count",
        "shapserve_batcher_queue_wait_seconds_sum",
        "shapserve_batcher_queue_wait_seconds_count",
        "shapserve_image_decode_duration_seconds_sum",
        "shapserve_image_decode_duration_seconds_count",
    }
    out: dict[str, float] = dict.fromkeys(wanted, 0.0)
    text = httpx.get(url + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] += sample.value
    return out


# -- raw forward --------------------------------------------------------------------------------


def raw_forward(args: argparse.Namespace, image: bytes) -> dict[str, Any]:
    """Forward passes in this process, exactly as the service prepares them."""
    import torch

    from shapcore.images import image_to_tensor
    from shapcore.inference import build_forward, resolve_device, warm_up
    from shapcore.registry import Registry

    # As the service resolves TORCH_THREADS=0.
    threads = args.torch_threads or max(1, (len(os.sched_getaffinity(0)) - 1) // args.inference_workers)
    torch.set_num_threads(threads)
    device = resolve_device(args.device)
    loaded = Registry(args.registry).load(args.version, device=device)
    # the raw rate of the form --precision names; auto's measured choice is the server's (see /model)
    forward = build_forward(loaded.model, device, jit=not args.no_jit,
                            precision="fp32" if args.precision == "auto" else args.precision)  # fmt: skip
    warm_up(forward, args.batch_max_size)  # exactly what the service does before it is ready
    runtime = forward.describe()
    one = image_to_tensor(image, 16_777_216).unsqueeze(0)

    def timed(batch: torch.Tensor) -> float:
        start = time.perf_counter()
        forward(batch)
        return time.perf_counter() - start

    batch1 = []
    for _ in range(5):
        timed(one)
    deadline = time.perf_counter() + args.raw_seconds
    while time.perf_counter() < deadline or len(batch1) < 20:
        batch1.append(timed(one))
    sizes = sorted({1, *args.raw_batches})
    batched: dict[str, float] = {}
    for size in sizes:
        x = one.expand(size, -1, -1, -1).contiguous()
        for _ in range(3):
            timed(x)
        runs, spent = 0, 0.0
        while spent < args.raw_seconds or runs < 3:
            spent += timed(x)
            runs += 1
        batched[str(size)] = size * runs / spent
    parallel: dict[str, float] = {}
    if args.inference_workers > 1:  # as many forward passes side by side as the service runs
        import threading

        for size in sizes:
            x = one.expand(size, -1, -1, -1).contiguous()
            counts = [0] * args.inference_workers
            stop = time.perf_counter() + args.raw_seconds

            def spin(i: int, x: torch.Tensor = x, counts: list[int] = counts, stop: float = stop) -> None:
                torch.set_num_threads(threads)
                while time.perf_counter() < stop:
                    forward(x)
                    counts[i] += x.shape[0]

            workers = [threading.Thread(target=spin, args=(i,)) for i in range(args.inference_workers)]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            parallel[str(size)] = sum(counts) / (time.perf_counter() - start)
    return {
        "version": Registry(args.registry).resolve(args.version),
        "input_size": Registry(args.registry).metadata(Registry(args.registry).resolve(args.version))["input_size"],
        "runtime": runtime,
        "torch_threads": threads,
        "batch1_ms": {
            "mean": statistics.fmean(batch1) * 1000,
            "p50": percentile(batch1, 50) * 1000,
            "p99": percentile(batch1, 99) * 1000,
            "runs": len(batch1),
        },
        "batched_images_per_s": batched,
        "inference_workers": args.inference_workers,
        "parallel_images_per_s": parallel,
    }


# -- HTTP load ---------------------------------------------------------------------------------


class Client:
    """The smallest per-request cost we can get: aiohttp if installed, else httpx."""

    def __init__(self, url: str, concurrency: int) -> None:
        self.url = url
        try:
            import aiohttp
        except ModuleNotFoundError:
            aiohttp = None
        self.kind = "aiohttp" if aiohttp else "httpx"
        if aiohttp is None and concurrency >= 32:
            print("  warning: no aiohttp (pip install -e '.[bench]'): the httpx client takes a core of its own from "
                  "C=64 on and starves the server it measures (BENCHMARKS.md, issue 15)", file=sys.stderr)  # fmt: skip
        if aiohttp:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=concurrency, force_close=False),
                timeout=aiohttp.ClientTimeout(total=120),
            )
        else:
            import httpx

            self._session = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency), timeout=120
            )

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, str | None]:
        """(status, Retry-After header or None)."""
        headers = {"content-type": content_type}
        if self.kind == "aiohttp":
            async with self._session.post(self.url + path, data=body, headers=headers) as resp:
                await resp.read()
                return resp.status, resp.headers.get("Retry-After")
        resp = await self._session.post(self.url + path, content=body, headers=headers)
        return resp.status_code, resp.headers.get("Retry-After")

    async def close(self) -> None:
        await (self._session.close() if self.kind == "aiohttp" else self._session.aclose())


async def load_level(
    url: str, pid: int, body: bytes, ctype: str, concurrency: int, requests: int, warmup: int,
    seconds: float = 0.0, backoff_cap_s: float = 1.0,
) -> dict:  # fmt: skip
    """C closed-loop clients; ``requests`` in all, or with ``seconds`` for that long. A refused
    request (503/429) counts apart, and its client waits the Retry-After (at most
    ``backoff_cap_s``; 0: retries at once, an impolite client) before its next request."""
    client = Client(url, concurrency)
    latencies: list[float] = []  # answered (200) requests
    refused: list[float] = []
    failures: dict[str, int] = {}
    issued = 0
    deadline = float("inf")

    async def worker(limit: int, record: bool) -> None:
        nonlocal issued
        while issued < limit and time.perf_counter() < deadline:
            issued += 1
            start = time.perf_counter()
            try:
                status, retry_after = await client.post("/predict?top_k=3", body, ctype)
            except Exception as exc:
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                continue
            elapsed = time.perf_counter() - start
            if status == 200:
                if record:
                    latencies.append(elapsed)
                continue
            failures[str(status)] = failures.get(str(status), 0) + 1
            if status in (429, 503):
                if record:
                    refused.append(elapsed)
                if retry_after and backoff_cap_s > 0:
                    await asyncio.sleep(min(float(retry_after), backoff_cap_s))

    try:
        await asyncio.gather(*(worker(warmup, False) for _ in range(concurrency)))
        # The client's idle keep-alive connections count against uvicorn's limit_concurrency
        # (MAX_CONCURRENT_REQUESTS): at C=256 a scrape beside them would be refused. Scrape
        # with the client closed, and measure with a fresh one.
        await client.close()
        client = Client(url, concurrency)
        issued = 0
        failures.clear()
        before, server_cpu0 = await asyncio.to_thread(scrape, url), proc_cpu_seconds(pid)
        busy0 = machine_busy_seconds()
        cpu0 = time.process_time()
        start = time.perf_counter()
        if seconds > 0:
            deadline = start + seconds
        limit = 10**9 if seconds > 0 else requests
        await asyncio.gather(*(worker(limit, True) for _ in range(concurrency)))
        wall = time.perf_counter() - start
        client_cpu = time.process_time() - cpu0
        server_cpu = proc_cpu_seconds(pid) - server_cpu0
        busy = machine_busy_seconds() - busy0
    finally:
        await client.close()
    after = await asyncio.to_thread(scrape, url)
    delta = {k: after[k] - before[k] for k in after}
    n_batches = delta["shapserve_batch_size_count"]
    n_images = delta["shapserve_batch_size_sum"]
    infer_s = delta["shapserve_inference_duration_seconds_sum"]
    return {
        "concurrency": concurrency,
        "requests": issued,
        "ok": len(latencies),
        "refused": len(refused),
        "failures": failures,
        "seconds": wall,
        "throughput": len(latencies) / wall,  # goodput: answered requests per second
        "refused_per_s": len(refused) / wall,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p95_ms": percentile(latencies, 95) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "refused_p99_ms": percentile(refused, 99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
        "client_cpu_cores": client_cpu / wall,
        "client": client.kind,
        "server_cpu_cores": server_cpu / wall,
        "other_cpu_cores": max(0.0, busy - server_cpu - client_cpu) / wall,
        "mean_batch": n_images / n_batches if n_batches else float("nan"),
        "mean_forward_ms": 1000 * infer_s / n_batches if n_batches else float("nan"),
        "forward_busy": infer_s / wall,
        "mean_queue_wait_ms": 1000 * delta["shapserve_batcher_queue_wait_seconds_sum"] / n_images if n_images else 0,
        "mean_decode_ms": 1000 * delta["shapserve_image_decode_duration_seconds_sum"] / n_images if n_images else 0,
    }


def start_server(args: argparse.Namespace, batching: bool, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "MODEL_REGISTRY": str(args.registry),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "BATCHING": "true" if batching else "false",
        "BATCH_MAX_SIZE": str(args.batch_max_size),
        "BATCH_MAX_WAIT_MS": str(args.batch_max_wait_ms),
        "TORCH_THREADS": str(args.torch_threads),
        "INFERENCE_WORKERS": str(args.inference_workers),
        "DEVICE": args.device,
        "RUNTIME": {"fp32": "torchscript"}.get(args.precision, args.precision),
        "JIT": "false" if args.no_jit else "true",
        "LOG_LEVEL": "warning",
    }
    if args.version:
        env["MODEL_VERSION"] = args.version
    if args.server == "bentoml":
        env["TORCH_THREADS"] = str(args.torch_threads or max(1, (os.cpu_count() or 2) - 1))  # shapserve's default
        env["BENTO_MAX_BATCH"] = str(args.batch_max_size)
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    command = [sys.executable, "-m", "service"]
    if args.server == "bentoml":
        command = [str(args.bento_python), "-m", "bentoml", "serve", "bench/bentoml_peer/service.py:Classifier",
                   "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"service exited with {proc.returncode}: see {log_path}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"service not ready after 300 s: see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_config(args: argparse.Namespace, batching: bool, body: bytes, ctype: str, out_dir: Path) -> list[dict]:
    name = "batch" if batching else "nobatch"
    proc, url = start_server(args, batching, args.logs / f"server-{args.label}-{name}.log")
    levels = []
    try:
        import httpx

        runtime = "bentoml" if args.server == "bentoml" else httpx.get(url + "/model", timeout=10).json().get("runtime")
        print(f"  {name}: server runtime {runtime}", file=sys.stderr, flush=True)
        for concurrency in args.concurrency:
            profile = None
            if args.profile and batching and concurrency == args.profile:
                profile = args.logs / f"profile-{args.label}-c{concurrency}.txt"
                spy = subprocess.Popen(
                    [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(proc.pid),
                     "--format", "raw", "--rate", "200",
                     "--threads", *(["--gil"] if args.profile_gil else []), "--output", str(profile),
                     "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(1.0)
            requests = max(args.requests, args.min_requests_per_worker * concurrency)
            run = load_level(url, proc.pid, body, ctype, concurrency, requests, args.warmup * concurrency,
                             seconds=args.seconds, backoff_cap_s=args.backoff_cap)  # fmt: skip
            level = asyncio.run(run)
            level["config"] = name
            level["server_runtime"] = runtime
            if profile is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
                level["profile"] = str(profile)
            print(
                f"  {name:8s} c={concurrency:<3d} {level['throughput']:8.1f} req/s ok, {level['refused_per_s']:6.1f} "
                f"refused/s  p50 {level['p50_ms']:7.1f}  "
                f"p99 {level['p99_ms']:7.1f} ms  batch {level['mean_batch']:5.1f}  "
                f"server {level['server_cpu_cores']:.2f} client {level['client_cpu_cores']:.2f} "
                f"other {level['other_cpu_cores']:.2f} cores  "
                f"fails {level['failures']}",
                file=sys.stderr,
                flush=True,
            )
            levels.append(level)
    finally:
        stop_server(proc)
    return levels


def report(result: dict) -> str:
    raw = result["raw"]
    lines = [
        f"### {result['label']}: input {raw['input_size']} px, {raw['runtime']}, torch threads {raw['torch_threads']}, "
        f"inference workers {raw['inference_workers']}",
        "",
        f"{result['date']}, {result['machine']['cpu']} ({result['machine']['cores']} cores), torch "
        f"{result['machine']['torch']}, training running concurrently: {result['training_running']}, "
        f"client {result['levels'][0]['client']}.",
        "",
        f"Raw forward, batch 1: mean {raw['batch1_ms']['mean']:.2f} ms, p50 {raw['batch1_ms']['p50']:.2f} ms, "
        f"p99 {raw['batch1_ms']['p99']:.2f} ms.",
        "",
        "| batch size | " + " | ".join(raw["batched_images_per_s"]) + " |",
        "|---|" + "---:|" * len(raw["batched_images_per_s"]),
        "| images/s | " + " | ".join(f"{v:.1f}" for v in raw["batched_images_per_s"].values()) + " |",
        *(
            [
                f"| images/s, {raw['inference_workers']} passes side by side | "
                + " | ".join(f"{v:.1f}" for v in raw["parallel_images_per_s"].values())
                + " |"
            ]
            if raw.get("parallel_images_per_s")
            else []
        ),
        "",
        "| batcher | C | req/s answered | refused/s | p50 ms | p95 ms | p99 ms | mean batch | forward ms |"
        " forward busy | queue wait ms | server CPU | client CPU | other CPU | failures |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in result["levels"]:
        lines.append(
            f"| {'on' if lv['config'] == 'batch' else 'off'} | {lv['concurrency']} | {lv['throughput']:.1f} | "
            f"{lv.get('refused_per_s', 0.0):.1f} | "
            f"{lv['p50_ms']:.1f} | {lv['p95_ms']:.1f} | {lv['p99_ms']:.1f} | {lv['mean_batch']:.1f} | "
            f"{lv['mean_forward_ms']:.1f} | {lv['forward_busy']:.0%} | {lv['mean_queue_wait_ms']:.2f} | "
            f"{lv['server_cpu_cores']:.2f} | {lv['client_cpu_cores']:.2f} | {lv['other_cpu_cores']:.2f} | "
            f"{sum(lv['failures'].values())} |"
        )
    by = {(lv["config"], lv["concurrency"]): lv for lv in result["levels"]}
    lines.append("")
    if ("batch", 16) in by and ("nobatch", 16) in by:
        ratio = by[("batch", 16)]["throughput"] / by[("nobatch", 16)]["throughput"]
        lines.append(f"- C=16: batcher on / off throughput = {ratio:.2f}x")
    if ("batch", 16) in by:
        best = max([*raw["batched_images_per_s"].values(), *raw.get("parallel_images_per_s", {}).values()])
        at16 = raw["batched_images_per_s"].get("16")
        text = f"- C=16 HTTP throughput / best raw batched rate = {by[('batch', 16)]['throughput'] / best:.1%}"
        if at16:
            text += f" (/ raw rate at batch 16: {by[('batch', 16)]['throughput'] / at16:.1%})"
        lines.append(text)
    if ("batch", 1) in by:
        lv = by[("batch", 1)]
        lines.append(
            f"- C=1: HTTP p50 {lv['p50_ms']:.2f} / p99 {lv['p99_ms']:.2f} ms vs raw batch-1 forward p50 "
            f"{raw['batch1_ms']['p50']:.2f} / p99 {raw['batch1_ms']['p99']:.2f} ms: p50 +"
            f"{lv['p50_ms'] - raw['batch1_ms']['p50']:.2f} ms, p99 +{lv['p99_ms'] - raw['batch1_ms']['p99']:.2f} ms"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", type=Path, default=ROOT / "models")
    p.add_argument("--version", help="default: promoted, else newest")
    p.add_argument(
        "--image",
        type=Path,
        help="the image every request sends (default: the first cat, a 32x32 JPEG, of the CIFAR-10 archive)",
    )
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz")
    p.add_argument("--label", default="run")
    p.add_argument("--server", choices=["shapserve", "bentoml"], default="shapserve",
                   help="bentoml: the peer in bench/bentoml_peer (same model; batching on, its own)")  # fmt: skip
    p.add_argument("--bento-python", type=Path, default=Path("/work/bento-venv/bin/python"),
                   help="a Python with BentoML installed (bench/compare_bentoml.sh makes one)")  # fmt: skip
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=400, help="measured requests per level (at least)")
    p.add_argument("--min-requests-per-worker", type=int, default=0, help="at least C times this many per level")
    p.add_argument("--warmup", type=int, default=5, help="warm-up requests per worker before each level")
    p.add_argument("--seconds", type=float, default=0.0, help="run each level this long (instead of --requests)")
    p.add_argument("--backoff-cap", type=float, default=1.0,
                   help="a refused client waits its Retry-After, at most this many s (0: retries at once)")  # fmt: skip
    p.add_argument("--configs", nargs="+", choices=["batch", "nobatch"], default=["batch", "nobatch"])
    p.add_argument("--batch-max-size", type=int, default=32)
    p.add_argument("--batch-max-wait-ms", type=float, default=None, help="default: the service's")
    p.add_argument("--torch-threads", type=int, default=0, help="0: as the service (all cores but one)")
    p.add_argument("--inference-workers", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the server's RUNTIME (fp32: torchscript)")
    p.add_argument("--no-jit", action="store_true")
    p.add_argument("--raw-seconds", type=float, default=3.0, help="time spent per raw-forward measurement")
    p.add_argument("--raw-batches", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="extra settings for the service")
    p.add_argument("--profile", type=int, metavar="C", help="record a py-spy profile of the server at this C")
    p.add_argument("--profile-gil", action="store_true", help="py-spy: only samples holding the GIL")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the JSON goes")
    p.add_argument("--logs", type=Path, default=Path("/tmp/shapserve-bench"), help="server logs and profiles")
    args = p.parse_args(argv)
    if args.batch_max_wait_ms is None:
        from service.settings import Settings

        args.batch_max_wait_ms = Settings.model_fields["batch_max_wait_ms"].default

    args.out.mkdir(parents=True, exist_ok=True)
    args.logs.mkdir(parents=True, exist_ok=True)
    if args.image:
        image, image_name = args.image.read_bytes(), args.image.name
    else:
        image, image_name = first_cat(args.data)
    body, ctype = multipart(image, image_name)
    started = datetime.now(UTC)
    training = training_running()
    print(f"raw forward ({args.label}) ...", file=sys.stderr, flush=True)
    raw = raw_forward(args, image)
    print(f"  batch 1: {raw['batch1_ms']}; batched: {raw['batched_images_per_s']}", file=sys.stderr, flush=True)
    levels: list[dict] = []
    for config in args.configs:
        levels += run_config(args, config == "batch", body, ctype, args.out)
    result = {
        "label": args.label,
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "training_running": training or training_running(),
        "settings": {
            "batch_max_size": args.batch_max_size,
            "batch_max_wait_ms": args.batch_max_wait_ms,
            "torch_threads": args.torch_threads,
            "precision": args.precision,
            "jit": not args.no_jit,
            "env": args.env,
        },
        "image": {"name": image_name, "bytes": len(image)},
        "raw": raw,
        "levels": levels,
    }
    path = args.out / f"predict-{args.label}-{started:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2))
    print(report(result))
    print(f"\nJSON: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
