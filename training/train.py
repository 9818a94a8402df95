"""The training run: data, split, model, loop, early stopping, resume, publish.

Flat and explicit, after torchvision's references/classification/train.py: ``run`` reads
top to bottom as set up -> (fit the budget) -> train epoch by epoch -> publish, each step a
function of its own. The step-level pieces are in :mod:`training.steps`, the time budget
in :mod:`training.budget`.
"""

from __future__ import annotations

import math
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torchvision
from tqdm import tqdm

from shapcore.model import CIFAR10_MEAN, CIFAR10_STD, SOURCE_SIZE
from shapcore.registry import Registry, new_version_id
from training import checkpoint, distributed
from training.budget import SCHEDULE_TICKS, BudgetProgress
from training.presets import ONECYCLE_PCT_START, TrainConfig, make_optimizer, make_scheduler
from training.setup import RunSetup, fit_budget, resume_info, set_up

# autocast_for, graph_model, prepare_input and train_step are imported from here by
# bench/train_throughput.py and tests/e2e/test_cuda.py.
from training.steps import autocast_for, evaluate_loss, graph_model, prepare_input, train_step  # noqa: F401

#: Why the epoch loop ended, as recorded in a version's metadata (``stop_reason``).
STOP_EPOCHS, STOP_EARLY, STOP_BUDGET = "epochs", "early_stop", "time_budget"


@dataclass
class RunResult:
    """What the epoch loop produced; ``_publish`` turns it into a registry version."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"val_loss": math.inf, "val_accuracy": 0.0, "epoch": -1})
    bad_epochs: int = 0
    global_step: int = 0
    start_epoch: int = 0
    stop_reason: str = STOP_EPOCHS
    graphed: bool = False


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(
    cfg: TrainConfig,
    data_src: str,
    registry: Registry,
    *,
    device: str = "auto",
    resume: str | None = None,
    progress: bool = True,
    weights_fallback: bool = True,
) -> str:
    """Train, publish a new version and return its id. ``weights_fallback``: see
    :func:`training.setup.set_up`."""
    t_start = time.perf_counter()
    registry.check_writable()
    info = resume_info(registry, resume) if resume else None
    if info:
        cfg, data_src = TrainConfig.from_dict(info["config"]), info["data"]["source"]
    setup = set_up(cfg, data_src, registry, info, resume or new_version_id(), device, progress, weights_fallback)
    if setup.plan is None and setup.cfg.time_budget_min:
        fit_budget(setup, t_start)
    result = _train(setup, resumed=info is not None)
    if setup.dd.main:
        _publish(registry, setup, result)
    distributed.barrier()
    distributed.cleanup()
    return setup.version


# -- the epoch loop -----------------------------------------------------------------------
def _warming_up(cfg: TrainConfig, scheduler: Any) -> bool:
    """True while a OneCycle schedule is still raising the LR.

    Validation loss is expected to wobble on the way up to the peak LR; counting those
    epochs towards early stopping would stop a run at its noisiest point.
    """
    if cfg.scheduler != "onecycle":
        return False
    return scheduler.last_epoch < scheduler.total_steps * ONECYCLE_PCT_START


def _train(setup: RunSetup, *, resumed: bool) -> RunResult:
    """Run the epochs until their count, early stopping or the time budget ends them."""
    cfg, plan = setup.cfg, setup.plan
    optimizer = make_optimizer(cfg, setup.model.net)
    budgeted = plan is not None and cfg.scheduler == "onecycle"
    steps_per_epoch = plan["steps_per_epoch"] if plan else len(setup.data.train)
    scheduler = make_scheduler(cfg, optimizer, total_steps=SCHEDULE_TICKS if budgeted else cfg.epochs * steps_per_epoch)
    result, elapsed_before = RunResult(), 0.0
    if resumed:
        state = checkpoint.restore_run_state(
            setup.run_dir, net=setup.model.net, optimizer=optimizer, scheduler=scheduler
        )
        result = RunResult(
            state["history"], state["best"], state["bad_epochs"], state["global_step"], start_epoch=state["epoch"] + 1
        )
        elapsed_before = state["elapsed_s"]
        setup.say(f"resuming {setup.version} after epoch {result.start_epoch} of {cfg.epochs}")
    result.graphed = _maybe_graph(setup)
    budget = BudgetProgress(plan, elapsed_before, setup.dev) if budgeted else None
    last_epoch = 10**6 if budget is not None else cfg.epochs  # a budgeted run ends when time does
    for epoch in range(result.start_epoch, last_epoch):
        row, time_up = _train_one_epoch(setup, result, epoch, optimizer, scheduler, budget, steps_per_epoch)
        _end_epoch(setup, result, epoch, row, optimizer, scheduler, budget)
        if cfg.early_stop_patience and result.bad_epochs >= cfg.early_stop_patience:
            setup.say(f"early stop: validation loss has not improved for {result.bad_epochs} epochs")
            result.stop_reason = STOP_EARLY
            break
        if budget is not None and not time_up:
            time_up = budget.too_little_left(row["train_seconds"] / max(row["steps"], 1), row["val_seconds"])
        if time_up:
            setup.say(f"time budget spent after {epoch + 1} epoch(s), {result.global_step} steps")
            result.stop_reason = STOP_BUDGET
            break
    return result


def _maybe_graph(setup: RunSetup) -> bool:
    """CUDA graphs for single-GPU runs with fixed-size batches (see ``steps.graph_model``)."""
    cfg, data = setup.cfg, setup.data
    if not (cfg.cuda_graphs and setup.dev.type == "cuda" and not setup.dd.enabled and data.train.drop_last):
        return False
    images0, _ = next(data.train.epoch(10**6))
    graphed = graph_model(setup.model, cfg, setup.autocast, prepare_input(images0, setup.aug, cfg))
    setup.say(f"CUDA graphs: {'on' if graphed else 'off (capture failed)'}")
    return graphed


def _train_one_epoch(
    setup: RunSetup,
    result: RunResult,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    budget: BudgetProgress | None,
    steps_per_epoch: int,
) -> tuple[dict[str, Any], bool]:
    """One epoch's training steps and its validation pass: (history row, time is up)."""
    cfg, dev, dd = setup.cfg, setup.dev, setup.dd
    # augmentation + dropout: resumable exactly; each rank draws its own
    torch.manual_seed(cfg.seed * 1000 + epoch + 1_000_003 * dd.rank)
    setup.model.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    seen = steps = 0
    of_epochs = f"~{cfg.epochs}" if budget is not None else str(cfg.epochs)
    bar = tqdm(setup.data.train.epoch(epoch), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{of_epochs}",
               unit="batch", disable=not setup.progress, leave=False)  # fmt: skip
    time_up = False
    for step, (xb, yb) in enumerate(bar):
        if step >= steps_per_epoch:
            break
        loss, ok = train_step(setup.train_model, setup.aug, optimizer, cfg, setup.autocast, xb, yb)
        result.global_step += 1
        steps += 1
        if budget is not None:
            time_up = budget.advance(scheduler)
        elif cfg.scheduler == "onecycle":
            scheduler.step()
        loss_sum += loss * len(yb)
        correct += ok
        seen += len(yb)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if time_up:
            break
    bar.close()
    train_s = time.perf_counter() - t0
    if dd.enabled:  # the epoch's figures over every rank's share
        sums = distributed.all_sum(torch.stack([loss_sum.double(), correct.double(), torch.tensor(
            float(seen), dtype=torch.float64, device=dev)]))  # fmt: skip
        loss_sum, correct, seen = sums[0], sums[1], int(sums[2].item())
    t_val = time.perf_counter()
    val_loss, val_acc = evaluate_loss(setup.model, setup.data.val, setup.autocast, cfg.channels_last, setup.progress)
    row = {
        "epoch": epoch + 1,
        "train_loss": loss_sum.item() / max(seen, 1),
        "train_accuracy": correct.item() / max(seen, 1),
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "lr": optimizer.param_groups[0]["lr"],
        "train_seconds": train_s,
        "epoch_seconds": time.perf_counter() - t0,
        "images_per_second": seen / train_s,
        # not in the history: what the budget check after the epoch needs
        "steps": steps,
        "val_seconds": time.perf_counter() - t_val,
    }
    setup.say(
        f"epoch {epoch + 1}/{of_epochs}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
        f"val loss {val_loss:.4f} acc {val_acc:.4f} | "
        f"{row['images_per_second']:.0f} img/s, {row['epoch_seconds']:.0f} s"
    )
    return row, time_up


def _end_epoch(
    setup: RunSetup,
    result: RunResult,
    epoch: int,
    row: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    budget: BudgetProgress | None,
) -> None:
    """Record the epoch, keep the best weights, count epochs without improvement, save state."""
    cfg = setup.cfg
    if cfg.scheduler == "plateau":
        scheduler.step(row["val_loss"])
    result.history.append({k: v for k, v in row.items() if k not in ("steps", "val_seconds")})
    if row["val_loss"] < result.best["val_loss"]:
        result.best = {"val_loss": row["val_loss"], "val_accuracy": row["val_accuracy"], "epoch": epoch + 1}
        result.bad_epochs = 0
        if setup.dd.main:
            setup.run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.save_best(setup.run_dir, setup.model.net)
    elif not _warming_up(cfg, scheduler):
        result.bad_epochs += 1
    if not setup.dd.main:
        return
    checkpoint.save_run_state(
        setup.run_dir,
        net=setup.model.net,
        optimizer=optimizer,
        scheduler=scheduler,
        info={
            "config": cfg.to_dict(),
            "data": setup.data.info,
            "plan": setup.plan,
            "epoch": epoch,
            "global_step": result.global_step,
            "elapsed_s": budget.elapsed() if budget else 0.0,
            "history": result.history,
            "best": result.best,
            "bad_epochs": result.bad_epochs,
            "weights": setup.weights,
        },
    )


# -- publishing ---------------------------------------------------------------------------
def _publish(registry: Registry, setup: RunSetup, result: RunResult) -> None:
    """Load the best epoch's weights and write the version (rank 0 only)."""
    cfg, data, dev = setup.cfg, setup.data, setup.dev
    class_names = data.images.class_names
    setup.model.net.load_state_dict(checkpoint.load_best(setup.run_dir))
    metadata = {
        "version": setup.version,
        "name": "resnet50-cifar10",
        "architecture": "resnet50",
        "head": f"Dropout({cfg.dropout}) + Linear(2048, {len(class_names)})",
        "class_names": class_names,
        "num_classes": len(class_names),
        "source_size": SOURCE_SIZE,
        "input_size": cfg.image_size,
        "normalization": {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)},
        "profile": cfg.profile,
        "hyperparameters": cfg.to_dict(),
        "weights": setup.weights,
        "budget_plan": setup.plan,
        "data": data.info,
        "epochs_run": len(result.history),
        "steps_run": result.global_step,
        "stopped_early": result.stop_reason == STOP_EARLY,
        "stop_reason": result.stop_reason,
        "best_epoch": result.best["epoch"],
        "best_val_loss": result.best["val_loss"],
        "best_val_accuracy": result.best["val_accuracy"],
        "background": {"count": len(data.background), "indices": data.background_idx.tolist()},
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "world_size": setup.dd.world,
        "cuda_graphs": result.graphed,
        "train_seconds": sum(r["epoch_seconds"] for r in result.history),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    registry.publish(setup.version, setup.model.net, metadata, data.background, result.history,
                     validation_sample=data.validation_sample)  # fmt: skip
    shutil.rmtree(setup.run_dir, ignore_errors=True)
