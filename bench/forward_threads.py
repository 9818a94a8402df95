"""Is a forward pass slower on an executor thread (the server's inference thread) than on the
main thread (load_predict.py's raw loop)? Interleaved rounds, median of each.

    .venv/bin/python bench/forward_threads.py [REGISTRY] [VERSION]
"""

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shapcore.inference import build_forward, resolve_device, warm_up
from shapcore.registry import Registry

torch.set_num_threads(1)
dev = resolve_device("cpu")
registry = sys.argv[1] if len(sys.argv) > 1 else "models"
loaded = Registry(registry).load(sys.argv[2] if len(sys.argv) > 2 else None, device=dev)
fwd = build_forward(loaded.model, dev, jit=True, precision="fp32")
warm_up(fwd, 32)
print("runtime", fwd.describe())
x1 = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
x16 = torch.zeros(16, 3, 32, 32, dtype=torch.uint8)

def bench(x, n):
    ts = []
    for _ in range(n):
        s = time.perf_counter()
        fwd(x)
        ts.append(time.perf_counter() - s)
    return statistics.median(ts) * 1000

ex = ThreadPoolExecutor(1, initializer=lambda: torch.set_num_threads(1))
for rnd in range(3):
    for name, x, n in (("b1", x1, 60), ("b16", x16, 15)):
        main = bench(x, n)
        th = ex.submit(bench, x, n).result()
        print(f"round {rnd} {name}: main thread {main:.2f} ms, worker thread {th:.2f} ms")
