#!/usr/bin/env python
"""POST /explain over real HTTP, end to end: the API's accept path and a job's whole way.

Starts ``python -m service`` and ``python -m worker`` (from ``--tree``, default this checkout:
point it at another checkout to compare two commits with the same client), then for each of
``--images`` distinct real CIFAR-10 images sends one POST /explain (parameters as form
fields), polls ``GET /explain/{id}`` until the job has finished, and downloads its heatmap.
Jobs are sent one after the other, so the figures are per-request, not under load.

    .venv/bin/python bench/explain_http.py --registry /tmp/bench-reg --label after
    .venv/bin/python bench/explain_http.py --registry /tmp/bench-reg --label before --tree /work/wt-before

Reports p50/p90 of: POST latency (upload, decode, dedupe, enqueue), submit-to-finished time,
heatmap GET latency; writes JSON to bench/results/explain-http-<label>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def real_images(archive: Path, count: int) -> list[tuple[str, bytes]]:
    """``count`` images of the archive, round-robin over its classes."""
    per_class: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and len(per_class.get(parts[1], [])) < count:
                per_class.setdefault(parts[1], []).append((parts[2], tar.extractfile(member).read()))
    rows = [img for group in zip(*per_class.values(), strict=False) for img in group]
    return rows[:count]


def start(tree: Path, module: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", module], cwd=tree, env=env, stdout=out, stderr=out,
                                start_new_session=True)  # fmt: skip


def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"service exited with {proc.returncode}: see {log}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"service not ready after 300 s: see {log}")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(args: argparse.Namespace) -> dict:
    import redis

    redis.Redis.from_url(args.redis_url).flushdb()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(args.tree), "MODEL_REGISTRY": str(args.registry),
           "REDIS_URL": args.redis_url, "HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "warning"}  # fmt: skip
    args.logs.mkdir(parents=True, exist_ok=True)
    api_log, worker_log = args.logs / f"api-{args.label}.log", args.logs / f"worker-{args.label}.log"
    api = start(args.tree, "service", env, api_log)
    worker = start(args.tree, "worker", env, worker_log)
    post_ms, done_s, png_ms = [], [], []
    try:
        wait_ready(url, api, api_log)
        form = {"segments": str(args.segments), "samples": str(args.samples)}
        with httpx.Client(base_url=url, timeout=120) as client:
            for name, data in real_images(args.data, args.images):
                t0 = time.perf_counter()
                r = client.post("/explain", files={"file": (name, data, "image/png")}, data=form)
                t1 = time.perf_counter()
                if r.status_code not in (200, 202):
                    raise SystemExit(f"POST /explain answered {r.status_code}: {r.text}")
                status_url = r.json()["status_url"]
                while (doc := client.get(status_url).json())["status"] not in ("finished", "failed"):
                    time.sleep(0.05)
                if doc["status"] != "finished":
                    raise SystemExit(f"job failed: {doc}")
                t2 = time.perf_counter()
                png = client.get(status_url + "/heatmap.png")
                t3 = time.perf_counter()
                assert png.status_code == 200 and png.content.startswith(b"\x89PNG"), png.status_code
                post_ms.append((t1 - t0) * 1000)
                done_s.append(t2 - t0)
                png_ms.append((t3 - t2) * 1000)
    finally:
        for proc in (api, worker):
            os.killpg(proc.pid, 15)
            proc.wait(timeout=60)
    return {
        "label": args.label, "tree": str(args.tree), "images": len(post_ms), "segments": args.segments,
        "samples": args.samples, "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "post_ms": {"p50": pct(post_ms, 0.5), "p90": pct(post_ms, 0.9), "mean": statistics.fmean(post_ms)},
        "finished_s": {"p50": pct(done_s, 0.5), "p90": pct(done_s, 0.9), "mean": statistics.fmean(done_s)},
        "heatmap_ms": {"p50": pct(png_ms, 0.5), "p90": pct(png_ms, 0.9), "mean": statistics.fmean(png_ms)},
        "loadavg": os.getloadavg(),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", type=Path, required=True)
    p.add_argument("--tree", type=Path, default=ROOT, help="checkout whose service and worker run")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--segments", type=int, default=50)
    p.add_argument("--samples", type=lambda v: v if v == "auto" else str(int(v)), default="500",
                   help="a budget, or auto (the service's default: stop when converged)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    p.add_argument("--label", default="run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--logs", type=Path, default=Path("/tmp/shapserve-bench"))
    args = p.parse_args()
    args.tree = args.tree.resolve()
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (args.out / f"explain-http-{args.label}-{stamp}.json").write_text(json.dumps(result, indent=2))
    print(f"| {args.label} | {result['images']} | {result['post_ms']['p50']:.1f} / {result['post_ms']['p90']:.1f} | "
          f"{result['finished_s']['p50']:.2f} / {result['finished_s']['p90']:.2f} | "
          f"{result['heatmap_ms']['p50']:.1f} / {result['heatmap_ms']['p90']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
