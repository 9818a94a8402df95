"""The training run: data, split, model, loop, early stopping, resume, publish.

Flat and explicit, after torchvision's references/classification/train.py.
"""

from __future__ import annotations

import copy
import logging
import math
import platform
import shutil
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.nn import functional as F
from tqdm import tqdm

from shapcore.errors import UserError
from shapcore.model import CIFAR10_MEAN, CIFAR10_STD, SOURCE_SIZE, Classifier, Preprocess, build_model
from shapcore.registry import Registry, new_version_id
from training import checkpoint, distributed
from training.data import load_images, pick_background, split_train_val
from training.presets import ONECYCLE_PCT_START, TrainConfig, make_optimizer, make_scheduler, train_augmentation

log = logging.getLogger(__name__)
BUDGET_SAFETY = 0.95  # plan for 95% of the budget: step times drift a little


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def autocast_for(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA and on CPUs with native bf16 (measured 1.5x there), else none."""
    if cfg.amp == "off":
        return nullcontext
    if device.type == "cuda" or cfg.amp == "on" or cpu_has_bf16():
        # No cast cache: each weight is cast once per forward anyway, and CUDA graph capture
        # needs it off.
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return nullcontext


def graph_model(model: Classifier, cfg: TrainConfig, autocast, sample: torch.Tensor) -> bool:
    """Capture the model's training forward and backward as CUDA graphs, in place.

    At the paper's batch of 32 a ResNet-50 step is bound by the CPU launching ~1,000 small
    kernels one by one, not by the GPU (measured on an H100: 911 img/s, ~28 ms a step, and
    about the same ~30 ms a step at batch 128 and 32 px). A replayed graph launches them all
    at once. ``torch.cuda.make_graphed_callables`` patches ``model.forward`` for train mode
    only (eval mode runs eager); parameters keep their storage, so the optimizer, the
    checkpoints and ``load_state_dict`` are unaffected. Dropout stays random per step (graph-
    safe Philox RNG, reseeded by ``torch.manual_seed``). Batch-norm statistics touched by the
    capture's warm-up passes are put back. Returns False (and the run goes on eagerly) when
    the capture fails.
    """
    model.train()
    saved = {k: v.clone() for k, v in model.net.named_buffers()}
    try:
        with autocast():
            torch.cuda.make_graphed_callables(model, (sample,))
    except Exception as exc:  # capture is an optimisation: never worth failing a run for
        log.warning("CUDA graph capture failed, training eagerly: %s", exc)
        return False
    finally:
        with torch.no_grad():
            for k, v in model.net.named_buffers():
                v.copy_(saved[k])
    return True


def prepare_input(images: torch.Tensor, aug: torch.nn.Module, cfg: TrainConfig) -> torch.Tensor:
    """uint8 batch -> augmented float batch, in the model's memory format."""
    x = aug(_to_input(images, False))
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


@dataclass
class Batches:
    """Shuffled mini-batches straight from an in-memory uint8 tensor on the device."""

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    shuffle: bool
    seed: int = 0
    drop_last: bool = False
    rank: int = 0  # under torchrun each rank reads its own equal share of every epoch
    world: int = 1

    def _shard_size(self) -> int:
        n = len(self.labels)
        return n // self.world if self.world > 1 else n

    def __len__(self) -> int:
        n = self._shard_size()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch(self, epoch: int):
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        else:
            order = torch.arange(n)
        if self.world > 1:
            order = order[: self._shard_size() * self.world][self.rank :: self.world]
        order = order.to(self.images.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.images[idx], self.labels[idx]


def _to_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = images.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_step(model, aug, optimizer, cfg, autocast, images, labels):
    x = prepare_input(images, aug, cfg)
    with autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == labels).sum()


@torch.inference_mode()
def evaluate_loss(model, batches: Batches, autocast, channels_last: bool, progress: bool = True) -> tuple[float, float]:
    """Mean cross-entropy (no smoothing) and accuracy over ``batches``."""
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=batches.images.device)
    correct = torch.zeros((), dtype=torch.int64, device=batches.images.device)
    bar = tqdm(batches.epoch(0), total=len(batches), desc="validate", leave=False, unit="batch", disable=not progress)
    for images, labels in bar:
        with autocast():
            logits = model(_to_input(images, channels_last))
        total_loss += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
    count = torch.tensor(batches._shard_size(), device=total_loss.device)
    sums = distributed.all_sum(torch.stack([total_loss, correct.double(), count.double()]))
    return sums[0].item() / sums[2].item(), sums[1].item() / sums[2].item()


def measure_step_time(model, aug, cfg, autocast, train: Batches, device, steps: int = 6) -> float:
    """Seconds per training step, measured on a throwaway copy of model and optimizer."""
    probe = copy.deepcopy(model).train()
    opt = make_optimizer(cfg, probe.net)
    batches = train.epoch(10**6)
    times = []
    for i, (images, labels) in enumerate(batches):
        if i >= steps + 2:
            break
        t0 = time.perf_counter()
        train_step(probe, aug, opt, cfg, autocast, images, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first steps pay for allocation and kernel selection
            times.append(time.perf_counter() - t0)
    del probe, opt
    return sorted(times)[len(times) // 2]


def measure_eval_rate(model, cfg, autocast, val: Batches, device) -> float:
    """Validation images per second (a couple of batches)."""
    model.eval()
    n = 0
    t0 = None
    with torch.inference_mode():
        for i, (images, _) in enumerate(val.epoch(0)):
            if i == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0, n = time.perf_counter(), 0
            with autocast():
                model(_to_input(images, cfg.channels_last))
            n += len(images)
            if i >= 3:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0) if t0 else 1000.0


def plan_budget(cfg, budget_s, step_s, eval_rate, n_train, n_val, elapsed_s) -> dict[str, Any]:
    """Fit the schedule to what is left of the wall-clock budget.

    Each epoch ends with a validation pass; when the budget does not hold a whole number
    of full epochs, the epochs are shortened evenly (each still sees a fresh shuffle), so
    the whole budget is used and the OneCycle schedule ends exactly when time does.
    """
    full = max(1, n_train // cfg.batch_size)
    val_s = n_val / max(eval_rate, 1e-6)
    left = budget_s * BUDGET_SAFETY - elapsed_s
    if left < step_s * 10 + val_s:
        raise UserError(
            f"a {budget_s / 60:.1f}-minute budget is too short: one step takes {step_s:.2f} s and "
            f"{elapsed_s:.0f} s are already spent on loading and measuring"
        )
    epochs = 1
    while True:
        total_steps = int((left - epochs * val_s) // step_s)
        if total_steps <= epochs * full or total_steps < 10:
            break
        epochs += 1
    total_steps = max(10, total_steps)
    steps_per_epoch = min(full, max(1, total_steps // epochs))
    return {
        "budget_s": budget_s,
        "step_s": step_s,
        "eval_images_per_s": eval_rate,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "full_epoch_steps": full,
        "total_steps": epochs * steps_per_epoch,
        "planned_s": elapsed_s + epochs * (steps_per_epoch * step_s + val_s),
        # wall-clock seconds for training + intermediate validation; the last validation
        # pass comes after it
        "train_window_s": left - val_s,
    }


SCHEDULE_TICKS = 10_000
#: A budgeted run starts another epoch only if the time left holds at least this many steps.
MIN_LAST_EPOCH_STEPS = 10


class BudgetProgress:
    """Drives a step-based LR schedule by the fraction of the time budget spent.

    The measured step time only sizes the epochs; the schedule itself follows the clock,
    so it ends on time whether steps then run slower than measured (another process on the
    machine, thermal limits) or faster (more steps are taken). ``elapsed_before`` carries
    the time of an interrupted run into its resumption.
    """

    def __init__(self, plan: dict[str, Any], elapsed_before: float = 0.0, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.window = plan["train_window_s"]
        self.elapsed_before = elapsed_before
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def fraction(self) -> float:
        return min(1.0, self.elapsed() / self.window)

    def too_little_left(self, step_s: float, val_s: float) -> bool:
        """True when the rest of the window is not worth another epoch: it holds fewer than
        ``MIN_LAST_EPOCH_STEPS`` steps, or less training than the validation pass that would
        follow it (a 5-minute run once began a second epoch for one step, then spent 22 s
        validating it and overran its budget). The learning rate is by then near the end of
        its annealing, and the time goes to the final validation instead."""
        left = distributed.broadcast_floats([self.window - self.elapsed()], self.device)[0]  # rank 0's clock
        return left < max(MIN_LAST_EPOCH_STEPS * step_s, val_s)

    def advance(self, scheduler: Any) -> bool:
        """Step ``scheduler`` (built for SCHEDULE_TICKS) up to the current progress; True when done."""
        frac = distributed.broadcast_floats([self.fraction()], self.device)[0]  # rank 0's clock rules
        target = min(SCHEDULE_TICKS - 1, int(frac * SCHEDULE_TICKS))
        while scheduler.last_epoch < target:
            scheduler.step()
        return frac >= 1.0


def _warming_up(cfg: TrainConfig, scheduler: Any) -> bool:
    """True while a OneCycle schedule is still raising the LR.

    Validation loss is expected to wobble on the way up to the peak LR; counting those
    epochs towards early stopping would stop a run at its noisiest point.
    """
    if cfg.scheduler != "onecycle":
        return False
    return scheduler.last_epoch < scheduler.total_steps * ONECYCLE_PCT_START


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
) -> str:
    """Train, publish a new version and return its id."""
    t_start = time.perf_counter()
    registry.check_writable()
    run_dir: Path | None = None
    info: dict[str, Any] | None = None
    if resume:
        run_dir = registry.runs_dir() / resume
        if not (run_dir / checkpoint.STATE_JSON).is_file():
            raise UserError(f"no interrupted run {resume!r} under {registry.runs_dir()}")
        info = checkpoint.read_run_info(run_dir)
        cfg = TrainConfig.from_dict(info["config"])
        data_src = info["data"]["source"]
        version = resume
    else:
        version = new_version_id()

    dd, dev = distributed.setup(device)
    version = distributed.broadcast_str(version, dev)
    progress = progress and dd.main
    say = print if dd.main else (lambda *a, **k: None)
    if not resume:
        say(f"run {version} (if interrupted: train --resume {version})", flush=True)
    torch.manual_seed(cfg.seed)
    data = load_images(data_src, split=["train"], progress=progress)
    if info and data.sha256 != info["data"]["sha256"]:
        raise UserError(f"{data_src} changed since the run started (sha256 differs); cannot resume")
    if len(data.class_names) < 2:
        raise UserError("training needs at least two classes")
    train_idx, val_idx = split_train_val(len(data), cfg.val_fraction, cfg.seed)
    if cfg.max_train_images:
        train_idx = train_idx[: cfg.max_train_images]
    if cfg.max_val_images:
        val_idx = val_idx[: cfg.max_val_images]
    bg_idx = train_idx[pick_background(data.labels[train_idx], cfg.background_count, cfg.seed, len(data.class_names))]
    background = data.images[bg_idx]

    images = data.images.to(dev)
    labels = data.labels.to(dev)
    rank_batch = max(1, cfg.batch_size // dd.world)  # cfg.batch_size stays the global batch
    train_b = Batches(
        images[train_idx.to(dev)],
        labels[train_idx.to(dev)],
        rank_batch,
        True,
        cfg.seed,
        drop_last=len(train_idx) // dd.world >= 2 * rank_batch,
        rank=dd.rank,
        world=dd.world,
    )
    val_b = Batches(
        images[val_idx.to(dev)], labels[val_idx.to(dev)], cfg.eval_batch_size, False, rank=dd.rank, world=dd.world
    )
    del images, labels

    net = build_model(
        len(data.class_names),
        dropout=cfg.dropout,
        weights=cfg.weights if not info else None,
        zero_init_residual=cfg.zero_init_residual,
    )
    model = Classifier(net, Preprocess(cfg.image_size, CIFAR10_MEAN, CIFAR10_STD)).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    aug = train_augmentation(cfg).to(dev)
    autocast = autocast_for(cfg, dev)
    train_model = model
    if dd.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    plan = info["plan"] if info else None
    if plan is None and cfg.time_budget_min:
        step_s = measure_step_time(model, aug, cfg, autocast, train_b, dev)
        eval_rate = measure_eval_rate(model, cfg, autocast, val_b, dev) * dd.world
        step_s, eval_rate, elapsed = distributed.broadcast_floats(
            [step_s, eval_rate, time.perf_counter() - t_start], dev
        )
        plan = plan_budget(cfg, cfg.time_budget_min * 60, step_s, eval_rate, len(train_b.labels),
                           len(val_b.labels), elapsed)  # fmt: skip
        cfg = cfg.override(epochs=plan["epochs"])
        say(
            f"budget {cfg.time_budget_min:g} min: {step_s * 1000:.0f} ms/step "
            f"({cfg.batch_size / step_s:.0f} img/s) -> {plan['epochs']} epoch(s) of "
            f"{plan['steps_per_epoch']} steps, about {plan['planned_s'] / 60:.1f} min",
            flush=True,
        )
    steps_per_epoch = plan["steps_per_epoch"] if plan else len(train_b)
    optimizer = make_optimizer(cfg, model.net)
    budgeted = plan is not None and cfg.scheduler == "onecycle"
    scheduler = make_scheduler(cfg, optimizer, total_steps=SCHEDULE_TICKS if budgeted else cfg.epochs * steps_per_epoch)

    run_dir = run_dir or registry.runs_dir() / version
    history: list[dict[str, Any]] = []
    start_epoch = 0
    best = {"val_loss": math.inf, "val_accuracy": 0.0, "epoch": -1}
    bad_epochs = 0
    global_step = 0
    if info:
        info = checkpoint.restore_run_state(run_dir, net=model.net, optimizer=optimizer, scheduler=scheduler)
        history, best, bad_epochs = info["history"], info["best"], info["bad_epochs"]
        start_epoch = info["epoch"] + 1
        global_step = info["global_step"]
        say(f"resuming {version} after epoch {start_epoch} of {cfg.epochs}", flush=True)
    graphed = False
    if cfg.cuda_graphs and dev.type == "cuda" and not dd.enabled and train_b.drop_last:
        images0, _ = next(train_b.epoch(10**6))
        graphed = graph_model(model, cfg, autocast, prepare_input(images0, aug, cfg))
        say(f"CUDA graphs: {'on' if graphed else 'off (capture failed)'}", flush=True)
    data_info = {
        "source": data_src,
        "split": data.split,
        "sha256": data.sha256,
        "images": len(data),
        "skipped_images": len(data.skipped),
        "train_size": len(train_b.labels),
        "val_size": len(val_b.labels),
    }

    stopped_early = False
    budget = BudgetProgress(plan, info["elapsed_s"] if info else 0.0, dev) if budgeted else None
    time_up = False
    last_epoch = 10**6 if budget is not None else cfg.epochs  # a budgeted run ends when time does
    of_epochs = f"~{cfg.epochs}" if budget is not None else str(cfg.epochs)
    for epoch in range(start_epoch, last_epoch):
        # augmentation + dropout: resumable exactly; each rank draws its own
        torch.manual_seed(cfg.seed * 1000 + epoch + 1_000_003 * dd.rank)
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        seen = 0
        bar = tqdm(
            train_b.epoch(epoch),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{of_epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
        )
        epoch_steps = 0
        for step, (xb, yb) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            loss, ok = train_step(train_model, aug, optimizer, cfg, autocast, xb, yb)
            global_step += 1
            epoch_steps += 1
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
        val_loss, val_acc = evaluate_loss(model, val_b, autocast, cfg.channels_last, progress)
        val_s = time.perf_counter() - t_val
        if cfg.scheduler == "plateau":
            scheduler.step(val_loss)
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
        }
        history.append(row)
        say(
            f"epoch {epoch + 1}/{of_epochs}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
            f"val loss {val_loss:.4f} acc {val_acc:.4f} | "
            f"{row['images_per_second']:.0f} img/s, {row['epoch_seconds']:.0f} s",
            flush=True,
        )
        if val_loss < best["val_loss"]:
            best = {"val_loss": val_loss, "val_accuracy": val_acc, "epoch": epoch + 1}
            bad_epochs = 0
            if dd.main:
                run_dir.mkdir(parents=True, exist_ok=True)
                checkpoint.save_best(run_dir, model.net)
        elif not _warming_up(cfg, scheduler):
            bad_epochs += 1
        if dd.main:
            checkpoint.save_run_state(
                run_dir,
                net=model.net,
                optimizer=optimizer,
                scheduler=scheduler,
                info={
                    "config": cfg.to_dict(),
                    "data": data_info,
                    "plan": plan,
                    "epoch": epoch,
                    "global_step": global_step,
                    "elapsed_s": budget.elapsed() if budget else 0.0,
                    "history": history,
                    "best": best,
                    "bad_epochs": bad_epochs,
                },
            )
        if bad_epochs >= cfg.early_stop_patience:
            say(f"early stop: validation loss has not improved for {bad_epochs} epochs", flush=True)
            stopped_early = True
            break
        if budget is not None and not time_up and budget.too_little_left(train_s / max(epoch_steps, 1), val_s):
            time_up = True
        if time_up:
            say(f"time budget spent after {epoch + 1} epoch(s), {global_step} steps", flush=True)
            break

    if dd.main:
        _publish(registry, version, model, run_dir, cfg, data, data_info, plan, history, best, stopped_early,
                 global_step, background, bg_idx, dev, dd, graphed)  # fmt: skip
    distributed.barrier()
    distributed.cleanup()
    return version


def _publish(registry, version, model, run_dir, cfg, data, data_info, plan, history, best, stopped_early,
             global_step, background, bg_idx, dev, dd, graphed=False) -> None:  # fmt: skip
    """Load the best epoch's weights and write the version (rank 0 only)."""
    model.net.load_state_dict(checkpoint.load_best(run_dir))
    metadata = {
        "version": version,
        "name": "resnet50-cifar10",
        "architecture": "resnet50",
        "head": f"Dropout({cfg.dropout}) + Linear(2048, {len(data.class_names)})",
        "class_names": data.class_names,
        "num_classes": len(data.class_names),
        "source_size": SOURCE_SIZE,
        "input_size": cfg.image_size,
        "normalization": {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)},
        "profile": cfg.profile,
        "hyperparameters": cfg.to_dict(),
        "budget_plan": plan,
        "data": data_info,
        "epochs_run": len(history),
        "steps_run": global_step,
        "stopped_early": stopped_early,
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "best_val_accuracy": best["val_accuracy"],
        "background": {"count": len(background), "indices": bg_idx.tolist()},
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "world_size": dd.world,
        "cuda_graphs": graphed,
        "train_seconds": sum(r["epoch_seconds"] for r in history),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    registry.publish(version, model.net, metadata, background, history)
    shutil.rmtree(run_dir, ignore_errors=True)
