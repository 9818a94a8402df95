"""Short training probes: the ``cpu`` profile's real step for a few hundred steps under field
overrides, to see how fast each variant starts learning before paying for a budgeted run.

Each variant trains a fresh, identically seeded ResNet-50 for ``--steps`` steps with a OneCycle
schedule over those steps, then scores 2,000 held-out images. The line it prints holds the
mean training loss / accuracy of every 50 steps (a rise above a uniform guess, 2.30, is the
warm-up instability issue 14 describes) and the held-out accuracy::

    python bench/train_probe.py --steps 300 \\
        --variant 'sgd={"optimizer": "sgd", "nesterov": true, "lr": 0.05, "weight_decay": 5e-4}' \\
        --variant 'adamw={}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapcore.model import CIFAR10_MEAN, CIFAR10_STD, Classifier, Preprocess, build_model  # noqa: E402
from training.data import load_images, split_train_val  # noqa: E402
from training.presets import PROFILES, make_optimizer, make_scheduler, train_augmentation  # noqa: E402
from training.steps import Batches, autocast_for, evaluate_loss, train_step  # noqa: E402

WINDOW = 50


def probe(cfg, images: torch.Tensor, labels: torch.Tensor, val: Batches, steps: int) -> dict:
    torch.manual_seed(0)
    net = build_model(10, dropout=cfg.dropout, zero_init_residual=cfg.zero_init_residual)
    model = Classifier(net, Preprocess(cfg.image_size, CIFAR10_MEAN, CIFAR10_STD))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, net)
    scheduler = make_scheduler(cfg, optimizer, steps)
    aug, autocast = train_augmentation(cfg), autocast_for(cfg, torch.device("cpu"))
    batches = Batches(images, labels, cfg.batch_size, True, cfg.seed, drop_last=True)
    losses: list[float] = []
    hits: list[float] = []
    t0 = time.perf_counter()
    model.train()
    epoch = 0
    while len(losses) < steps:
        for xb, yb in batches.epoch(epoch):
            loss, ok = train_step(model, aug, optimizer, cfg, autocast, xb, yb)
            scheduler.step()
            losses.append(loss.item())
            hits.append(ok.item() / len(yb))
            if len(losses) >= steps:
                break
        epoch += 1
    seconds = time.perf_counter() - t0
    val_loss, val_acc = evaluate_loss(model, val, autocast, cfg.channels_last, progress=False)
    windows = range(0, steps - WINDOW + 1, WINDOW)
    return {
        "seconds": round(seconds, 1),
        "val_accuracy": round(val_acc, 4),
        "val_loss": round(val_loss, 4),
        "train_loss": [round(sum(losses[i : i + WINDOW]) / WINDOW, 3) for i in windows],
        "train_accuracy": [round(sum(hits[i : i + WINDOW]) / WINDOW, 3) for i in windows],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10/train.tar.gz"))
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--variant", action="append", required=True, metavar='NAME={"field": value}')
    ap.add_argument("--out", default="bench/results/train-probes.jsonl")
    args = ap.parse_args()

    data = load_images(args.data, split=["train"], progress=False)
    train_idx, val_idx = split_train_val(len(data), 0.2, 42)
    val = Batches(data.images[val_idx[:2000]], data.labels[val_idx[:2000]], 256, False)
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        changes = json.loads(overrides or "{}")
        cfg = dataclasses.replace(PROFILES[args.profile], weights=None, **changes)
        row = {"variant": name, "overrides": changes, "steps": args.steps,
               **probe(cfg, data.images[train_idx], data.labels[train_idx], val, args.steps)}  # fmt: skip
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
