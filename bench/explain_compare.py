"""The explainers side by side on held-out validation images of one version (issue 13).

For each image (the first ``--images`` of a seeded shuffle of the version's held-out 20 %):
a high-sample KernelSHAP reference (``--reference-samples``, ≥ 20000) over the image's
superpixels, then every method at the service's defaults through
:func:`worker.explain.explain_image`, exactly as a job runs it. Per method: seconds per
explanation (the explainer; faithfulness curves apart), model evaluations, deletion and
insertion AUC against the random-order baseline, Spearman ρ of the target class's values
against the reference, the median standard error (sampled methods) and how often
``converged`` came out true.

The references are cached (``--cache``, the one cache and format of ``bench/references.py``:
one ``.npz`` per image and seed under ``<cache>/<version>/``, its settings checked on reading):
they cost most of the run, and a rerun, a change of the methods or ``bench/estimator_real.py``
reuses them. ``--ceiling N`` computes a second reference with another seed on the first N images:
the two references' own ρ is the ceiling of any ρ measured against one (issue 26).

A method may name its own samples, ``--methods kernel:5000 adjusted:auto``, so that today's
default and another run side by side on the same images (``--samples`` for the others).

``--runtime``: the network the methods evaluate. ``torchscript`` (the default): the frozen
fp32 TorchScript form, the one every method ran in before the runtime gate (issue 27).
``auto`` or a runtime's name: the version loaded as a forking worker loads it
(:meth:`shapcore.host.ModelHost.explaining`, the gate measuring its candidates at
``EXPLAIN_BATCH_SIZE``), so that the seconds are what a job takes in the worker; the choice,
its speed-up and agreement are written beside the figures. The references are the fp32
TorchScript form's in both cases.

    .venv/bin/python bench/explain_compare.py --registry models --data ../shared/data/cifar10/train.tar.gz \\
        --images 100 --label s7
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from references import Reference

from shapcore.agreement import relative_l2, spearman
from shapcore.background import make_background
from shapcore.explain.background import parse_background
from shapcore.explain.methods import QUEUED_METHODS as METHODS
from shapcore.explain.request import ExplainRequest
from shapcore.host import ModelHost
from shapcore.jobs.settings import ExplainSettings
from shapcore.registry import Registry
from shapcore.value import CoalitionModel
from worker.explain import ModelRuntime, explain_image
from worker.runtime import prepare_model
from worker.segmentation import segment


def held_out_images(registry: Registry, version: str, data: str, count: int, seed: int) -> dict[str, np.ndarray]:
    """``count`` images of the version's held-out part (a seeded shuffle): uint8 (N, 3, 32, 32),
    labels, their indices in the held-out set, the class names. ``data`` may also be an
    ``.npz`` written by ``--export-images`` (for a machine without the archive)."""
    if data.endswith(".npz"):
        with np.load(data) as npz:
            return {k: npz[k][:count] if k != "class_names" else npz[k] for k in npz.files}
    from training.data import load_images
    from training.evaluate import holdout_subset

    loaded = registry.load(version)
    images = holdout_subset(load_images(data, split=["train"], class_names=loaded.class_names, progress=False),
                            loaded.metadata)  # fmt: skip
    order = torch.randperm(len(images.labels), generator=torch.Generator().manual_seed(seed))[:count]
    return {"images": images.images[order].numpy(), "labels": images.labels[order].numpy(),
            "indices": order.numpy(), "class_names": np.array(images.class_names)}  # fmt: skip


def reference(
    model, image: Image.Image, x: torch.Tensor, fill, args, version: str, index: int, label: int, seed: int = 0
) -> Reference:
    """KernelSHAP at ``--reference-samples`` (``values``: all classes, (M, C)), from the cache when there."""
    from references import checked, compute_reference, read_reference, reference_path, reference_settings

    settings = reference_settings(version, index, seed, args.reference_samples, args.segments, args.slic_compactness,
                                  args.background, args.seed)  # fmt: skip
    path = reference_path(Path(args.cache), version, index, seed)
    if path.exists():
        return checked(read_reference(path), settings)
    seg = segment(image, args.segments, max_side=args.slic_max_side, compactness=args.slic_compactness)
    f = CoalitionModel(model, x, seg.weights, fill, batch_size=args.batch_size, device=args.device)
    return compute_reference(path, f, seg, x.numpy(), label, settings)


def summarise(rows: list[dict]) -> dict:
    med = statistics.median
    beats = [r["deletion_auc"] < r["random_deletion_auc"] and r["insertion_auc"] > r["random_insertion_auc"]
             for r in rows]  # fmt: skip
    stderr = [r["median_stderr"] for r in rows if r["median_stderr"] is not None]
    converged = [r["converged"] for r in rows if r["converged"] is not None]
    return {
        "images": len(rows),
        "seconds_median": med(r["seconds"] for r in rows),
        "evaluations_mean": statistics.mean(r["evaluations"] for r in rows),
        "deletion_auc_median": med(r["deletion_auc"] for r in rows),
        "random_deletion_auc_median": med(r["random_deletion_auc"] for r in rows),
        "insertion_auc_median": med(r["insertion_auc"] for r in rows),
        "random_insertion_auc_median": med(r["random_insertion_auc"] for r in rows),
        "beats_random_both_share": sum(beats) / len(beats),
        "beats_random_deletion_share": sum(r["deletion_auc"] < r["random_deletion_auc"] for r in rows) / len(rows),
        "beats_random_insertion_share": sum(r["insertion_auc"] > r["random_insertion_auc"] for r in rows) / len(rows),
        "rho_median": med(r["rho"] for r in rows),
        "relative_l2_median": med(r["relative_l2"] for r in rows),
        "rho_at_least_0.9_share": sum(r["rho"] >= 0.9 for r in rows) / len(rows),
        "median_stderr": med(stderr) if stderr else None,
        "converged_share": sum(converged) / len(converged) if converged else None,
    }


def _method(value: str) -> str:
    name, _, samples = value.partition(":")
    if name not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {name!r} (one of {', '.join(METHODS)})")
    if samples and samples != "auto" and not samples.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: the samples after ':' are a number or auto")
    return value


def _samples_of(method: str, default: int | str) -> tuple[str, int | str]:
    """``kernel:5000`` -> ("kernel", 5000); ``adjusted`` -> ("adjusted", ``default``)."""
    name, _, samples = method.partition(":")
    return name, (int(samples) if samples.isdigit() else samples) if samples else default


def main() -> None:
    defaults = ExplainSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--registry", default="models")
    p.add_argument("--version", default=None, help="default: promoted, else newest")
    p.add_argument("--data", default="../shared/data/cifar10/train.tar.gz", help="the version's training data")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="shuffle of the held-out images")
    p.add_argument("--methods", nargs="*", default=list(METHODS), type=_method,
                   help=f"of {', '.join(METHODS)}; NAME:SAMPLES gives that method its own samples (a budget or auto)")
    p.add_argument("--ceiling", type=int, default=0, help="a second reference (seed 1) on the first N images")
    p.add_argument("--segments", type=int, default=defaults.explain_default_segments)
    p.add_argument("--samples", type=lambda v: v if v == "auto" else int(v), default=defaults.explain_default_samples,
                   help="auto (the default: the sampled methods that can stop when converged do; the others spend "
                   "EXPLAIN_AUTO_CAP) or an integer")
    p.add_argument("--background", default=defaults.explain_default_background)
    p.add_argument("--reference-samples", type=int, default=20000)
    p.add_argument("--slic-max-side", type=int, default=defaults.explain_slic_max_side)
    p.add_argument("--slic-compactness", type=float, default=defaults.explain_slic_compactness)
    p.add_argument("--batch-size", type=int, default=defaults.explain_batch_size)
    p.add_argument("--threads", type=int, default=defaults.torch_threads())
    p.add_argument("--cache", default="/work/refcache", help="bench/references.py's cache (its DEFAULT_CACHE)")
    p.add_argument("--references-only", action="store_true", help="fill the reference cache and stop")
    p.add_argument("--export-images", metavar="NPZ", help="write the picked images to this .npz and stop")
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32: TF32 off, for the same figures)")
    p.add_argument("--runtime", default="torchscript",
                   help="torchscript (frozen fp32), or auto / a runtime's name: as a forking worker loads the version")
    p.add_argument("--label", default="run")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    registry = Registry(args.registry)
    version = registry.resolve(args.version)
    data = held_out_images(registry, version, args.data, args.images, args.seed)
    if args.export_images:
        np.savez_compressed(args.export_images, **data)
        return
    choice = None
    if args.device == "cpu":
        loaded, eager = prepare_model(registry.load(version))  # the references' form
    else:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        loaded = registry.load(version, device=args.device)
        eager = loaded.model.eval()
    explained = loaded.model
    if args.runtime != "torchscript":
        hosted = ModelHost(registry, torch.device(args.device), runtime=args.runtime, batch_sizes=(args.batch_size,),
                           forks=True).explaining(version)  # fmt: skip
        explained, choice = hosted.model, dataclasses.asdict(hosted.runtime)
        print(f"runtime {hosted.runtime.chosen}: {hosted.runtime.reason}", flush=True)
    args.runtime_choice = choice
    spec = parse_background(args.background, len(loaded.background()))
    started = datetime.now(UTC)
    per_method: dict[str, list[dict]] = {m: [] for m in args.methods}
    ceiling: list[dict] = []
    picked = [int(i) for i in data["indices"]]
    for n, index in enumerate(picked, 1):
        x = torch.from_numpy(data["images"][n - 1])
        image = Image.fromarray(x.permute(1, 2, 0).numpy(), "RGB")
        fill = make_background(spec, loaded.background(), x)
        t0 = time.perf_counter()
        label = int(data["labels"][n - 1])
        first = reference(loaded.model, image, x, fill, args, version, index, label)
        ref = first.values
        ref_s = time.perf_counter() - t0
        if n <= args.ceiling:
            second = reference(loaded.model, image, x, fill, args, version, index, label, seed=1).values
            target = first.target  # the predicted class
            ceiling.append({"index": index, "rho": spearman(second[:, target], ref[:, target]),
                            "relative_l2": relative_l2(second[:, target], ref[:, target])})  # fmt: skip
            print(f"[{n}] ceiling: the two references agree at rho {ceiling[-1]['rho']:.3f}", flush=True)
        if args.references_only:
            print(f"[{n}/{len(picked)}] reference {ref.shape} in {ref_s:.1f} s", flush=True)
            continue
        line = [f"[{n}/{len(picked)}] {data['class_names'][int(data['labels'][n - 1])]}"]
        for key in args.methods:
            method, samples = _samples_of(key, args.samples)
            params = ExplainRequest(segments=args.segments, samples=samples, background=spec.name, seed=n,
                                    method=method, slic_compactness=args.slic_compactness)  # fmt: skip
            runtime = ModelRuntime(explained, loaded.class_names, fill, autograd_model=eager, device=args.device)
            result, _, _ = explain_image(runtime, params, image, x, batch_size=args.batch_size,
                                         slic_max_side=args.slic_max_side)  # fmt: skip
            target = result["target"]["index"]
            ours = np.asarray(result["shap_values"])
            assert ours.shape == ref[:, target].shape, "the segmentation differs from the reference's"
            faith = result["faithfulness"]
            se = result["standard_errors"]
            row = {
                "index": index,
                "seconds": result["timings_s"]["explainer"],
                "evaluations": result["model_evaluations"],
                "rho": spearman(ours, ref[:, target]),
                "median_stderr": float(np.median(se)) if se is not None else None,
                "converged": result["convergence"].get("converged"),
                "relative_l2": relative_l2(ours, ref[:, target]),
                **{k: faith[k] for k in ("deletion_auc", "insertion_auc", "random_deletion_auc",
                                         "random_insertion_auc")},
            }
            per_method[key].append(row)
            line.append(f"{key} {row['seconds']:.2f}s rho {row['rho']:.2f} "
                        f"del {row['deletion_auc']:.3f}/{row['random_deletion_auc']:.3f} "
                        f"ins {row['insertion_auc']:.3f}/{row['random_insertion_auc']:.3f}")  # fmt: skip
        print(" | ".join(line), flush=True)
        if n % 5 == 0 and not args.references_only:
            write(args, version, started, per_method, ceiling)  # a run cut short still leaves its figures
    if args.references_only:
        return
    summary = write(args, version, started, per_method, ceiling)
    print("\n| method | s / explanation | model evaluations | deletion AUC (random) | insertion AUC (random) "
          "| beats random on both | Spearman ρ vs reference (share ≥ 0.9) | median stderr | converged |")
    print("|---|---:|---:|---|---|---:|---|---:|---:|")
    for m, s in summary.items():
        if m == "reference-ceiling":
            print(f"\nthe references' own agreement (seed 0 vs 1) on {s['images']} images: median rho "
                  f"{s['rho_median']:.3f}, relative L2 {s['relative_l2_median']:.3f}")
            continue
        stderr = f"{s['median_stderr']:.4f}" if s["median_stderr"] is not None else "–"
        conv = f"{s['converged_share']:.0%}" if s["converged_share"] is not None else "–"
        print(f"| {m} | {s['seconds_median']:.2f} | {s['evaluations_mean']:.0f} | "
              f"{s['deletion_auc_median']:.3f} ({s['random_deletion_auc_median']:.3f}) | "
              f"{s['insertion_auc_median']:.3f} ({s['random_insertion_auc_median']:.3f}) | "
              f"{s['beats_random_both_share']:.0%} | {s['rho_median']:.3f} ({s['rho_at_least_0.9_share']:.0%}) | "
              f"{stderr} | {conv} |")  # fmt: skip


def write(
    args: argparse.Namespace, version: str, started: datetime, per_method: dict[str, list[dict]], ceiling: list[dict]
) -> dict:
    summary = {m: summarise(rows) for m, rows in per_method.items() if rows}
    if ceiling:
        summary["reference-ceiling"] = {
            "images": len(ceiling),
            "rho_median": statistics.median(c["rho"] for c in ceiling),
            "relative_l2_median": statistics.median(c["relative_l2"] for c in ceiling),
        }
    out = Path(args.out) / f"explain-compare-{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
        "device": args.device, "cpus": torch.get_num_threads(), "version": version, "args": vars(args),
        "summary": summary, "per_method": per_method, "ceiling": ceiling,
    }, indent=1))  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
