"""Estimator × evaluations -> median Spearman ρ, relative L2 error and seconds (issue 26).

    PYTHONPATH=. .venv/bin/python bench/estimator_table.py [--evaluations 500 1000 2000 5000]
        [--seeds 10] [--estimators leverage kernel kernel_strata shap leverage:auto]
    PYTHONPATH=. .venv/bin/python bench/estimator_table.py --real --registry models
        [--version V] [--images 10] [--reference-samples 20000] [--ceiling]

Games (default): value functions with exact Shapley values (``tests/support/shapley_games_exact.py``;
sums of unanimity games of orders 1-5 at M = 50, mild and strong; a weighted majority game at
M = 16, enumerated). ρ and L2 are against the exact values, over class 0; the figures are
medians over seeds; seconds are the estimator's own (the games cost nothing to evaluate).

``--real`` (superseded by ``bench/estimator_real.py``, which reads the cached references of
``bench/references.py`` and runs the worker's own players and fill): the real model's
superpixel value function (``shapcore.value.CoalitionModel``,
50 segments, the mean fill), built as ``bench/stderr_calibration.py`` builds it, on
``--images`` held-out images. The reference is ``shap.KernelExplainer`` at
``--reference-samples`` (``--reference leverage``: Leverage SHAP at that budget); ρ and L2 over
the predicted class; seconds include the forward passes. ``--ceiling`` adds a second
reference with another seed and reports the two references' own ρ (the ceiling).

Estimators: ``leverage``, ``adjusted``, ``kernel``, ``kernel_strata`` (``shapcore.shapley.estimate_shapley``
methods); ``shap`` (``shap.KernelExplainer``, ``nsamples`` = the evaluations, ``l1_reg`` off);
``leverage:auto`` (``samples="auto"`` with the evaluations as its cap, ``--tolerance``: its
rows give the evaluations it actually used and how often it stopped converged).
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
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from shapcore.agreement import agreement  # noqa: E402
from shapcore.shapley import estimate_shapley  # noqa: E402
from tests.support.shapley_games_exact import shap_kernel, unanimity_game, voting_game  # noqa: E402

ValueFunction = Callable[[np.ndarray], np.ndarray]
GAMES = {
    "unanimity M=50": lambda: unanimity_game(50, seed=11),
    "unanimity M=50 strong": lambda: unanimity_game(50, seed=12, interaction=3.0),
    "voting M=16": lambda: voting_game(16, seed=13),
}


def run_estimator(name: str, f: ValueFunction, m: int, evaluations: int, seed: int, tolerance: float) -> dict:
    """One explanation: values (M, C), seconds, evaluations used, and how it stopped."""
    start = time.perf_counter()
    if name == "shap":
        values, used, stopped = shap_kernel(f, m, evaluations, seed), evaluations + 2, "budget"
    elif name.endswith(":auto"):
        out = estimate_shapley(f, m, "auto", method=name.split(":")[0], cap=evaluations, tolerance=tolerance, seed=seed)
        values, used, stopped = out.values, out.evaluations, out.stopped
    else:
        out = estimate_shapley(f, m, evaluations, method=name, seed=seed)
        values, used, stopped = out.values, out.evaluations, out.stopped
    return {"values": values, "seconds": time.perf_counter() - start, "used": used, "stopped": stopped}


def score(values: np.ndarray, truth: np.ndarray, cls: int) -> tuple[float, float]:
    """Spearman ρ and relative L2 error of one class's values."""
    return agreement(values[:, cls], truth[:, cls])


def summarise(case: str, estimator: str, evaluations: int, runs: list[dict]) -> dict:
    return {
        "case": case,
        "estimator": estimator,
        "evaluations": evaluations,
        "rho_median": float(np.median([r["rho"] for r in runs])),
        "l2_median": float(np.median([r["l2"] for r in runs])),
        "seconds_median": float(np.median([r["seconds"] for r in runs])),
        "used_median": float(np.median([r["used"] for r in runs])),
        "converged_fraction": float(np.mean([r["stopped"] == "converged" for r in runs])),
        "n": len(runs),
    }


def games_table(estimators: list[str], budgets: list[int], seeds: int, tolerance: float) -> list[dict]:
    rows = []
    for case, make in GAMES.items():
        game = make()
        for evaluations in budgets:
            for estimator in estimators:
                runs = []
                for seed in range(seeds):
                    run = run_estimator(estimator, game.f, game.players, evaluations, seed, tolerance)
                    run["rho"], run["l2"] = score(run["values"], game.exact, 0)
                    runs.append(run)
                rows.append(summarise(case, estimator, evaluations, runs))
                print_row(rows[-1])
    return rows


def real_table(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Per image: a reference, then every estimator × evaluations once (seed = image index)."""
    from stderr_calibration import load_real, value_function

    from shapcore.registry import Registry

    version = Registry(args.registry).resolve(args.version)
    loaded, bg, images = load_real(args.registry, version, args.data, args.images)
    per: dict[tuple[str, int], list[dict]] = {}
    ceiling = []
    for i, (image, x) in enumerate(images):
        f, m = value_function(loaded, bg, image, x, args.segments)
        ref_name = "shap" if args.reference == "shap" else "leverage"
        truth = run_estimator(ref_name, f, m, args.reference_samples, 10_000 + i, args.tolerance)["values"]
        cls = int(np.argmax(f.fx()))
        if args.ceiling:
            again = run_estimator(ref_name, f, m, args.reference_samples, 20_000 + i, args.tolerance)["values"]
            ceiling.append(score(again, truth, cls)[0])
        for evaluations in args.evaluations:
            for estimator in args.estimators:
                run = run_estimator(estimator, f, m, evaluations, i, args.tolerance)
                run["rho"], run["l2"] = score(run["values"], truth, cls)
                del run["values"]
                per.setdefault((estimator, evaluations), []).append(run)
        print(f"  image {i}: M={m}, class {cls}", flush=True)
    rows = [summarise(f"real {version}", e, n, runs) for (e, n), runs in per.items()]
    meta = {"version": version, "reference": args.reference, "reference_samples": args.reference_samples}
    if ceiling:
        meta["reference_rho_median"] = float(np.median(ceiling))
    return rows, meta


def print_row(r: dict) -> None:
    print(f"{r['case']:24s} {r['estimator']:15s} {r['evaluations']:6d} ρ {r['rho_median']:.4f} "
          f"L2 {r['l2_median']:.4f} {r['seconds_median'] * 1e3:8.1f} ms used {r['used_median']:7.0f} "
          f"converged {r['converged_fraction']:.2f}", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--evaluations", type=int, nargs="+", default=[500, 1000, 2000, 5000])
    p.add_argument("--estimators", nargs="+", default=["leverage", "adjusted", "kernel", "kernel_strata", "shap",
                                                       "leverage:auto", "adjusted:auto"])  # fmt: skip
    p.add_argument("--seeds", type=int, default=10, help="games: seeds per cell")
    p.add_argument("--tolerance", type=float, default=0.05, help="samples=auto: max se / range")
    p.add_argument("--real", action="store_true", help="the real model instead of the games")
    p.add_argument("--registry", default=str(ROOT / "models"))
    p.add_argument("--version", default=None, help="default: the registry's newest")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz"))
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--segments", type=int, default=50)
    p.add_argument("--reference", choices=["shap", "leverage"], default="shap")
    p.add_argument("--reference-samples", type=int, default=20_000)
    p.add_argument("--ceiling", action="store_true", help="real: a second reference, its ρ to the first")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    report: dict = {"args": vars(args), "machine_note": "timings on a shared, loaded 2-core machine"}
    if args.real:
        report["rows"], report["real"] = real_table(args)
        for row in report["rows"]:
            print_row(row)
        print(json.dumps(report["real"]))
    else:
        report["rows"] = games_table(args.estimators, args.evaluations, args.seeds, args.tolerance)
    out = Path(args.out) / f"estimator-table-{'real' if args.real else 'games'}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
