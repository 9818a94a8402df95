#!/usr/bin/env python
"""POST /explain method=fast over real HTTP at concurrency 1, beside POST /predict on the same images.

Starts ``python -m service`` on ``--registry`` (its served version must have an explainer:
``python -m training fit-explainer``), then sends ``--images`` distinct real CIFAR-10 JPEGs one
after the other, three times: /predict (the floor: the same upload, decode and forward pass),
/explain method=fast, and /explain method=fast with faithfulness=true (the curves in the
request). Client-side latency p50/p90 in ms; the heatmap GET of the fast answers too.

    .venv/bin/python bench/fast_http.py --registry models [--images 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explain_http import DEFAULT_DATA, ROOT, free_port, pct, real_images, start, wait_ready


def timed(client: httpx.Client, images, path: str, form: dict[str, str]) -> tuple[list[float], list]:
    times, answers = [], []
    for name, data in images:
        t0 = time.perf_counter()
        r = client.post(path, files={"file": (name, data, "image/jpeg")}, data=form)
        times.append(1000 * (time.perf_counter() - t0))
        if r.status_code != 200:
            raise SystemExit(f"POST {path} {form} answered {r.status_code}: {r.text}")
        answers.append(r.json())
    return times, answers


def summary(times: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(times, 0.5), "p90_ms": pct(times, 0.9), "n": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", type=Path, default=ROOT / "models")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    ap.add_argument("--logs", type=Path, default=ROOT / "var" / "bench-logs")
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MODEL_REGISTRY": str(args.registry), "REDIS_URL": args.redis_url, "HOST": "127.0.0.1",
           "PORT": str(port), "LOG_LEVEL": "warning"}  # fmt: skip
    args.logs.mkdir(parents=True, exist_ok=True)
    log = args.logs / "api-fast.log"
    api = start(ROOT, "service", env, log)
    images = real_images(args.data, args.images)
    try:
        wait_ready(url, api, log)
        with httpx.Client(base_url=url, timeout=120) as client:
            timed(client, images[:5], "/explain", {"method": "fast"})  # warm: the explainer's first passes
            predict, _ = timed(client, images, "/predict", {})
            fast, answers = timed(client, images, "/explain", {"method": "fast"})
            curves, _ = timed(client, images, "/explain", {"method": "fast", "faithfulness": "true"})
            png = []
            for answer in answers[:20]:
                t0 = time.perf_counter()
                r = client.get(answer["heatmap_url"])
                png.append(1000 * (time.perf_counter() - t0))
                assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
            model = client.get("/model").json()
    finally:
        os.killpg(api.pid, 15)
        api.wait(timeout=60)
    out = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "version": model["version"],
        "explainer": model["explainer"],
        "predict": summary(predict),
        "explain_fast": summary(fast),
        "explain_fast_with_faithfulness": summary(curves),
        "heatmap_get": summary(png),
        "server_explainer_ms_p50": pct([1000 * a["result"]["timings_s"]["explainer"] for a in answers], 0.5),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
