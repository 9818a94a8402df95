"""Setting a training run up: resume state, data on the device, model, time-budget plan.

What :func:`training.train.run` fixes before its first epoch, gathered in a :class:`RunSetup`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shapcore.errors import UserError
from shapcore.model import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    NO_WEIGHTS,
    Classifier,
    Preprocess,
    WeightsUnavailable,
    build_model,
    starting_state,
)
from shapcore.registry import Registry
from training import checkpoint, distributed
from training.budget import measure_eval_rate, measure_step_time, plan_budget
from training.data import ImageSet, load_images, pick_background, split_train_val
from training.distributed import Dist
from training.presets import TrainConfig, train_augmentation
from training.steps import Batches, autocast_for

#: Held-out validation images stored with a version (shapcore.registry.VALIDATION_SAMPLE).
VALIDATION_SAMPLE = 500


@dataclass
class RunData:
    """The images a run reads: its train/validation batches and the explainer's background."""

    images: ImageSet
    train: Batches
    val: Batches
    background: torch.Tensor
    background_idx: torch.Tensor
    info: dict[str, Any]  # the ``data`` block of the metadata and of the resumable state
    #: (images, labels) of held-out validation images stored with the version (the bf16 check at load)
    validation_sample: tuple[torch.Tensor, torch.Tensor]


@dataclass
class RunSetup:
    """Everything fixed before the first epoch."""

    cfg: TrainConfig
    version: str
    run_dir: Path
    dd: Dist
    dev: torch.device
    data: RunData
    model: Classifier  # the model that is saved and published
    train_model: torch.nn.Module  # ``model``, or its DistributedDataParallel wrapper
    aug: torch.nn.Module
    autocast: Any
    plan: dict[str, Any] | None
    progress: bool
    weights: dict[str, Any]  # {"requested", "used", "note"}: the metadata's ``weights`` block

    def say(self, text: str) -> None:
        if self.dd.main:
            print(text, flush=True)


# -- setup --------------------------------------------------------------------------------
def resume_info(registry: Registry, version: str) -> dict[str, Any]:
    run_dir = registry.runs_dir() / version
    if not (run_dir / checkpoint.STATE_JSON).is_file():
        raise UserError(f"no interrupted run {version!r} under {registry.runs_dir()}")
    return checkpoint.read_run_info(run_dir)


def set_up(
    cfg: TrainConfig,
    data_src: str,
    registry: Registry,
    info: dict[str, Any] | None,
    version: str,
    device: str,
    progress: bool,
    weights_fallback: bool = True,
) -> RunSetup:
    """``weights_fallback``: when the ImageNet weights cannot be fetched, train from scratch
    with one line saying so (the profile's default) instead of failing (asked for by name)."""
    dd, dev = distributed.setup(device)
    version = distributed.broadcast_str(version, dev)
    progress = progress and dd.main
    if not info and dd.main:
        print(f"run {version} (if interrupted: train --resume {version})", flush=True)
    torch.manual_seed(cfg.seed)
    data = _load_data(cfg, data_src, info, dd, dev, progress)
    if info:
        weights = info.get("weights") or {"requested": cfg.weights, "used": cfg.weights, "note": None}
        model, train_model = _build_model(cfg, len(data.images.class_names), dd, dev, None)
    else:
        weights = _choose_weights(cfg, weights_fallback, dd.main)
        model, train_model = _build_model(cfg, len(data.images.class_names), dd, dev, weights.pop("state"))
        if weights["used"] not in (None, NO_WEIGHTS) and cfg.pretrained_lr:
            cfg = cfg.override(lr=cfg.pretrained_lr)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    return RunSetup(
        cfg=cfg,
        version=version,
        run_dir=registry.runs_dir() / version,
        dd=dd,
        dev=dev,
        data=data,
        model=model,
        train_model=train_model,
        aug=train_augmentation(cfg).to(dev),
        autocast=autocast_for(cfg, dev),
        plan=info["plan"] if info else None,
        progress=progress,
        weights=weights,
    )


def _load_data(
    cfg: TrainConfig, data_src: str, info: dict[str, Any] | None, dd: Dist, dev: torch.device, progress: bool
) -> RunData:
    """Decode the source, split it, pick the background and put the batches on the device."""
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

    images, labels = data.images.to(dev), data.labels.to(dev)
    train_idx, val_idx = train_idx.to(dev), val_idx.to(dev)
    rank_batch = max(1, cfg.batch_size // dd.world)  # cfg.batch_size stays the global batch
    drop_last = len(train_idx) // dd.world >= 2 * rank_batch
    train_b = Batches(images[train_idx], labels[train_idx], rank_batch, True, cfg.seed, drop_last=drop_last,
                      rank=dd.rank, world=dd.world)  # fmt: skip
    val_b = Batches(images[val_idx], labels[val_idx], cfg.eval_batch_size, False, rank=dd.rank, world=dd.world)
    data_info = {
        "source": data_src,
        "split": data.split,
        "sha256": data.sha256,
        "images": len(data),
        "skipped_images": len(data.skipped),
        "train_size": len(train_b.labels),
        "val_size": len(val_b.labels),
    }
    sample_idx = val_idx[:VALIDATION_SAMPLE].cpu()  # the split is a seeded permutation: a random sample
    sample = (data.images[sample_idx], data.labels[sample_idx])
    return RunData(data, train_b, val_b, data.images[bg_idx], bg_idx, data_info, sample)


def _choose_weights(cfg: TrainConfig, fallback: bool, say: bool) -> dict[str, Any]:
    """Fetch or read the starting weights once (rank by rank), falling back to random init
    when the ImageNet download fails and ``fallback`` allows it."""
    requested = cfg.weights or NO_WEIGHTS
    try:
        state = starting_state(requested)
    except WeightsUnavailable as exc:
        if not fallback:
            raise UserError(f"{exc}. Offline? `--weights none` trains from scratch; `--weights PATH` "
                            "reads a local ResNet-50 state dict (.safetensors or .pth)") from exc  # fmt: skip
        note = f"{exc}: training from scratch (random init) instead"
        if say:
            print(f"{note}. `--weights none` skips the download; `--weights PATH` reads a local state dict.",
                  flush=True)  # fmt: skip
        return {"requested": requested, "used": NO_WEIGHTS, "note": note, "state": None}
    if state is not None:  # ImageNet's 1000-class head is dropped: the run builds its own
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    return {"requested": requested, "used": requested, "note": None, "state": state}


def _build_model(
    cfg: TrainConfig, num_classes: int, dd: Dist, dev: torch.device, state: dict[str, torch.Tensor] | None
) -> tuple[Classifier, torch.nn.Module]:
    """The model to save, and the one to step (DDP-wrapped under torchrun), starting from
    the backbone ``state`` when there is one (a resumed run loads its own weights later)."""
    net = build_model(num_classes, dropout=cfg.dropout, zero_init_residual=cfg.zero_init_residual)
    if state is not None:
        missing, unexpected = net.load_state_dict(state, strict=False)  # the new head stays random
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise UserError(f"the starting weights do not fit ResNet-50: missing {missing}, unexpected {unexpected}")
    model = Classifier(net, Preprocess(cfg.image_size, CIFAR10_MEAN, CIFAR10_STD)).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not dd.enabled:
        return model, model
    from torch.nn.parallel import DistributedDataParallel

    return model, DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def fit_budget(setup: RunSetup, t_start: float) -> None:
    """Measure a step and a validation pass, then plan the epochs into ``setup`` (rank 0 decides)."""
    cfg, data, dev = setup.cfg, setup.data, setup.dev
    step_s = measure_step_time(setup.model, setup.aug, cfg, setup.autocast, data.train, dev)
    eval_rate = measure_eval_rate(setup.model, cfg, setup.autocast, data.val, dev) * setup.dd.world
    step_s, eval_rate, elapsed = distributed.broadcast_floats([step_s, eval_rate, time.perf_counter() - t_start], dev)
    plan = plan_budget(cfg, cfg.time_budget_min * 60, step_s, eval_rate, len(data.train.labels),
                       len(data.val.labels), elapsed)  # fmt: skip
    setup.plan = plan
    setup.cfg = cfg.override(epochs=plan["epochs"])
    setup.say(
        f"budget {cfg.time_budget_min:g} min: {step_s * 1000:.0f} ms/step "
        f"({cfg.batch_size / step_s:.0f} img/s) -> {plan['epochs']} epoch(s) of "
        f"{plan['steps_per_epoch']} steps, about {plan['planned_s'] / 60:.1f} min"
    )
