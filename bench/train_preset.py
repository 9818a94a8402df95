"""One budgeted training run of a profile with field overrides, scored on its held-out split.

Presets are compared with this at equal wall clock, one run after the other on one machine
(see BENCHMARKS.md, issue 14). Any ``TrainConfig`` field can be set, e.g. the ``cpu``
profile as it stood before issue 14 (SGD + nesterov at peak lr 0.05), from scratch::

    python bench/train_preset.py --budget 10 --label before --set weights=none \\
        --set optimizer=sgd --set nesterov=true --set lr=0.05 --set weight_decay=5e-4

The JSON line it prints last (and appends to ``--out``) holds the label, the overrides, the
steps and epochs run, and the held-out accuracy and macro F1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapcore.registry import Registry  # noqa: E402
from training import evaluate, train  # noqa: E402
from training.presets import PROFILES, TrainConfig  # noqa: E402


def parse_override(text: str) -> tuple[str, Any]:
    """``field=value`` with the value typed after the field (``none`` for None)."""
    name, _, raw = text.partition("=")
    kinds = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    if name not in kinds:
        raise SystemExit(f"unknown TrainConfig field {name!r}")
    if raw.lower() == "none":
        return name, None
    kind = str(kinds[name])
    if "bool" in kind:
        return name, raw.lower() in ("1", "true", "yes", "on")
    if "int" in kind:
        return name, int(raw)
    if "float" in kind:
        return name, float(raw)
    return name, raw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10/train.tar.gz"))
    ap.add_argument("--registry", default="models")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--budget", type=float, required=True, help="minutes")
    ap.add_argument("--label", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--out", default="bench/results/train-presets.jsonl")
    args = ap.parse_args()

    overrides = dict(parse_override(s) for s in args.set)
    cfg = dataclasses.replace(PROFILES[args.profile], time_budget_min=args.budget, **overrides)
    registry = Registry(args.registry)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    version = train.run(cfg, args.data, registry, progress=False)
    wall = time.perf_counter() - t0
    meta = registry.metadata(version)
    metrics = evaluate.run(registry, version, args.data, holdout=True, device="cpu", progress=False)
    row = {
        "label": args.label,
        "profile": args.profile,
        "budget_min": args.budget,
        "overrides": overrides,
        "version": version,
        "started": started,
        "train_wall_s": round(wall, 1),
        "steps": meta["steps_run"],
        "epochs": meta["epochs_run"],
        "best_epoch": meta["best_epoch"],
        "holdout_accuracy": metrics["accuracy"],
        "holdout_macro_f1": metrics["macro"]["f1"],
        "per_class_f1": {c: m["f1"] for c, m in metrics["per_class"].items()},
        "history": [
            {k: round(v, 4) for k, v in r.items() if k in ("epoch", "train_loss", "val_loss", "val_accuracy", "lr")}
            for r in registry.history(version)
        ],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
