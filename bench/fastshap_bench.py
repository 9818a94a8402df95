"""The amortised explainer (method=fast) against a high-sample KernelSHAP, value for value (issue 17).

    PYTHONPATH=. .venv/bin/python bench/fastshap_bench.py --registry models [--version V]
        --data ../shared/data/cifar10/train.tar.gz [--images 100] [--reference-images 100]
        [--reference-samples 20000] [--kernel-samples 5000] [--methods gradcam,integrated_gradients]
        [--out bench/results/fastshap.jsonl] [--explainer PATH]

Images: ``--images`` held-out validation images of the version (its own 20 % split, a fixed
random pick, seed 0). Players: the 8×8 grid (64 cells of 4×4 px) for every method, fill
``mean``: the value function is the one the explainer was fitted against, so all estimate
the same numbers.

- **reference**: KernelSHAP (``shap.KernelExplainer``, the worker's call) with
  ``--reference-samples`` coalitions, on the first ``--reference-images`` images;
- **fast**: the version's explainer (one forward pass); ρ (Spearman, over the 64 players of
  the predicted class) and the L2 error against the reference;
- **kernel**: KernelSHAP at the service's default ``--kernel-samples``, another seed; the same
  figures, so "fast" can be read beside what a default job gives;
- ``--methods``: other explainers of the worker (partition, gradcam, integrated_gradients)
  over the same players;
- every method's deletion and insertion AUC (:mod:`shapcore.faithfulness`: 32 steps, the
  same fill), beside the random-order baseline;
- each method's *coalition gain*: on 64 held-out coalitions per image (the fit's Shapley-kernel
  distribution, in pairs), the share of the even split's squared error in ``v(s) − v(∅)`` that
  the method's values remove (the fit's validation figure; no additive model reaches 1 on a
  non-additive game, so the reference's own gain is the ceiling to read it against);
- the explainer's forward pass at batch 1 in this process (p50, p90; 1 and all threads).

Every image's figures are appended to ``--out`` as they come (a long run can be cut short and
summarised with ``--summarise``); the summary is printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapcore.agreement import relative_l2, spearman  # noqa: E402
from shapcore.background import summarize_background  # noqa: E402
from shapcore.errors import UserError  # noqa: E402
from shapcore.faithfulness import faithfulness  # noqa: E402
from shapcore.fastshap import EXPLAINER_FILE, load_explainer  # noqa: E402
from shapcore.players import grid_weights  # noqa: E402
from shapcore.registry import Registry  # noqa: E402
from shapcore.value import CoalitionModel  # noqa: E402
from training.fastshap import sample_coalitions  # noqa: E402
from worker.methods import MethodContext, run_method  # noqa: E402
from worker.methods.kernel import kernel_shap  # noqa: E402
from worker.runtime import prepare_model  # noqa: E402


def forward_latency(explainer, threads: int, repeats: int = 300) -> dict[str, float]:
    torch.set_num_threads(threads)
    x = torch.rand(1, 3, 32, 32)
    grand = torch.full((1, explainer.net.classes), 1.0 / explainer.net.classes)
    times = []
    for i in range(repeats + 20):
        t0 = time.perf_counter()
        explainer.explain(x, grand)
        if i >= 20:
            times.append(1000.0 * (time.perf_counter() - t0))
    times.sort()
    return {"threads": threads, "p50_ms": times[len(times) // 2], "p90_ms": times[int(0.9 * len(times))]}


def held_out(registry: Registry, version: str, data: str, count: int) -> torch.Tensor:
    from training.data import load_images
    from training.evaluate import holdout_subset

    loaded = registry.load(version)
    images = holdout_subset(load_images(data, ["train"], class_names=loaded.class_names, progress=False),
                            loaded.metadata)  # fmt: skip
    pick = torch.randperm(len(images.images), generator=torch.Generator().manual_seed(0))[:count]
    return images.images[pick]


def summarise(rows: list[dict]) -> dict:
    methods = sorted({m for r in rows for m in r["methods"]})
    out: dict = {"images": len(rows), "reference_images": sum(1 for r in rows if "reference" in r["methods"])}
    for name in methods:
        got = [r["methods"][name] for r in rows if name in r["methods"]]
        entry = {
            "images": len(got),
            "deletion_auc": statistics.fmean(g["deletion_auc"] for g in got),
            "insertion_auc": statistics.fmean(g["insertion_auc"] for g in got),
            "random_deletion_auc": statistics.fmean(g["random_deletion_auc"] for g in got),
            "random_insertion_auc": statistics.fmean(g["random_insertion_auc"] for g in got),
            "seconds_per_image": statistics.fmean(g["seconds"] for g in got),
            "median_coalition_gain": statistics.median(g["coalition_gain"] for g in got),
        }
        vs = [g for g in got if "rho" in g]
        if vs:
            entry.update(
                compared=len(vs),
                median_rho=statistics.median(g["rho"] for g in vs),
                mean_rho=statistics.fmean(g["rho"] for g in vs),
                median_l2=statistics.median(g["l2"] for g in vs),
                median_relative_l2=statistics.median(g["relative_l2"] for g in vs),
            )
        out[name] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", default="models")
    ap.add_argument("--version", default=None)
    ap.add_argument("--data", default="../shared/data/cifar10/train.tar.gz")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--reference-images", type=int, default=None, help="default: all --images")
    ap.add_argument("--reference-samples", type=int, default=20_000)
    ap.add_argument("--kernel-samples", type=int, default=5000)
    ap.add_argument("--methods", default="gradcam,integrated_gradients")
    ap.add_argument("--out", default="bench/results/fastshap.jsonl")
    ap.add_argument("--summarise", action="store_true", help="only summarise --out")
    ap.add_argument("--explainer", type=Path, default=None,
                    help="score this explainer file as fast (default: the version's own)")  # fmt: skip
    ap.add_argument("--cache", type=Path, default=None,
                    help="an .npz of the other methods' values per image: reused when present (only fast is "
                    "recomputed: a refitted explainer is scored against the same reference), written otherwise")
    args = ap.parse_args()
    out = Path(args.out)
    if args.summarise:
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        print(json.dumps(summarise([r for r in lines if "methods" in r]), indent=2))  # the first line is the header
        return

    registry = Registry(args.registry)
    version = registry.resolve(args.version)
    loaded = registry.load(version)
    cores = max(1, len(os.sched_getaffinity(0)))
    try:
        path = args.explainer or loaded.path / EXPLAINER_FILE
        explainer = load_explainer(path, version=version, class_names=loaded.class_names)
    except UserError as exc:  # the other methods can still fill the cache; fast is scored on a rerun
        print(f"no usable explainer ({exc}): fast is left out", file=sys.stderr)
        explainer = None
    latency = [forward_latency(explainer, 1), forward_latency(explainer, cores)] if explainer else None
    torch.set_num_threads(cores)
    header = {"version": version, "explainer": explainer and {k: explainer.meta.get(k) for k in
              ("fit_seconds", "steps", "images_seen", "labelled_images", "validation_gain", "validation_rho",
               "network", "config")},
              "forward_latency": latency, "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    print(json.dumps(header), flush=True)
    loaded, autograd = prepare_model(loaded)
    fill = summarize_background(loaded.background(), 1)
    A = grid_weights()
    images = held_out(registry, version, args.data, args.images)
    ref_images = args.images if args.reference_images is None else args.reference_images
    others = [m for m in args.methods.split(",") if m]
    rows = []
    cache: dict[str, np.ndarray] = dict(np.load(args.cache)) if args.cache and args.cache.is_file() else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        fh.write(json.dumps({"header": header}) + "\n")
        for i, image in enumerate(images):
            f = CoalitionModel(loaded.model, image, A, fill)
            fx = f.fx()
            target = int(np.argmax(fx))
            phis: dict[str, np.ndarray] = {}
            seconds: dict[str, float] = {}
            if explainer is not None:
                t0 = time.perf_counter()
                grand = torch.tensor(fx, dtype=torch.float32).unsqueeze(0)
                phis["fast"] = explainer.explain(image.float().unsqueeze(0) / 255.0, grand)[0].double().numpy()
                seconds["fast"] = time.perf_counter() - t0
            wanted = (["reference"] if i < ref_images else []) + ["kernel", *others]
            for name in wanted:
                if f"{name}/{i}" in cache:
                    phis[name], seconds[name] = cache[f"{name}/{i}"], float(cache[f"{name}/{i}/seconds"])
                    continue
                t0 = time.perf_counter()
                if name in ("reference", "kernel"):
                    reference = name == "reference"
                    samples, seed = (args.reference_samples, 10_000 + i) if reference else (args.kernel_samples, i)
                    phis[name] = kernel_shap(f, A.shape[0], samples, seed=seed)["phi"]
                else:
                    ctx = MethodContext(f=f, autograd_model=autograd, samples=args.kernel_samples, seed=i,
                                        target=target)  # fmt: skip
                    phis[name] = run_method(name, ctx).phi
                seconds[name] = time.perf_counter() - t0
                cache[f"{name}/{i}"], cache[f"{name}/{i}/seconds"] = phis[name], np.array(seconds[name])
            row: dict = {"image": i, "target": target, "probability": float(fx[target]), "methods": {}}
            # held-out coalitions (the fit's distribution): how much of v(s) − v(∅) each method's
            # additive model explains beyond the even split (0: no better; the fit's "gain")
            held = sample_coalitions(1, 32, A.shape[0], torch.Generator().manual_seed(50_000 + i))[0].numpy()
            v_held = f(held) - f(np.zeros((1, A.shape[0])))
            even = np.outer(held.sum(axis=1), (fx - f(np.zeros((1, A.shape[0])))[0]) / A.shape[0])
            even_error = float(((even - v_held) ** 2).sum())
            for name, phi in phis.items():
                faith = faithfulness(f, phi[:, target], target, seed=i)
                entry = {k: faith[k] for k in ("deletion_auc", "insertion_auc", "random_deletion_auc",
                                               "random_insertion_auc")}  # fmt: skip
                entry["seconds"] = seconds[name]
                entry["coalition_gain"] = 1.0 - float(((held @ phi - v_held) ** 2).sum()) / max(even_error, 1e-30)
                if "reference" in phis and name != "reference":
                    ref = phis["reference"][:, target]
                    diff = float(np.linalg.norm(phi[:, target] - ref))
                    entry.update(rho=spearman(phi[:, target], ref), l2=diff,
                                 relative_l2=relative_l2(phi[:, target], ref))  # fmt: skip
                row["methods"][name] = entry
            rows.append(row)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            if args.cache:
                np.savez(args.cache, **cache)
            brief = {n: round(e.get("rho", float("nan")), 3) for n, e in row["methods"].items()}
            print(f"image {i + 1}/{len(images)}: rho {brief}", file=sys.stderr, flush=True)
    print(json.dumps(summarise(rows), indent=2))


if __name__ == "__main__":
    main()
