"""Training throughput (images/s) of the real training step, per profile and input size.

Usage: python bench/train_throughput.py [--data ARCHIVE] [--steps N] [--device cpu|cuda] [--profiles P ...]

Runs training.train.train_step -- the same augmentation, autocast, channels_last and
optimizer as a real run -- on real CIFAR-10 batches, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime

import torch

from shapcore.model import CIFAR10_MEAN, CIFAR10_STD, Classifier, Preprocess, build_model
from training.data import load_images
from training.presets import PROFILES, make_optimizer, train_augmentation
from training.train import autocast_for, graph_model, prepare_input, train_step

CASES = [
    ("cpu", {}),
    ("cpu", {"amp": "off"}),
    ("cpu", {"amp": "off", "channels_last": False}),
    ("paper", {}),
    ("paper", {"amp": "off"}),
]
CUDA_CASES = [  # CUDA graphs are on by default there; these show what they are worth
    ("cpu", {}),
    ("cpu", {"cuda_graphs": False}),
    ("paper", {}),
    ("paper", {"cuda_graphs": False}),
    ("paper", {"amp": "off"}),
    ("paper", {"amp": "off", "cuda_graphs": False}),
]


def measure(profile: str, overrides: dict, images: torch.Tensor, labels: torch.Tensor, steps: int, dev) -> float:
    cfg = PROFILES[profile].override(**overrides)
    torch.manual_seed(0)
    model = Classifier(build_model(10), Preprocess(cfg.image_size, CIFAR10_MEAN, CIFAR10_STD)).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = make_optimizer(cfg, model.net)
    aug = train_augmentation(cfg).to(dev)
    autocast = autocast_for(cfg, dev)
    bs = cfg.batch_size
    graphed = False
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if cfg.cuda_graphs:
            graphed = graph_model(model, cfg, autocast, prepare_input(images[:bs].to(dev), aug, cfg))
    times = []
    for i in range(steps + 2):
        lo = (i * bs) % (len(labels) - bs)
        x, y = images[lo : lo + bs].to(dev), labels[lo : lo + bs].to(dev)
        t0 = time.perf_counter()
        train_step(model, aug, opt, cfg, autocast, x, y)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    return bs / times[len(times) // 2], graphed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/cifar10/train.tar.gz")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profiles", nargs="+", choices=sorted(PROFILES), help="only these profiles' cases")
    args = parser.parse_args()
    dev = torch.device(args.device)
    data = load_images(args.data, split=["train"], progress=False)
    rows = []
    for profile, overrides in CUDA_CASES if dev.type == "cuda" else CASES:
        if args.profiles and profile not in args.profiles:
            continue
        cfg = PROFILES[profile].override(**overrides)
        rate, graphed = measure(profile, overrides, data.images, data.labels, args.steps, dev)
        rows.append({"profile": profile, "input": cfg.image_size, "batch": cfg.batch_size,
                     "amp": cfg.amp, "channels_last": cfg.channels_last, "optimizer": cfg.optimizer,
                     "cuda_graphs": graphed, "images_per_s": round(rate, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}\n")
    print("| profile | input px | batch | optimizer | autocast | channels_last | CUDA graphs | images/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        amp = "bf16" if r["amp"] != "off" else "fp32"
        print(f"| {r['profile']} | {r['input']} | {r['batch']} | {r['optimizer']} | {amp} | "
              f"{r['channels_last']} | {r['cuda_graphs']} | {r['images_per_s']} |")


if __name__ == "__main__":
    main()
