"""Raw forward speed of the model preparations the service and the worker can use, on this CPU.

    .venv/bin/python bench/forward_variants.py [--registry models] [--version V]
        [--batches 1 16 256] [--threads 1 2] [--seconds 3]

Variants (all from :func:`shapcore.inference.build_forward`'s building blocks, same weights):
``eager``: batch norms folded, channels-last, fp32 (the worker's preparation);
``torchscript-frozen``: traced, frozen and optimised for inference (the service's default);
``eager-bf16``: the eager model under bf16 autocast (``RUNTIME=bf16``).
Images/s for each (variant, batch size, torch threads), uint8 inputs as the service feeds them.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapcore.inference import build_forward  # noqa: E402
from shapcore.model import SOURCE_SIZE  # noqa: E402
from shapcore.registry import Registry  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def rate(fn, batch: int, seconds: float) -> float:
    x = torch.randint(0, 256, (batch, 3, SOURCE_SIZE, SOURCE_SIZE), dtype=torch.uint8)
    for _ in range(3):
        fn(x)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        fn(x)
        count += 1
    return count * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--registry", default=str(ROOT / "models"))
    p.add_argument("--version", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    loaded = Registry(args.registry).load(args.version, device="cpu")
    device = torch.device("cpu")
    fp32 = build_forward(loaded.model, device, jit=True, precision="fp32")
    bf16 = build_forward(loaded.model, device, jit=False, precision="bf16")
    variants = {
        "eager": lambda x: fp32.run(fp32.variants["eager-channels-last"], x),
        "torchscript-frozen": lambda x: fp32.run(fp32.variants["torchscript-frozen"], x),
        "eager-bf16": bf16,
    }
    rows = []
    print(f"{cpu_model()}, torch {torch.__version__}, version {loaded.version}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            line = {"threads": threads, "batch": batch}
            for name, fn in variants.items():
                line[name] = round(rate(fn, batch, args.seconds), 1)
            rows.append(line)
            print(json.dumps(line), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu_model(),
            "torch": torch.__version__, "version": loaded.version, "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
