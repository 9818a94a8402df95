"""The estimators on the real model against cached ≥ 20,000-sample references (issue 26).

    PYTHONPATH=. .venv/bin/python bench/estimator_real.py --registry /work/models --images 30 table
    PYTHONPATH=. .venv/bin/python bench/estimator_real.py --registry /work/models --images 30 \\
        before-after [--tolerance 0.05]

Images and references: ``bench/references.py`` (the first ``--images`` of the seeded shuffle
of the version's held-out 20 %, KernelSHAP at 20,000 samples, cached under ``--cache``); an
image without a cached reference is skipped (run ``bench/references.py`` first).

``table``: estimator × evaluations → median Spearman ρ (the target class, against the
reference), relative L2 error and seconds. ``leverage`` and ``adjusted`` run in the rounds of
``samples="auto"`` (402, 802, 1602, 3202 and 5002 evaluations at 50 players: each round adds
to the last), on the same coalitions (the value function remembers what it evaluated, so the
two methods and their rounds cost the forward passes of the largest once); ``shap`` is
``shap.KernelExplainer`` at 1000 and 2000 (at 5000, today's default, in ``before-after`` and
``bench/explain_compare.py``). Seconds = the estimator's own time + its evaluations × this
image's measured seconds per forward pass. The ratios ``max se / range`` (the default rule)
and ``rms se / sd`` (a rule about the order, ``relative_to="sd"``) after each round are kept,
so the rows ``adjusted:auto@t`` and ``adjusted:rank@t`` give what ``samples="auto"`` with
either rule at threshold ``t`` would have stopped at (evaluations, ρ, L2) on the same draws.

``before-after``: today's default (``kernel``, 5,000 samples) against the new default
(``adjusted``, ``samples="auto"``) through ``worker.explain.explain_image`` exactly as a job
runs it, in one sitting, image by image: median ρ, deletion AUC (``shapcore.faithfulness``),
median seconds (the explainer and the whole job), evaluations, the speed-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import platform
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from references import DEFAULT_CACHE, Setup, read_reference, reference_path  # noqa: E402

from shapcore.agreement import agreement, spearman  # noqa: E402
from shapcore.shapley import estimate_shapley, stderr_ratio  # noqa: E402

TOLERANCES = (0.03, 0.05, 0.08, 0.1, 0.15)
#: Thresholds of the rank-oriented rule, ``rms(se) / sd(φ) ≤ τ`` (``relative_to="sd"`` of
#: :func:`shapcore.shapley.stderr_ratio`): with independent errors of that size the values' order
#: agrees with the truth's at about ``1 / √(1 + τ²)``: 0.989, 0.981, 0.970, 0.958.
RANK_TOLERANCES = (0.15, 0.2, 0.25, 0.3)


class Remembering:
    """A value function that evaluates each coalition once: the estimators share their draws."""

    def __init__(self, f) -> None:
        self.f = f
        self.seen: dict[bytes, np.ndarray] = {}
        self.A = f.A

    def __call__(self, Z: np.ndarray) -> np.ndarray:
        Z = np.asarray(Z, dtype=bool)
        keys = [r.tobytes() for r in np.packbits(Z, axis=1)]
        todo = [i for i, k in enumerate(keys) if k not in self.seen]
        if todo:
            got = self.f(Z[todo])
            for i, row in zip(todo, got, strict=True):
                self.seen[keys[i]] = row
        return np.stack([self.seen[k] for k in keys])


def score(values: np.ndarray, truth: np.ndarray, cls: int) -> tuple[float, float]:
    return agreement(values[:, cls], truth[:, cls])


def table_image(setup: Setup, n: int, ref, seed: int) -> list[dict]:
    """Every row of one image (``estimator``, ``evaluations``, ``rho``, ``l2``, ``seconds``)."""
    from worker.methods.kernel import kernel_shap

    f, seg, _ = setup.value_function(n)
    assert seg.count == ref.values.shape[0], "the segmentation differs from the reference's"
    m, cls, fx = seg.count, ref.target, f.fx()
    memo = Remembering(f)
    rows: list[dict] = []
    first = max(8 * m, 64)
    caps = [first + 2, 2 * first + 2, 4 * first + 2, 8 * first + 2, 5002]
    timed: list[tuple[str, int, np.ndarray, float, float, float]] = []
    for method in ("adjusted", "leverage"):
        for cap in caps:
            before = f.forward_seconds
            start = time.perf_counter()
            out = estimate_shapley(memo, m, "auto", method=method, tolerance=0.0, cap=cap, v_full=fx, seed=seed,
                                   classes=[cls])  # fmt: skip
            own = time.perf_counter() - start - (f.forward_seconds - before)
            timed.append((method, out.evaluations, out.values, own, out.ratio,
                          stderr_ratio(out.values, out.stderr, [cls], relative_to="sd")))  # fmt: skip
    per_eval = f.forward_seconds / max(f.evaluations, 1)
    for method, used, values, own, ratio, by_rank in timed:
        rho, l2 = score(values, ref.values, cls)
        rows.append({"estimator": method, "evaluations": used, "rho": rho, "l2": l2,
                     "seconds": own + used * per_eval, "ratio": ratio, "rank_ratio": by_rank})  # fmt: skip
    for t in TOLERANCES:  # what samples="auto" with tolerance t stops at, on the same draws
        adj = [r for r in rows if r["estimator"] == "adjusted"]
        hit = next((r for r in adj if r["ratio"] <= t), adj[-1])
        rows.append({**hit, "estimator": f"adjusted:auto@{t}"})
        hit = next((r for r in adj[1:] if r["ratio"] <= t), adj[-1])  # never stopping after the first round
        rows.append({**hit, "estimator": f"adjusted:auto@{t},min2"})
    for t in RANK_TOLERANCES:  # the rank-oriented rule on the same draws
        adj = [r for r in rows if r["estimator"] == "adjusted"]
        hit = next((r for r in adj if r["rank_ratio"] <= t), adj[-1])
        rows.append({**hit, "estimator": f"adjusted:rank@{t}"})
    for budget in (1000, 2000):  # shap at 5000 is today's default: the before-after measures it
        before, start = f.forward_seconds, time.perf_counter()
        values = kernel_shap(f, m, budget, seed)["phi"]
        rho, l2 = score(values, ref.values, cls)
        rows.append({"estimator": "shap", "evaluations": budget + 2, "rho": rho, "l2": l2,
                     "seconds": time.perf_counter() - start, "ratio": None})  # fmt: skip
    return rows


def before_after_image(setup: Setup, n: int, ref, seed: int, tolerance: float | None) -> dict[str, dict]:
    """Today's default and the new one through ``explain_image``, as a job runs them."""
    import torch
    from PIL import Image

    from shapcore.background import make_background
    from shapcore.explain.background import parse_background
    from shapcore.explain.request import ExplainRequest
    from worker.explain import ModelRuntime, explain_image

    s = setup.settings
    x = torch.from_numpy(setup.data["images"][n])
    image = Image.fromarray(x.permute(1, 2, 0).numpy(), "RGB")
    spec = parse_background(s.explain_default_background, len(setup.loaded.background()))
    fill = make_background(spec, setup.loaded.background(), x)
    runtime = ModelRuntime(setup.loaded.model, setup.loaded.class_names, fill)
    out = {}
    if tolerance is not None:  # the new default's tolerance, if not the module's
        import worker.methods.adjusted

        worker.methods.adjusted.TOLERANCE = tolerance
    for name, method, samples in (("before", "kernel", 5000), ("after", "adjusted", "auto")):
        request = ExplainRequest.build(s, method=method, samples=samples, seed=seed)
        result, _, _ = explain_image(runtime, request, image, x, batch_size=s.explain_batch_size,
                                       slic_max_side=s.explain_slic_max_side)  # fmt: skip
        cls = result["target"]["index"]
        values = np.asarray(result["shap_values"])
        assert values.shape[0] == ref.values.shape[0], "the segmentation differs from the reference's"
        rho = spearman(values, ref.values[:, cls])
        conv = result["convergence"]
        out[name] = {"rho": rho, "deletion_auc": result["faithfulness"]["deletion_auc"],
                     "insertion_auc": result["faithfulness"]["insertion_auc"],
                     "random_deletion_auc": result["faithfulness"]["random_deletion_auc"],
                     "explainer_s": result["timings_s"]["explainer"], "job_s": result["duration_s"],
                     "evaluations": result["model_evaluations"], "stopped": conv.get("stopped"),
                     "converged": conv.get("converged")}  # fmt: skip
    return out


def median_rows(rows: list[dict]) -> list[dict]:
    # a stopping rule's rows (``adjusted:auto@t``, ``adjusted:rank@t``) stop where each image met it: one key
    keys = sorted({(r["estimator"], r["evaluations"] if ":" not in r["estimator"] else 0) for r in rows})
    out = []
    for est, ev in keys:
        sel = [r for r in rows if r["estimator"] == est and (ev == 0 or r["evaluations"] == ev)]
        out.append({"estimator": est, "evaluations": float(np.median([r["evaluations"] for r in sel])),
                    "evaluations_mean": float(np.mean([r["evaluations"] for r in sel])),
                    "seconds_mean": float(np.mean([r["seconds"] for r in sel])),
                    "rho_median": float(np.median([r["rho"] for r in sel])),
                    "l2_median": float(np.median([r["l2"] for r in sel])),
                    "seconds_median": float(np.median([r["seconds"] for r in sel])), "images": len(sel)})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["table", "before-after", "both"])
    p.add_argument("--registry", default=str(ROOT / "models"))
    p.add_argument("--version", default=None)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz"))
    p.add_argument("--images", type=int, default=30)
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--tolerance", type=float, default=None, help="before-after: the new default's, if not the setting")
    p.add_argument("--wait", type=int, default=0, help="seconds to wait for each missing reference")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    setup = Setup(args.registry, args.version, args.data, args.images)
    started = datetime.now(UTC)
    rows: list[dict] = []
    pairs: list[dict] = []
    out = Path(args.out) / f"estimator-real-{args.mode}-{started:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in range(args.images):
        index = int(setup.data["indices"][n])
        path = reference_path(Path(args.cache), setup.version, index, 0)
        waited = 0
        while args.wait and not path.exists() and waited < args.wait:  # bench/references.py is still at it
            time.sleep(10)
            waited += 10
        if not path.exists():
            print(f"[{n + 1}] held-out {index}: no reference yet, skipped", flush=True)
            continue
        ref = read_reference(path)
        if args.mode in ("table", "both"):
            got = table_image(setup, n, ref, seed=n + 1)
            rows += [{**r, "index": index} for r in got]
            print(f"[{n + 1}] " + " | ".join(f"{r['estimator']}@{r['evaluations']} {r['rho']:.3f}" for r in got),
                  flush=True)  # fmt: skip
        if args.mode in ("before-after", "both"):
            got = before_after_image(setup, n, ref, n + 1, args.tolerance)
            pairs.append({"index": index, **got})
            print(f"[{n + 1}] " + " | ".join(f"{k}: rho {v['rho']:.3f} del {v['deletion_auc']:.3f} "
                                             f"{v['explainer_s']:.2f}s {v['evaluations']} {v['stopped']}"
                                             for k, v in got.items()), flush=True)  # fmt: skip
        machine = platform.processor() or platform.machine()
        report = {"started": started.isoformat(timespec="seconds"), "machine": machine, "version": setup.version,
                  "args": vars(args), "rows": rows, "pairs": pairs}  # fmt: skip
        if rows:
            report["medians"] = median_rows(rows)
        if pairs:
            report["summary"] = {k: {f: float(np.median([p[k][f] for p in pairs])) for f in
                                     ("rho", "deletion_auc", "insertion_auc", "explainer_s", "job_s", "evaluations")}
                                 for k in ("before", "after")}  # fmt: skip
        out.write_text(json.dumps(report, indent=1))
    for r in report.get("medians", []):
        print(f"{r['estimator']:22s} {r['evaluations']:7.0f} (mean {r['evaluations_mean']:6.0f}) "
              f"ρ {r['rho_median']:.3f} L2 {r['l2_median']:.3f} {r['seconds_median']:.2f} s "
              f"(mean {r['seconds_mean']:.2f}) ({r['images']} images)")  # fmt: skip
    if "summary" in report:
        print(json.dumps(report["summary"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
