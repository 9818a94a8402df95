"""Model-randomisation sanity checks (Adebayo et al. 2018) of every explainer, on a real model,
and each explainer's seconds per explanation at the defaults.

    PYTHONPATH=. .venv/bin/python bench/sanity_checks.py --registry models --version V [--images 5]
        [--samples 500] [--segments 50] [--timing-samples 5000] [--threads 1] [--json out.json]

For every method and image: :func:`worker.sanity.cascading_randomisation` (fc, layer4, layer3,
layer2, layer1, stem re-initialised cumulatively), the Spearman ρ of the target class's
per-superpixel values per unit area with the trained model's; the table is the median |ρ|
(absolute values, as in the paper) over the images per method and step, with the signed ρ and
the ρ of the raw per-superpixel sums beside it. A model-independent stand-in (each
superpixel's brightness) is run too: it must stay at 1. The sampling methods run at
``--samples`` in the cascade (seven explanations per image on the eager network), to keep the
run short. Then one timed explanation per method at the service's defaults (segments 50,
``--timing-samples`` for kernel and partition, the ``mean`` fill, frozen model for the value
function), after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz"

from explain_bench import cpu_name, load_images  # noqa: E402  (bench/ is this script's folder)

from shapcore.background import make_background  # noqa: E402
from shapcore.explain.background import parse_background  # noqa: E402
from shapcore.explain.methods import QUEUED_METHODS as METHODS  # noqa: E402
from shapcore.model import to_source_size  # noqa: E402
from shapcore.registry import Registry  # noqa: E402
from shapcore.value import CoalitionModel  # noqa: E402
from worker.methods import Attribution, MethodContext, run_method  # noqa: E402
from worker.methods.base import per_superpixel  # noqa: E402
from worker.runtime import prepare_model  # noqa: E402
from worker.sanity import cascading_randomisation  # noqa: E402
from worker.segmentation import segment  # noqa: E402


def brightness(ctx: MethodContext) -> Attribution:
    """The stand-in that never looks at the model: each superpixel's summed brightness."""
    grey = ctx.f.x[0, 0].mean(dim=0).double().numpy()
    maps = np.repeat(grey[None], ctx.f.classes, axis=0)
    return Attribution(phi=per_superpixel(maps, ctx.f.A.numpy()), base=ctx.f.fx() * 0, fx=ctx.f.fx(),
                       convergence={"converged": None, "criterion": "none"}, pixel_maps=maps)


def sanity_table(eager, loaded, images, args) -> dict:
    methods: list = [*METHODS, brightness]
    runs: dict[str, list[dict]] = {}
    for name, image in images:
        model_input = to_source_size(image)
        seg = segment(image, args.segments)
        fill = make_background(parse_background("mean", 100), loaded.background(), model_input)
        for method in methods:
            label = method if isinstance(method, str) else "brightness (stand-in)"
            started = time.perf_counter()
            result = cascading_randomisation(method, eager, model_input, seg.weights, fill,
                                             samples=args.samples, seed=0)
            runs.setdefault(label, []).append({"image": name, "segments": seg.count, "target": result.target,
                                               "seconds": time.perf_counter() - started, "steps": result.table()})
            print(f"{label:24s} {name}: " + " ".join(f"{k}={v['abs']:+.2f}" for k, v in result.table().items()),
                  flush=True)
    table = {}
    for label, per_image in runs.items():
        steps = per_image[0]["steps"].keys()
        table[label] = {
            step: {kind: statistics.median(abs(r["steps"][step][kind]) for r in per_image)
                   for kind in ("abs", "signed", "abs_sum")}
            for step in steps
        }
    return {"median_abs_rho": table, "runs": runs}


def timings(loaded, eager, image, args) -> dict:
    model_input = to_source_size(image)
    out = {}
    for method in METHODS:
        seconds = []
        for _ in range(2):  # warm-up (TorchScript's profiling runs, numba's compile), then timed
            started = time.perf_counter()
            seg = segment(image, args.segments)
            fill = make_background(parse_background("mean", 100), loaded.background(), model_input)
            f = CoalitionModel(loaded.model, model_input, seg.weights, fill)
            samples = args.timing_samples if method in ("kernel", "partition") else 0
            ctx = MethodContext(f=f, autograd_model=eager, samples=samples, seed=0, target=int(np.argmax(f.fx())))
            attribution = run_method(method, ctx)
            seconds.append(time.perf_counter() - started)
        out[method] = {"seconds": seconds[-1], "first_seconds": seconds[0], "evaluations": f.evaluations,
                       "convergence": attribution.convergence, "segments": seg.count, **attribution.extra}
        print(f"{method:24s} {seconds[-1]:.1f} s (first {seconds[0]:.1f} s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--registry", default=str(ROOT / "models"))
    p.add_argument("--version", default=None)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--segments", type=int, default=50)
    p.add_argument("--samples", type=int, default=500, help="kernel/partition budget inside the cascade")
    p.add_argument("--timing-samples", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    registry = Registry(args.registry)
    version = registry.resolve(args.version)
    loaded, eager = prepare_model(registry.load(version, device="cpu"))
    images = load_images(Path(args.data), args.images)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "threads": args.threads,
        "version": version,
        "args": vars(args),
        "sanity": sanity_table(eager, loaded, images, args),
    }
    if not args.skip_timing:
        report["timings"] = timings(loaded, eager, images[0][1], args)
    path = args.json or str(ROOT / "bench" / "results" / f"sanity-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(json.dumps(report["sanity"]["median_abs_rho"], indent=1))
    print("written", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
