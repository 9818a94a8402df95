"""Multi-process training through torchrun (DistributedDataParallel; gloo on this CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_two_processes_publish_one_version(small_archive: Path, tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training", "--quiet", "--registry", str(reg), "train", "--data", str(small_archive),
           "--profile", "smoke", "--epochs", "2", "--batch-size", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    versions = [p for p in reg.iterdir() if not p.name.startswith(".") and p.is_dir()]
    assert len(versions) == 1, versions
    out_lines = proc.stdout.strip().splitlines()
    assert out_lines[-1] == versions[0].name  # printed once, by rank 0
    assert sum(line.startswith("epoch 1/2") for line in out_lines) == 1
    meta = json.loads((versions[0] / "metadata.json").read_text())
    assert meta["world_size"] == 2 and meta["epochs_run"] == 2
    # each rank reads half of every epoch: 240 training images, global batch 32 -> 16 per rank
    history = json.loads((versions[0] / "history.json").read_text())
    assert all(row["train_loss"] > 0 for row in history)
    assert not (reg / ".runs").exists() or not any((reg / ".runs").iterdir())
