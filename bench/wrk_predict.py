#!/usr/bin/env python
"""POST /predict under ``wrk`` (closed loop, no back-off): goodput, 2xx p99 and refusals per level.

``wrk`` does not honour ``Retry-After``: each of its C connections sends the next request as
soon as the last is answered, as a retrying client or a crowd of independent users does. A
shedding policy has to hold against that. For each level, after a warm-up at the same level,
wrk runs ``--seconds`` and the counts are read from the server's own ``/metrics``
(``shapserve_http_requests_total`` for /predict by status; what wrk sent beyond what the app
counted was refused by uvicorn before the app). Printed per level: 2xx/s, refusals/s,
goodput as a % of the run's peak 2xx/s, and the 2xx p99 (wrk's latencies do not say which
answer was a 2xx, so it is bounded):

* from wrk's latency histogram over *all* answers, ``≥ .. ≤``: the 1 % slowest 2xx answers are at
  most as slow as the same number of slowest answers of any kind, so the quantile of all answers
  at rank ``1 - 0.01 * n_2xx / n_all`` is an upper bound (tight when refusals are fast), and the
  quantile at ``0.99 * n_2xx / n_all`` a lower bound (tight only when every refusal is slower than
  the answers; with paced refusals some go at once and some wait, and it can be far off).
* ``server p99 2xx``: the server's own histogram (arrival of the request's headers to the end of
  its answer), interpolated within its buckets; it does not see time spent in the kernel's queues.

    .venv/bin/python bench/wrk_predict.py --registry models                   # starts its own server
    .venv/bin/python bench/wrk_predict.py --url http://127.0.0.1:8000 --pid 1234 --levels 256 1024
    .venv/bin/python bench/wrk_predict.py --registry models --server bentoml  # counts from wrk alone

wrk comes from Debian (``apt-get install -y wrk``; bench/compare_bentoml.sh installs it).
JSON: bench/results/wrk-<label>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_predict import ROOT, first_cat, machine_busy_seconds, proc_cpu_seconds, start_server, stop_server
from wrk_counts import Counts, p99_lower_bound_ms, p99_upper_bound_ms, scrape_counts

LUA = Path(__file__).resolve().parent / "wrk_predict.lua"


def find_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk (bench/compare_bentoml.sh does it)")
    return wrk


def run_wrk(url: str, connections: int, seconds: float, image: Path, threads: int, timeout_s: float) -> dict:
    """One wrk run; its WRK_JSON line (wrk_predict.lua's done()) plus its CPU seconds."""
    before = os.times()
    out = subprocess.run(
        [find_wrk(), f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", f"--timeout={timeout_s:g}s",
         "-s", str(LUA), url],
        env={**os.environ, "WRK_IMAGE": str(image)}, capture_output=True, text=True, timeout=seconds + 120,
    )  # fmt: skip
    after = os.times()
    for line in out.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            result = json.loads(line[len("WRK_JSON ") :])
            result["cpu_s"] = (after.children_user - before.children_user) + (
                after.children_system - before.children_system
            )
            return result
    raise SystemExit(f"wrk gave no result (rc {out.returncode}):\n{out.stdout}\n{out.stderr}")


def start_profile(pid: int, path: Path, seconds: float) -> subprocess.Popen:
    """py-spy on the server, all threads, raw (collapsed) stacks: read with bench/pyspy_summary.py."""
    spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen(
        [str(spy), "record", "--pid", str(pid), "--format", "raw", "--threads", "--rate", "100",
         "--duration", str(max(1, int(seconds))), "--nonblocking", "--output", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def level(args: argparse.Namespace, url: str, pid: int | None, connections: int) -> dict[str, Any]:
    """Warm up at ``connections``, then measure ``args.seconds`` of wrk against the server's counts."""
    if args.warmup > 0:
        run_wrk(url, connections, args.warmup, args.image, args.threads, args.timeout)
        time.sleep(0.5)  # the warm-up's last answers are counted before the snapshot
    before = scrape_counts(url)
    cpu0 = proc_cpu_seconds(pid) if pid else None
    busy0, wall0 = machine_busy_seconds(), time.monotonic()
    load = os.getloadavg()[0]
    spy = None
    if args.profile_dir and connections in args.profile_levels and pid:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
        path = args.profile_dir / f"profile-{args.label}-c{connections}.txt"
        spy = start_profile(pid, path, args.seconds - 2)
    wrk = run_wrk(url, connections, args.seconds, args.image, args.threads, args.timeout)
    wall = time.monotonic() - wall0
    busy = machine_busy_seconds() - busy0
    server_cpu = (proc_cpu_seconds(pid) - cpu0) / wall if pid and cpu0 is not None else None
    time.sleep(0.5)
    after = scrape_counts(url)
    if spy is not None:
        spy.wait(timeout=60)
    seconds = wrk["duration_us"] / 1e6
    row: dict[str, Any] = {
        "connections": connections,
        "seconds": round(seconds, 2),
        "wrk_requests": wrk["requests"],
        "wrk_errors": {k: wrk[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")},
        "loadavg_1m_before": round(load, 2),
        "server_cores": round(server_cpu, 2) if server_cpu is not None else None,
        "wrk_cores": round(wrk["cpu_s"] / wall, 2),
        "machine_busy_cores": round(busy / wall, 2),
    }
    if before is not None and after is not None:
        delta: Counts = after - before
        ok, refused = delta.ok, max(0, wrk["requests"] - delta.ok)
        row.update(
            counted_by="server metrics",
            shed=delta.shed,
            edge_refused=max(0, wrk["requests"] - delta.answered),  # uvicorn's own 503s, never seen by the app
            server_p99_2xx_ms=delta.p99_2xx_ms(),
            mean_batch=delta.mean_batch(),
        )
    else:  # not shapserve: what wrk saw (status >= 400 counts as refused)
        ok, refused = wrk["requests"] - wrk["status_errors"], wrk["status_errors"]
        row["counted_by"] = "wrk"
    row.update(
        ok=ok,
        ok_per_s=ok / seconds,
        refused_per_s=refused / seconds,
        p99_all_ms=wrk["quantiles_us"]["99"] / 1000.0,
        p99_2xx_le_ms=p99_upper_bound_ms(wrk["fine_us"], ok, wrk["requests"]),
        p99_2xx_ge_ms=p99_lower_bound_ms(wrk["fine_us"], ok, wrk["requests"]),
    )
    return row


def table(rows: list[dict[str, Any]]) -> str:
    peak = max((r["ok_per_s"] for r in rows), default=0.0) or float("nan")
    lines = [
        "| connections | 2xx/s | goodput % of peak | p99 2xx ms, from wrk: ≥ .. ≤ | server p99 2xx ms | refusals/s"
        " | of which uvicorn's | mean batch | server cores | wrk cores | machine busy cores | load avg |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(value: Any, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    for r in rows:
        edge = r.get("edge_refused")
        lines.append(
            f"| {r['connections']} | {r['ok_per_s']:.1f} | {100 * r['ok_per_s'] / peak:.0f} % | "
            f"{fmt(r['p99_2xx_ge_ms'], '.0f')} .. {fmt(r['p99_2xx_le_ms'], '.0f')} | "
            f"{fmt(r.get('server_p99_2xx_ms'), '.0f')} | "
            f"{r['refused_per_s']:.0f} | {fmt(edge / r['seconds'] if edge is not None else None, '.0f')} | "
            f"{fmt(r.get('mean_batch'), '.1f')} | {fmt(r['server_cores'], '.2f')} | {r['wrk_cores']:.2f} | "
            f"{r['machine_busy_cores']:.2f} | {r['loadavg_1m_before']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (else one is started from --registry)")
    p.add_argument("--pid", type=int, help="with --url: the server's pid (its CPU share, py-spy)")
    p.add_argument("--registry", type=Path, default=ROOT / "models")
    p.add_argument("--version", help="default: promoted, else newest")
    p.add_argument("--server", choices=["shapserve", "bentoml"], default="shapserve")
    p.add_argument("--bento-python", type=Path, default=Path("/work/bento-venv/bin/python"))
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="extra settings for the server")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024], help="wrk connections")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of wrk at the same level first")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (one C thread: a few %% of a core)")
    p.add_argument("--timeout", type=float, default=30.0, help="wrk's per-request timeout (s)")
    p.add_argument("--image", type=Path, help="default: the first cat (32x32 JPEG) of the CIFAR-10 archive")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz")
    p.add_argument("--label", default="run")
    p.add_argument("--profile-levels", type=int, nargs="*", default=[], help="py-spy the server at these levels")
    p.add_argument("--profile-dir", type=Path, default=Path("/tmp/shapserve-bench"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--logs", type=Path, default=Path("/tmp/shapserve-bench"))
    return p.parse_args(argv)


def server_args(args: argparse.Namespace) -> argparse.Namespace:
    """What load_predict.start_server reads, at the server's defaults."""
    from service.settings import Settings

    fields = Settings.model_fields
    return argparse.Namespace(
        registry=args.registry, version=args.version, server=args.server, bento_python=args.bento_python,
        env=args.env, batch_max_size=fields["batch_max_size"].default,
        batch_max_wait_ms=fields["batch_max_wait_ms"].default, torch_threads=0, inference_workers=1,
        device="cpu", precision="auto", no_jit=False,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    find_wrk()
    args.logs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.image is None:
        data, name = first_cat(args.data)
        args.image = args.logs / name
        args.image.write_bytes(data)
    started = datetime.now(UTC)
    proc, url, pid = None, args.url, args.pid
    if url is None:
        proc, url = start_server(server_args(args), True, args.logs / f"wrk-server-{args.label}.log")
        pid = proc.pid
    rows = []
    try:
        for connections in args.levels:
            rows.append(level(args, url, pid, connections))
            r = rows[-1]
            print(f"  c={connections:<5d} {r['ok_per_s']:7.1f} 2xx/s  {r['refused_per_s']:7.0f} refused/s  p99 2xx "
                  f"{r['p99_2xx_ge_ms'] or 0:.0f}..{r['p99_2xx_le_ms'] or 0:.0f} ms "
                  f"(server {r.get('server_p99_2xx_ms') or float('nan'):.0f} ms)",
                  file=sys.stderr, flush=True)  # fmt: skip
    finally:
        if proc is not None:
            stop_server(proc)
    result = {
        "label": args.label, "date": started.isoformat(timespec="seconds"), "server": args.server,
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "env": args.env,
        "cores": len(os.sched_getaffinity(0)), "levels": rows,
    }  # fmt: skip
    path = args.out / f"wrk-{args.label}-{started:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"### {args.label}: {args.server}, wrk -t{args.threads}, {args.seconds:g} s per level after "
          f"{args.warmup:g} s of warm-up, {started:%Y-%m-%d %H:%M} UTC\n")  # fmt: skip
    print(table(rows))
    print(f"\nJSON: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
