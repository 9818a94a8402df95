"""Seconds per explanation on this CPU: the worker's batched KernelSHAP against the plain
pattern and against the model's raw batched forward time, plus seed-to-seed stability.

    .venv/bin/python bench/explain_bench.py [--registry models] [--version V] [--images 5]
        [--samples N] [--backgrounds 1 100] [--plain-images 1] [--sweep 250 500 1000 2000]

For each background size B (default 1 and 100), on the same images and in the same run:

- ``batched``: :func:`worker.explain.explain_image` as a job runs it (SLIC, KernelExplainer with
  the vectorised f, model in batches of ``--batch-size``), warm, threads = every core;
- ``plain``: the shap docs' image example: KernelExplainer over the same segments with an
  ``f`` that masks each coalition in Python (``mask_image``) and calls the model once per
  coalition (on that coalition's B masked images): same samples, same seed;
- ``raw``: the model's batched forward over as many images as ``batched`` evaluated.

Then Spearman rho between the SHAP values of two seeds at the default samples (``--sweep``:
at several sample counts, to choose that default), the first explanation in a freshly forked
process (what each job pays in the forking worker) and the all-defaults time.
"""

from __future__ import annotations

import os

# As the worker sets them (worker/__main__.py), before torch and numpy are imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapcore.agreement import spearman  # noqa: E402
from shapcore.background import summarize_background  # noqa: E402
from shapcore.explain.background import parse_background  # noqa: E402
from shapcore.explain.request import ExplainRequest  # noqa: E402
from shapcore.jobs.settings import ExplainSettings  # noqa: E402
from shapcore.model import to_source_size  # noqa: E402
from shapcore.registry import Registry  # noqa: E402
from worker.explain import ModelRuntime, explain_image  # noqa: E402
from worker.methods.kernel import seeded_numpy  # noqa: E402
from worker.reference import plain_value_function  # noqa: E402
from worker.runtime import prepare_model  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz"


def load_images(archive: Path, count: int) -> list[tuple[str, Image.Image]]:
    """``count`` real CIFAR-10 images, one class after another (the last of each class folder)."""
    per_class: dict[str, tuple[str, bytes]] = {}
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3:
                per_class[parts[1]] = (member.name, tar.extractfile(member).read())
    import io

    names = sorted(per_class)
    out = []
    for i in range(count):
        name, data = per_class[names[i % len(names)]]
        out.append((name, Image.open(io.BytesIO(data)).convert("RGB")))
    return out


def load_image_bytes(archive: Path) -> bytes:
    """The JPEG bytes of the first image of ``load_images`` (what a client would upload)."""
    with tarfile.open(archive, "r|*") as tar:
        last: dict[str, bytes] = {}
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3:
                last[parts[1]] = tar.extractfile(member).read()
    return last[sorted(last)[0]]


def _request(segments: int, samples: int, background: int | str, seed: int) -> ExplainRequest:
    """A KernelSHAP request; ``background`` by name or integer alias (its canonical name)."""
    name = parse_background(background).name
    return ExplainRequest(segments=segments, samples=samples, background=name, seed=seed)


def explain(model, loaded, image, bg, params, batch_size):
    start = time.perf_counter()
    x = to_source_size(image)
    runtime = ModelRuntime(model, loaded.class_names, bg)
    result, seg, _ = explain_image(runtime, params, image, x, batch_size=batch_size)
    return time.perf_counter() - start, result, seg


def plain_time(model, image, seg, bg, samples, seed) -> tuple[float, np.ndarray]:
    import shap

    f = plain_value_function(model, np.asarray(image), seg.labels, bg)
    start = time.perf_counter()
    with seeded_numpy(seed):
        explainer = shap.KernelExplainer(f, np.zeros((1, seg.count)))
        values = explainer.shap_values(np.ones((1, seg.count)), nsamples=samples, l1_reg=False, silent=True)
    return time.perf_counter() - start, np.asarray(values)[0]


def raw_forward_time(model, evaluations: int, batch_size: int, image) -> float:
    x = to_source_size(image).float().div(255).expand(batch_size, -1, -1, -1).contiguous()
    x = x.contiguous(memory_format=torch.channels_last)
    done = 0
    start = time.perf_counter()
    with torch.inference_mode():
        while done < evaluations:
            n = min(batch_size, evaluations - done)
            torch.softmax(model(x[:n]), dim=-1)
            done += n
    return time.perf_counter() - start


def stability(model, loaded, images, bg, segments, samples, batch_size, seeds=(1, 2)) -> dict:
    rhos, times = [], []
    for _, image in images:
        values = []
        for seed in seeds:
            params = _request(segments, samples, len(bg), seed)
            t, result, _ = explain(model, loaded, image, bg, params, batch_size)
            times.append(t)
            values.append(result["shap_values"])
        rhos.append(spearman(*values))
    return {
        "samples": samples,
        "rho_mean": statistics.mean(rhos),
        "rho_min": min(rhos),
        "rho_median": statistics.median(rhos),
        "seconds_mean": statistics.mean(times),
        "rhos": rhos,
    }


def worker_jobs(registry: str, version: str, image: bytes, redis_url: str, count: int, timeout: float = 600) -> dict:
    """``count`` all-defaults jobs through a real ``python -m worker`` (its own env defaults):
    per job, the compute time the job reports and the wall time from submit to finished
    (fork, decode, model already in the parent, SLIC, KernelSHAP, result write)."""
    import signal
    import uuid

    from shapcore.images import explanation_input
    from shapcore.jobs.client import ExplainClient
    from shapcore.jobs.image import JobImage
    from shapcore.jobs.queue import JobRequest

    queue = f"explain-bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "REDIS_URL": redis_url, "MODEL_REGISTRY": registry, "MODEL_VERSION": version,
           "EXPLAIN_QUEUE": queue, "PYTHONUNBUFFERED": "1"}  # fmt: skip
    for name in ("OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS"):  # the worker's own defaults apply
        env.pop(name, None)
    log = Path(f"/tmp/{queue}.log")
    with log.open("wb") as fh:
        cmd = [sys.executable, "-m", "worker"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Listening on" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        settings = ExplainSettings(redis_url=redis_url, explain_queue=queue)
        client = ExplainClient.connect(settings, 2.0)
        decoded = JobImage.from_arrays(  # what POST /explain hands the worker
            *explanation_input(image, settings.max_image_pixels, settings.explain_slic_max_side)
        )
        walls, computes = [], []
        seed_base = uuid.uuid4().int % 2**31
        for seed in range(count):
            request = JobRequest.of(
                image=decoded,
                model_version=version,
                segments=settings.explain_default_segments,
                samples=settings.explain_default_samples,
                background=settings.explain_default_background,
                seed=seed_base + seed,  # fresh seeds: never answered from an earlier run's cache
                target=None,
            )
            start = time.perf_counter()
            job, _ = client.submit(request)
            doc = client.wait([job.id], timeout, poll_s=0.05)[job.id]
            if doc.status != "finished":
                raise RuntimeError(f"bench job {doc.status}: {doc.error}")
            walls.append(time.perf_counter() - start)
            computes.append(doc.result.duration_s)
        return {"jobs": count, "wall_s": walls, "compute_s": computes, "queue": queue}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    defaults = ExplainSettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--registry", default=str(ROOT / "models"))
    p.add_argument("--version", default=None, help="default: promoted, else newest")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--images", type=int, default=5, help="images for the batched timings and rho")
    p.add_argument("--plain-images", type=int, default=1, help="images for the (slow) plain pattern")
    p.add_argument("--segments", type=int, default=defaults.explain_default_segments)
    p.add_argument("--samples", type=int, default=defaults.explain_auto_cap, help="KernelSHAP's nsamples")
    p.add_argument("--default-background", type=int, default=1, help="background images (1: the mean)")
    p.add_argument("--backgrounds", type=int, nargs="*", default=[1, 100], help="none: skip the comparison")
    p.add_argument("--batch-size", type=int, default=defaults.explain_batch_size)
    p.add_argument("--threads", type=int, default=defaults.torch_threads())
    p.add_argument("--sweep", type=int, nargs="*", default=[], help="sample counts for a rho sweep")
    p.add_argument("--sweep-only", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--worker-jobs", type=int, default=0, help="all-defaults jobs through a real python -m worker")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/15", help="for --worker-jobs")
    args = p.parse_args(argv)

    registry = Registry(args.registry)
    version = registry.resolve(args.version)
    jobs = None
    if args.worker_jobs:
        # First, while this process has started no thread pool that would compete with the worker.
        image = load_image_bytes(Path(args.data))
        jobs = worker_jobs(str(registry.root), version, image, args.redis_url, args.worker_jobs)

    torch.set_num_threads(args.threads)
    loaded, _ = prepare_model(registry.load(version))  # as the worker runs it
    model = loaded.model
    images = load_images(Path(args.data), max(args.images, args.plain_images))
    training = subprocess.run(["pgrep", "-f", "training --quiet"], capture_output=True, text=True).stdout.split()
    report: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
        # The values in force (setdefault above set them unless they were given): a record, not a setting.
        "env": {name: os.environ.setdefault(name, "") for name in ("OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS")},
        "model": {"version": loaded.version, "profile": loaded.metadata.get("profile")},
        "segments": args.segments,
        "samples": args.samples,
        "batch_size": args.batch_size,
        "images": [name for name, _ in images[: args.images]],
        "training_running_during_bench": bool(training),
        "load_average_1m_before": os.getloadavg()[0],
        "command": " ".join([".venv/bin/python", "bench/explain_bench.py", *(argv or sys.argv[1:])]),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "images"}), flush=True)
    if jobs:
        report["worker_jobs"] = jobs
        print(f"worker jobs, all defaults: submit-to-finished {statistics.mean(jobs['wall_s']):.2f} s "
              f"(max {max(jobs['wall_s']):.2f}), compute {statistics.mean(jobs['compute_s']):.2f} s, "
              f"{jobs['jobs']} jobs", flush=True)  # fmt: skip

    # warm-up: oneDNN primitives for every batch shape used below
    bg1 = summarize_background(loaded.background(), 1)
    explain(model, loaded, images[0][1], bg1, _request(args.segments, 300, 1, 0), args.batch_size)

    if args.sweep:
        bg = summarize_background(loaded.background(), args.default_background)
        report["sweep"] = []
        for samples in args.sweep:
            row = stability(model, loaded, images[: args.images], bg, args.segments, samples, args.batch_size)
            report["sweep"].append(row)
            print(
                f"sweep B={len(bg)} samples={samples}: rho mean {row['rho_mean']:.3f} min {row['rho_min']:.3f} "
                f"median {row['rho_median']:.3f}, {row['seconds_mean']:.2f} s/explanation",
                flush=True,
            )
        if args.sweep_only:
            _write(args.json, report)
            return 0

    report["runs"] = []
    for b in args.backgrounds:
        bg = summarize_background(loaded.background(), b)
        params = _request(args.segments, args.samples, b, 0)
        batched, raw, plain, evals, agree = [], [], [], [], []
        for i, (_, image) in enumerate(images[: args.images]):
            t, result, seg = explain(model, loaded, image, bg, params, args.batch_size)
            batched.append(t)
            evals.append(result["model_evaluations"])
            raw.append(raw_forward_time(model, result["model_evaluations"], args.batch_size, image))
            if i < args.plain_images:
                tp, values = plain_time(model, image, seg, bg, args.samples, seed=0)
                plain.append(tp)
                agree.append(float(np.abs(values - np.array([c["shap_values"] for c in result["classes"]]).T).max()))
        row = {
            "background": b,
            "load_average_1m_after": os.getloadavg()[0],
            "evaluations": statistics.mean(evals),
            "batched_s": statistics.mean(batched),
            "raw_forward_s": statistics.mean(raw),
            "plain_s": statistics.mean(plain) if plain else None,
            "batched_over_raw": statistics.mean(batched) / statistics.mean(raw),
            "plain_over_batched": (statistics.mean(plain) / statistics.mean(batched[: len(plain)])) if plain else None,
            "max_abs_diff_vs_plain": max(agree) if agree else None,
            "batched_each_s": batched,
        }
        report["runs"].append(row)
        print(
            f"B={b}: {row['evaluations']:.0f} evaluations; batched {row['batched_s']:.2f} s, raw forward "
            f"{row['raw_forward_s']:.2f} s (x{row['batched_over_raw']:.2f}), plain "
            + (f"{row['plain_s']:.2f} s (batched is x{row['plain_over_batched']:.1f} faster, max |diff| "
               f"{row['max_abs_diff_vs_plain']:.1e})" if plain else "-"),
            flush=True,
        )  # fmt: skip

    bg = summarize_background(loaded.background(), args.default_background)
    report["stability"] = stability(model, loaded, images[: args.images], bg, args.segments, args.samples,
                                    args.batch_size)  # fmt: skip
    s = report["stability"]
    print(f"stability at samples={args.samples}, B={len(bg)}: Spearman rho mean {s['rho_mean']:.3f}, "
          f"min {s['rho_min']:.3f} over {len(s['rhos'])} images", flush=True)  # fmt: skip

    params = _request(args.segments, args.samples, args.default_background, 0)
    warm = [explain(model, loaded, image, bg, params, args.batch_size)[0] for _, image in images[: args.images]]
    report["defaults"] = {"in_process_s": warm, "in_process_mean_s": statistics.mean(warm)}
    print(f"all defaults (segments {args.segments}, samples {args.samples}, background {args.default_background}): "
          f"{statistics.mean(warm):.2f} s in process (max {max(warm):.2f})", flush=True)  # fmt: skip
    training = subprocess.run(["pgrep", "-f", "training --quiet"], capture_output=True, text=True).stdout.split()
    report["training_running_after_bench"] = bool(training)
    report["load_average_1m_after"] = os.getloadavg()[0]
    _write(args.json, report)
    return 0


def _write(path: str | None, report: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
