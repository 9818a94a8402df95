"""Deletion and insertion AUCs of real explanations, their cost, and the noise of the baseline.

    PYTHONPATH=. .venv/bin/python bench/faithfulness_check.py [--registry models] [--version V]
        [--images 10] [--samples 5000] [--method kernel] [--orders 30] [--png out.png]

One real CIFAR-10 training image per class (the first ``--images`` classes), explained as a
job does (:func:`worker.explain.explain_image`, the worker's frozen model, background ``mean``,
50 segments, seed 0). For each: the AUCs against the 3-order random baseline the result
carries, the faithfulness step's share of the job's time and model evaluations, and the same
baseline recomputed with ``--orders`` orders (how far the 3-order mean is from it).
``--png``: the faithfulness figure of the first image, as GET /explain/{id}/faithfulness.png
draws it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapcore.background import make_background  # noqa: E402
from shapcore.explain.background import parse_background  # noqa: E402
from shapcore.explain.request import ExplainRequest  # noqa: E402
from shapcore.faithfulness import faithfulness  # noqa: E402
from shapcore.images import explanation_input  # noqa: E402
from shapcore.registry import Registry  # noqa: E402
from shapcore.value import CoalitionModel  # noqa: E402
from worker.explain import ModelRuntime, explain_image  # noqa: E402
from worker.runtime import prepare_model  # noqa: E402


def one_per_class(archive: Path, count: int) -> list[tuple[str, bytes]]:
    found: dict[str, bytes] = {}
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[1] not in found:
                found[parts[1]] = tar.extractfile(member).read()
                if len(found) == count:
                    break
    return sorted(found.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", default="models")
    ap.add_argument("--version", default=None, help="default: promoted, else newest")
    ap.add_argument("--archive", default="../shared/data/cifar10/train.tar.gz")
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--method", default="kernel")
    ap.add_argument("--orders", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded, eager = prepare_model(Registry(args.registry).load(args.version))
    spec = parse_background("mean", len(loaded.background()))
    rows = []
    for label, data in one_per_class(Path(args.archive), args.images):
        pixels, model_input = explanation_input(data, 16_777_216, 512)
        tensor = torch.from_numpy(model_input)
        bg = make_background(spec, loaded.background(), tensor)
        params = ExplainRequest(segments=50, samples=args.samples, background="mean", seed=0, method=args.method)
        runtime = ModelRuntime(loaded.model, loaded.class_names, bg, autograd_model=eager)
        result, seg, attribution = explain_image(runtime, params, Image.fromarray(pixels), tensor)
        faith, target = result["faithfulness"], result["target"]["index"]
        f = CoalitionModel(loaded.model, tensor, seg.weights, bg)
        many = faithfulness(f, attribution.phi[:, target], target, seed=1, random_orders=args.orders)
        rows.append({
            "class": label, "target": result["target"]["label"], "p": result["target"]["probability"],
            "segments": result["segments"]["count"], "steps": faith["steps"],
            **{k: faith[k] for k in ("deletion_auc", "random_deletion_auc", "insertion_auc", "random_insertion_auc")},
            f"random_deletion_auc_{args.orders}": many["random_deletion_auc"],
            f"random_insertion_auc_{args.orders}": many["random_insertion_auc"],
            "faithfulness_s": result["timings_s"]["faithfulness"], "explainer_s": result["timings_s"]["explainer"],
            "faithfulness_evaluations": result["faithfulness_evaluations"],
            "model_evaluations": result["model_evaluations"],
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        if args.png and len(rows) == 1:
            from service.explain_faithfulness_plot import render_faithfulness

            Path(args.png).write_bytes(render_faithfulness(result))
    summary = {
        "images": len(rows),
        "deletion_below_random": sum(r["deletion_auc"] < r["random_deletion_auc"] for r in rows),
        "insertion_above_random": sum(r["insertion_auc"] > r["random_insertion_auc"] for r in rows),
        "mean_deletion_gap": statistics.mean(r["random_deletion_auc"] - r["deletion_auc"] for r in rows),
        "mean_insertion_gap": statistics.mean(r["insertion_auc"] - r["random_insertion_auc"] for r in rows),
        "baseline_3_vs_many_max_abs": max(
            max(
                abs(r["random_deletion_auc"] - r[f"random_deletion_auc_{args.orders}"]),
                abs(r["random_insertion_auc"] - r[f"random_insertion_auc_{args.orders}"]),
            )
            for r in rows
        ),
        "faithfulness_share_of_time": sum(r["faithfulness_s"] for r in rows)
        / sum(r["faithfulness_s"] + r["explainer_s"] for r in rows),
        "faithfulness_share_of_evaluations": sum(r["faithfulness_evaluations"] for r in rows)
        / sum(r["faithfulness_evaluations"] + r["model_evaluations"] for r in rows),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
