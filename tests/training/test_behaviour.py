"""What a training run does, end to end: it learns, it stops early, it publishes its best
epoch, and ``--time-budget`` plans and ends a run.

The toy set is synthetic but clearly separable (three noisy solid colours), so a few
seconds of training must beat chance by far; early stopping runs on real CIFAR images,
whose validation loss soon stops improving on 300 images.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shapcore.registry import Registry
from training import evaluate, train
from training.data import load_images, split_train_val
from training.presets import PROFILES
from training.steps import Batches, evaluate_loss

ROOT = Path(__file__).resolve().parents[2]
TOY_COLOURS = {"blue": (40, 40, 210), "green": (40, 210, 40), "red": (210, 40, 40)}


def toy_archive(path: Path, per_class: int, seed: int, split: str) -> Path:
    """``split``/<colour>/<n>.png: 32x32 images of one colour each, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tar:
        for name, rgb in TOY_COLOURS.items():
            for i in range(per_class):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, "PNG")
                info = tarfile.TarInfo(f"{split}/{name}/{i:03d}.png")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(training archive, held-out test archive drawn with another seed)."""
    folder = tmp_path_factory.mktemp("toy")
    return toy_archive(folder / "train.tar.gz", 32, 1, "train"), toy_archive(folder / "test.tar.gz", 10, 2, "test")


def test_training_learns_a_separable_toy_set(toy: tuple[Path, Path], tmp_path: Path) -> None:
    train_archive, test_archive = toy
    registry = Registry(tmp_path)
    cfg = PROFILES["smoke"].override(epochs=4, batch_size=8, amp="off", background_count=12)
    version = train.run(cfg, str(train_archive), registry, device="cpu", progress=False)
    metrics = evaluate.run(registry, version, str(test_archive), progress=False)
    assert metrics["num_images"] == 30
    assert metrics["accuracy"] >= 0.8, metrics["confusion_matrix"]  # chance: 1/3


def test_early_stop_publishes_the_best_epoch(small_archive: Path, tmp_path: Path) -> None:
    """Patience 1 on 300 real images stops early, and the published weights are the best
    epoch's: re-scored on the run's own validation images, they give the best epoch's loss,
    not the last epoch's."""
    registry = Registry(tmp_path)
    cfg = PROFILES["smoke"].override(
        epochs=8, early_stop_patience=1, batch_size=16, amp="off", background_count=10
    )
    version = train.run(cfg, str(small_archive), registry, device="cpu", progress=False)
    meta = registry.metadata(version)
    history = registry.history(version)
    assert meta["stopped_early"] is True and meta["stop_reason"] == "early_stop"
    assert meta["epochs_run"] == len(history) < cfg.epochs
    best = meta["best_epoch"]
    assert 1 <= best < meta["epochs_run"]
    assert history[-1]["val_loss"] >= history[best - 1]["val_loss"] == meta["best_val_loss"]

    data = load_images(str(small_archive), split="train", progress=False)
    _, val_idx = split_train_val(len(data), cfg.val_fraction, cfg.seed)
    val = Batches(data.images[val_idx], data.labels[val_idx], cfg.eval_batch_size, shuffle=False)
    published = registry.load(version).model
    loss, _ = evaluate_loss(published, val, nullcontext, channels_last=False, progress=False)
    assert loss == pytest.approx(meta["best_val_loss"], rel=1e-5)
    assert loss != pytest.approx(history[-1]["val_loss"], rel=1e-5)


def test_time_budget_end_to_end(toy: tuple[Path, Path], tmp_path: Path) -> None:
    """``--time-budget`` on the cpu profile: the run measures, plans, records the plan and
    ends because time is up (its OneCycle schedule has no epoch count of its own). ``--patience 0``:
    the toy set is learnt in a few epochs, and on a fast machine early stopping would end it first."""
    reg = tmp_path / "reg"
    cmd = [sys.executable, "-m", "training", "--quiet", "--registry", str(reg), "train", "--data", str(toy[0]),
           "--profile", "cpu", "--batch-size", "16", "--time-budget", "0.75", "--patience", "0",
           "--weights", "none"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "budget 0.75 min:" in proc.stdout and "time budget spent after" in proc.stdout
    version = proc.stdout.strip().splitlines()[-1]
    meta = json.loads((reg / version / "metadata.json").read_text())
    plan = meta["budget_plan"]
    assert plan["budget_s"] == 45.0 and plan["epochs"] >= 1 and plan["steps_per_epoch"] >= 1
    assert meta["hyperparameters"]["time_budget_min"] == 0.75
    assert meta["stop_reason"] == "time_budget" and meta["stopped_early"] is False
    assert meta["epochs_run"] >= 1 and meta["steps_run"] >= 1

