#!/usr/bin/env python
"""The registry on S3 (a real SeaweedFS on loopback) against the local folder: a version's load
time (cold and cached), /predict and one explanation over HTTP.

Starts SeaweedFS (``tests/support/seaweed.py``), copies one version of ``--registry`` into a
bucket as it is (same id, its files' sha256 recorded in its metadata, then promoted), and:

1. loads the version in process ``--loads`` times from each registry: the folder; S3 with an
   empty cache each time (cold: every file fetched and checked); S3 with its cache (cached:
   ``PROMOTED`` and ``metadata.json`` read, the cached files hashed);
2. for each registry, starts ``python -m service`` and ``python -m worker`` (own Redis database,
   own caches), times the API's start to ready and the model's load as ``/model`` reports it,
   sends ``--requests`` sequential ``POST /predict`` of one real image, and one ``POST /explain``
   (default parameters) followed to its end.

    .venv/bin/python bench/registry_s3.py --registry /tmp/reg --redis-url redis://127.0.0.1:6379/9

Writes JSON to bench/results/registry-s3-<time>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapcore.registry import METADATA, PROMOTED, Registry  # noqa: E402
from shapcore.store import Store, file_record  # noqa: E402
from tests.support.processes import free_port, wait_for  # noqa: E402
from tests.support.seaweed import start_seaweed  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz"


def copy_to_store(src: Registry, version: str, url: str) -> None:
    """``version``'s files uploaded as they are, metadata (with every file's sha256) last, promoted."""
    store, folder = Store(url), src.local_dir(version)
    meta = json.loads((folder / METADATA).read_text())
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != METADATA and p.name[0] != ".")
    meta["files"] = {name: file_record(folder / name) for name in names}
    for name in names:
        store.upload(folder / name, f"{version}/{name}")
    store.write_bytes(f"{version}/{METADATA}", json.dumps(meta, indent=2).encode())
    store.write_bytes(PROMOTED, f"{version}\n".encode())


def timed_loads(make: callable, loads: int, fresh_cache: Path | None) -> list[float]:
    times = []
    for _ in range(loads):
        if fresh_cache is not None:
            shutil.rmtree(fresh_cache, ignore_errors=True)
        registry = make()
        start = time.perf_counter()
        registry.load()
        times.append(time.perf_counter() - start)
    return times


def one_image(archive: Path) -> bytes:
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            if member.isfile() and "/cat/" in member.name:
                return tar.extractfile(member).read()
    raise SystemExit("no cat in the archive")


def serve(label: str, env: dict[str, str], image: bytes, requests: int, logs: Path, seed: int) -> dict:
    port = free_port()
    env = {**env, "PORT": str(port), "HOST": "127.0.0.1", "EXPLAIN_QUEUE": f"bench-s3-{label}",
           "PRECISION": "fp32", "EXPLAIN_PRECISION": "fp32", "WARMUP": "true"}  # fmt: skip
    procs = []
    try:
        t0 = time.monotonic()
        with (logs / f"service-{label}.log").open("wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)

        def ready() -> bool:
            try:
                return client.get("/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 600, f"{label} API ready")
        ready_s = time.monotonic() - t0
        model = client.get("/model").json()
        lat = []
        for _ in range(requests):
            start = time.perf_counter()
            r = client.post("/predict", files={"file": ("cat.jpg", image, "image/jpeg")})
            lat.append(1000 * (time.perf_counter() - start))
            r.raise_for_status()
        with (logs / f"worker-{label}.log").open("wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
        w0 = time.monotonic()
        wait_for(lambda: "Listening on" in (logs / f"worker-{label}.log").read_text(errors="replace"), 600,
                 f"{label} worker")  # fmt: skip
        worker_ready_s = time.monotonic() - w0
        start = time.perf_counter()
        job = client.post("/explain", files={"file": ("cat.jpg", image, "image/jpeg")}, data={"seed": str(seed)}).json()
        done = wait_for(lambda: (d := client.get(job["status_url"]).json())["status"] in ("finished", "failed") and d,
                        900, "the explanation")  # fmt: skip
        explain_s = time.perf_counter() - start
        assert done["status"] == "finished", done
        lat.sort()
        return {
            "api_ready_s": round(ready_s, 2),
            "model_load_s": model.get("load_seconds"),
            "predict_p50_ms": round(statistics.median(lat), 2),
            "predict_p95_ms": round(lat[int(0.95 * (len(lat) - 1))], 2),
            "worker_ready_s": round(worker_ready_s, 2),
            "explain_s": round(explain_s, 2),
            "explain_result_s": done["result"].get("duration_s"),
        }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", required=True, help="a local registry holding the version")
    parser.add_argument("--version", default=None, help="default: its promoted, else newest")
    parser.add_argument("--redis-url", required=True, help="a Redis database the bench may use")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    s3 = start_seaweed(work / "seaweed")
    try:
        os.environ.update(s3.env())
        local = Registry(args.registry)
        version = local.resolve(args.version)
        url = s3.new_registry_url()
        copy_to_store(local, version, url)
        cache = work / "cache"
        loads = {
            "folder": timed_loads(lambda: Registry(args.registry), args.loads, None),
            "s3_cold": timed_loads(lambda: Registry(url, cache=cache), args.loads, cache),
            "s3_cached": timed_loads(lambda: Registry(url, cache=cache), args.loads, None),
        }
        print(json.dumps({"load_s": loads}), flush=True)
        image = one_image(Path(args.data))
        base = {**os.environ, "PYTHONUNBUFFERED": "1", "REDIS_URL": args.redis_url}
        base.pop("MODEL_VERSION", None)
        s3_env = {**base, "MODEL_REGISTRY": url, "MODEL_CACHE": str(work / "svc-cache")}
        http = {
            "folder": serve("folder", {**base, "MODEL_REGISTRY": args.registry}, image, args.requests, work, 1),
            "s3": serve("s3", s3_env, image, args.requests, work, 2),
        }
    finally:
        s3.stop()
    out = {
        "version": version,
        "weights_bytes": (local.local_dir(version) / "model.safetensors").stat().st_size,
        "load_s": {k: [round(t, 3) for t in v] for k, v in loads.items()},
        "load_median_s": {k: round(statistics.median(v), 3) for k, v in loads.items()},
        "http": http,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
    }
    dest = ROOT / "bench" / "results" / f"registry-s3-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"written to {dest}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
