"""Every runtime candidate of the gate on this CPU: raw batched forward rate and top-1 agreement.

    .venv/bin/python bench/runtimes.py --registry models [--version V] [--serving 1 8 32] [--explain 256]
        [--threads 2] [--rounds 5] [--compile] [--explanations torchscript int8 ...] [--json out.json]

The candidates are the ones the model host builds (:meth:`shapcore.host.ModelHost.serving_forms`:
uint8 images -> probabilities, as /predict runs them; the exports cached in the version's
folder like the service's). For each batch size every candidate runs in turn, ``--rounds``
times, each turn at least ``--seconds``; the figure is the median of the rounds' images/s.
Agreement: top-1 equal to fp32 TorchScript's on the version's stored validation sample.
"Chosen" applies the gate's rule (shapcore/gate.py: >= 1.1x, geometric mean over the serving
batch sizes, and >= 99.5 % agreement) to these figures.

``--explanations``: one default explanation (kernel, 50 segments, 5000 samples, mean
background) of the same held-out image per runtime named, in the worker's form
(``EXPLAIN_RUNTIME``), reporting its model-forward seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapcore.gate import MIN_AGREEMENT, MIN_SPEEDUP, Unavailable, batch_of, top1  # noqa: E402
from shapcore.host import ModelHost  # noqa: E402
from shapcore.inference import warm_up  # noqa: E402
from shapcore.registry import Registry  # noqa: E402
from shapcore.runtimes import BASELINE  # noqa: E402


def rates(forms: dict, batch: torch.Tensor, rounds: int, seconds: float) -> dict[str, float]:
    """Median images/s of each form over ``rounds`` turns (forms interleaved), each turn >= ``seconds``."""
    got: dict[str, list[float]] = {name: [] for name in forms}
    with torch.inference_mode():
        for fn in forms.values():
            for _ in range(3):
                fn(batch)
        for _ in range(rounds):
            for name, fn in forms.items():
                count, start = 0, time.perf_counter()
                while count < 2 or time.perf_counter() - start < seconds:
                    fn(batch)
                    count += 1
                got[name].append(count * len(batch) / (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in got.items()}


def explanation_forward(registry: Path, version: str, runtime: str, threads: int, image: torch.Tensor) -> dict:
    from PIL import Image

    from shapcore.explain.request import ExplainRequest
    from shapcore.jobs.settings import ExplainSettings
    from worker.explain import explain_image
    from worker.runtime import Runtime

    torch.set_num_threads(threads)
    settings = ExplainSettings(model_registry=registry, explain_runtime=runtime)
    rt = Runtime(settings).load(version)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")
    request = ExplainRequest(segments=50, samples=5000, background="mean", seed=0)
    result, _, _ = explain_image(rt, request, pil, image, batch_size=settings.explain_batch_size)
    return {"runtime": runtime, "model_forward_s": result["timings_s"]["model_forward"],
            "duration_s": result["duration_s"], "evaluations": result["model_evaluations"],
            "target": result["target"]["label"], "top_phi": max(result["shap_values"], key=abs)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--registry", type=Path, default=ROOT / "models")
    p.add_argument("--version", default=None)
    p.add_argument("--serving", type=int, nargs="+", default=[1, 8, 32], help="the API's batch sizes")
    p.add_argument("--explain", type=int, nargs="*", default=[256], help="the worker's batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--compile", action="store_true", help="include torch.compile (minutes of compiling per shape)")
    p.add_argument("--explanations", nargs="*", default=[])
    p.add_argument("--no-agreement", action="store_true", help="time only (the agreement of an earlier run stands)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    registry = Registry(args.registry)
    loaded = registry.load(args.version)
    host = ModelHost(registry, torch.device("cpu"), runtime="auto", jit=True, batch_sizes=tuple(args.serving),
                     cache_root=ROOT / "var" / "runtime-cache")  # fmt: skip
    fp32, cands = host.serving_forms(loaded)
    warm_up(fp32, max(args.serving))  # as the service does: TorchScript optimised, eager kept where faster
    sample = loaded.validation_sample()
    reference = None if args.no_agreement else top1(fp32, sample)
    forms, report = {BASELINE: fp32}, {BASELINE: {"precision": "fp32", "agreement": 1.0, "build_s": 0.0}}
    for cand in cands:
        if cand.not_in_auto and not args.compile:
            report[cand.name] = {"precision": cand.precision, "status": "not run (--compile)"}
            continue
        start = time.perf_counter()
        try:
            form = cand.build()
            agreement = None if args.no_agreement else float((top1(form, sample) == reference).float().mean())
        except Unavailable as exc:
            report[cand.name] = {"precision": cand.precision, "status": f"unavailable: {exc}"}
            continue
        forms[cand.name] = form
        report[cand.name] = {"precision": cand.precision, "agreement": agreement,
                             "build_s": round(time.perf_counter() - start, 1)}  # fmt: skip
        print(f"{cand.name}: agreement {agreement}, built in {report[cand.name]['build_s']} s", flush=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    for size in [*args.serving, *args.explain]:
        measured = rates(forms, batch_of(sample, size), args.rounds, args.seconds)
        for name, r in measured.items():
            report[name].setdefault("images_per_s", {})[size] = round(r, 1)
        print(f"batch {size}: " + ", ".join(f"{n} {r:.0f}" for n, r in measured.items()), flush=True)
    base = report[BASELINE]["images_per_s"]
    for entry in report.values():
        if "images_per_s" in entry:
            ups = [entry["images_per_s"][s] / base[s] for s in args.serving]
            entry["speedup_serving"] = round(math.exp(sum(map(math.log, ups)) / len(ups)), 2)
            if args.explain:
                entry["speedup_explain"] = round(entry["images_per_s"][args.explain[0]] / base[args.explain[0]], 2)
    ok = [n for n, e in report.items() if n != BASELINE and (e.get("agreement") or 0) >= MIN_AGREEMENT
          and e.get("speedup_serving", 0) >= MIN_SPEEDUP]  # fmt: skip
    chosen = max(ok, key=lambda n: report[n]["speedup_serving"]) if ok else BASELINE
    ok_explain = [n for n, e in report.items() if n != BASELINE and (e.get("agreement") or 0) >= MIN_AGREEMENT
                  and e.get("speedup_explain", 0) >= MIN_SPEEDUP]  # fmt: skip
    chosen_explain = max(ok_explain, key=lambda n: report[n]["speedup_explain"]) if ok_explain else BASELINE
    explanations = []
    if args.explanations:
        image = sample[-1]  # a held-out validation image
        for name in args.explanations:
            explanations.append(explanation_forward(args.registry, loaded.version, name, args.threads, image))
            print(explanations[-1], flush=True)
    out = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("Model name:")[1].split("\n")[0]
        .strip(),
        "loadavg_before_timing": load,
        "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
        "version": loaded.version,
        "input_size": loaded.metadata.get("input_size"),
        "threads": args.threads,
        "validation_images": len(sample),
        "candidates": report,
        "chosen_serving": chosen,
        "chosen_explain": chosen_explain,
        "explanations": explanations,
        "command": " ".join(sys.argv),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
