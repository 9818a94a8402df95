"""Fitting a run to a wall-clock budget (``--time-budget``): measure a step and a validation
pass, plan the epochs, and drive the learning-rate schedule by the clock.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from shapcore.errors import UserError
from training import distributed
from training.presets import make_optimizer
from training.steps import Batches, to_input, train_step

BUDGET_SAFETY = 0.95  # plan for 95% of the budget: step times drift a little


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
                model(to_input(images, cfg.channels_last))
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
