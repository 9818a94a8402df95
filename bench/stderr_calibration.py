"""Which standard error of KernelSHAP's values is right: estimated against the seed-to-seed truth.

    PYTHONPATH=. .venv/bin/python bench/stderr_calibration.py [--registry models] [--version V]
        [--images 3] [--seeds 20] [--halves-seeds 8] [--sweep-images 10] [--skip-synthetic]

Estimators (one explanation each, except ``halves``):

- ``bootstrap``: the drawn coalitions resampled, the regression re-solved (what the worker reports);
- ``sandwich``: the regression's sandwich covariance over draws (its linearisation);
- ``halves``: two explanations at samples/2 with independent seeds, averaged; se = |φ₁ − φ₂| / 2.

Truth: (a) synthetic value functions with exact Shapley values (``tests/support/shapley_games.py``),
(b) the real model on held-out CIFAR-10 images (segments 50, samples 5000, background mean),
where the seed-to-seed spread is the truth and the mean over seeds stands in for the exact
values. Per estimator: the median over (superpixel, class) of mean estimated se / seed sd,
and the coverage of ±2·se intervals. Then the convergence rule on ``--sweep-images`` images
at several sample counts (and segments 200 at samples 20, raised to the 400 floor), and the
bootstrap's time against the explanation's.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.shapley_games import pairwise_game, saturating_game  # noqa: E402
from worker.methods.kernel import kernel_shap, kernel_uncertainty  # noqa: E402
from worker.uncertainty import bootstrap_stderr, design_from, sandwich_stderr  # noqa: E402

SYNTHETIC = [  # (game, M, samples)
    ("pairwise", 50, 5000),
    ("pairwise", 50, 1000),
    ("pairwise", 200, 20),
    ("pairwise", 200, 400),
    ("pairwise", 200, 1000),
    ("saturating", 12, 300),
    ("saturating", 12, 1000),
]


def calibration(values: np.ndarray, errors: dict[str, np.ndarray], truth: np.ndarray | None) -> dict[str, dict]:
    """values (S, M, C); errors name -> (S, M, C) or (values', se) pairs; truth (M, C) or None (seed mean)."""
    out = {}
    for name, item in errors.items():
        vals, se = item if isinstance(item, tuple) else (values, item)
        centre = vals.mean(axis=0) if truth is None else truth
        sd = vals.std(axis=0, ddof=1)
        live = sd > 1e-12
        ratio = se.mean(axis=0)[live] / sd[live]
        out[name] = {
            "ratio_median": float(np.median(ratio)) if ratio.size else float("nan"),
            "coverage_2se": float(np.mean((np.abs(vals - centre) <= 2 * se)[:, live])) if ratio.size else float("nan"),
            "relative_se_target": float(np.median(se[:, :, 0].max(axis=1) / np.abs(vals[:, :, 0]).max(axis=1))),
        }
    return out


def explain_many(f, m: int, samples: int, seeds: range, halves_seeds: int) -> dict:
    """φ and every estimator's se over ``seeds``; halves over the first ``halves_seeds``."""
    values, boot, sand, t_explain, t_boot = [], [], [], [], []
    for seed in seeds:
        start = time.perf_counter()
        out = kernel_shap(f, m, samples, seed)
        t_explain.append(time.perf_counter() - start)
        design = design_from(out["explainer"])
        start = time.perf_counter()
        boot.append(bootstrap_stderr(design, seed=seed))
        t_boot.append(time.perf_counter() - start)
        sand.append(sandwich_stderr(design, out["phi"]))
        values.append(out["phi"])
    half_vals, half_se = [], []
    for seed in list(seeds)[:halves_seeds]:
        a = kernel_shap(f, m, samples // 2, 10_000 + 2 * seed)["phi"]
        b = kernel_shap(f, m, samples // 2, 10_001 + 2 * seed)["phi"]
        half_vals.append((a + b) / 2)
        half_se.append(np.abs(a - b) / 2)
    errors = {"bootstrap": np.array(boot), "sandwich": np.array(sand)}
    if half_vals:
        errors["halves"] = (np.array(half_vals), np.array(half_se))
    return {"values": np.array(values), "errors": errors, "explain_s": t_explain, "bootstrap_s": t_boot}


def synthetic(seeds: int, halves_seeds: int) -> list[dict]:
    rows = []
    for game_name, m, samples in SYNTHETIC:
        game = (pairwise_game if game_name == "pairwise" else saturating_game)(m, seed=1)
        run = explain_many(game.f, m, samples, range(seeds), halves_seeds)
        for name, stats in calibration(run["values"], run["errors"], game.exact).items():
            rows.append({"case": f"{game_name} M={m} samples={samples}", "estimator": name, **stats})
    return rows


def load_real(registry: str, version: str, data: str, count: int, offset: int = 0):
    """The model (TorchScript, as the worker runs it), the mean fill and ``count`` held-out images."""
    import torch
    from PIL import Image

    from shapcore.background import make_background
    from shapcore.explain.background import parse_background
    from shapcore.registry import Registry
    from training.data import load_images
    from training.evaluate import holdout_subset
    from worker.runtime import prepare_model

    loaded = Registry(registry).load(version)
    loaded, _ = prepare_model(loaded)
    held = holdout_subset(load_images(data, "train", progress=False), loaded.metadata)
    pick = torch.arange(offset, offset + count) * (len(held.images) // (offset + count + 1))
    images = [held.images[int(i)] for i in pick]
    bg = make_background(parse_background("mean", 100), loaded.background(), images[0])
    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
    return loaded, bg, list(zip(pil, images, strict=True))


def value_function(loaded, bg, image, x, segments: int):
    from shapcore.value import CoalitionModel
    from worker.segmentation import segment

    seg = segment(image, segments)
    return CoalitionModel(loaded.model, x, seg.weights, bg), seg.count


def real_calibration(loaded, bg, images, seeds: int, halves_seeds: int, samples: int) -> tuple[list[dict], dict]:
    """Per image: the estimators against the seed-to-seed spread; and the bootstrap's share of time."""
    rows, explain_s, boot_s = [], [], []
    for i, (image, x) in enumerate(images):
        f, m = value_function(loaded, bg, image, x, 50)
        run = explain_many(f, m, samples, range(seeds), halves_seeds)
        explain_s += run["explain_s"]
        boot_s += run["bootstrap_s"]
        for name, stats in calibration(run["values"], run["errors"], None).items():
            rows.append({"case": f"real image {i} M={m} samples={samples}", "estimator": name, **stats})
        print(f"  image {i}: M={m}, {np.mean(run['explain_s']):.2f} s per explanation", flush=True)
    cost = {
        "explanation_s_median": float(np.median(explain_s)),
        "bootstrap_s_median": float(np.median(boot_s)),
        "bootstrap_share": float(np.median(boot_s) / np.median(explain_s)),
    }
    return rows, cost


def convergence_sweep(loaded, bg, images, settings: list[tuple[int, int]]) -> list[dict]:
    """The convergence verdict (worker code path: floor, bootstrap, rule) per image and setting."""
    from shapcore.explain.request import min_samples

    rows = []
    for segments, samples in settings:
        verdicts = []
        for image, x in images:
            f, m = value_function(loaded, bg, image, x, segments)
            out = kernel_shap(f, m, max(samples, min_samples(m)), seed=0)
            target = int(np.argmax(out["fx"]))
            _, conv = kernel_uncertainty(out, target, seed=0)
            verdicts.append(conv)
        values = [v["value"] for v in verdicts]
        rows.append({
            "segments": segments,
            "samples": samples,
            "converged_fraction": float(np.mean([v["converged"] for v in verdicts])),
            "max_stderr_ratio_median": float(np.median(values)),
            "max_stderr_ratio_max": float(np.max(values)),
            "max_stderr_ratio_min": float(np.min(values)),
            "max_stderr_ratio": [float(v) for v in values],
        })  # fmt: skip
        print(f"  segments {segments} samples {samples}: {rows[-1]}", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'case':34s} {'estimator':10s} {'se/sd':>7s} {'cover±2se':>9s} {'class0 maxse/max|φ|':>19s}")
    for r in rows:
        print(f"{r['case']:34s} {r['estimator']:10s} {r['ratio_median']:7.3f} {r['coverage_2se']:9.3f} "
              f"{r['relative_se_target']:19.4f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", default=str(ROOT / "models"))
    p.add_argument("--version", default=None, help="default: the registry's newest")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz"))
    p.add_argument("--images", type=int, default=3, help="held-out images for the calibration (0: none)")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--halves-seeds", type=int, default=8, help="seed pairs for the halves estimator")
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--sweep-images", type=int, default=10, help="images for the convergence sweep (0: none)")
    p.add_argument("--sweep-samples", type=int, nargs="*", default=[500, 1000, 2000, 5000])
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")  # shap's "singular" warning, expected for the starved cases
    report: dict = {"args": vars(args), "machine_note": "timings on a shared, loaded 2-core machine"}
    rows: list[dict] = []
    if not args.skip_synthetic:
        rows += synthetic(args.seeds, args.halves_seeds)
        print_table(rows)
    if args.images or args.sweep_images:
        from shapcore.registry import Registry

        version = Registry(args.registry).resolve(args.version)
        report["version"] = version
        loaded, bg, images = load_real(args.registry, version, args.data, max(args.images, args.sweep_images))
        if args.images:
            real, report["cost"] = real_calibration(loaded, bg, images[: args.images], args.seeds,
                                                    args.halves_seeds, args.samples)  # fmt: skip
            rows += real
            print_table(real)
            print(f"cost: {report['cost']}")
        if args.sweep_images:
            settings = [(50, s) for s in args.sweep_samples] + [(200, 20)]
            report["convergence"] = convergence_sweep(loaded, bg, images[: args.sweep_images], settings)
    report["calibration"] = rows
    out = Path(args.out) / f"stderr-calibration-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
