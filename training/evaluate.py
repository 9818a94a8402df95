"""Evaluation of a registered version: metrics.json, confusion-matrix and curves PNGs,
and tables shaped like the study's Tables 4 (overall) and 5 (per class)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from tqdm import tqdm

from shapcore.errors import UserError
from shapcore.registry import CONFUSION_PNG, CURVES_PNG, LoadedVersion, Registry
from training.data import ImageSet, load_images, split_train_val

EVAL_SPLITS = ["test", "val", "validation", "valid"]


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro and per-class precision/recall/F1/support, confusion matrix.

    Classes absent from both truth and prediction get 0 (scikit-learn's zero_division=0).
    """
    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "macro": {"precision": float(mp), "recall": float(mr), "f1": float(mf)},
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
        "num_images": len(y_true),
    }


@torch.inference_mode()
def predict_probabilities(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256, progress: bool = True
) -> np.ndarray:
    """Softmax probabilities (N, classes), float32, in ``images``' order."""
    device = next(model.parameters()).device
    probs = []
    for start in tqdm(
        range(0, len(images), batch_size), desc="evaluate", unit="batch", disable=not progress, leave=False
    ):
        probs.append(model(images[start : start + batch_size].to(device)).float().softmax(1).cpu())
    return torch.cat(probs).numpy() if probs else np.zeros((0, 0), dtype=np.float32)


def predict_all(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256, progress: bool = True
) -> np.ndarray:
    """Top-1 class per image."""
    probs = predict_probabilities(model, images, batch_size, progress)
    return probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)


def holdout_subset(data: ImageSet, meta: dict[str, Any]) -> ImageSet:
    """The validation part of the training split that ``meta``'s run held out."""
    if data.sha256 != meta["data"]["sha256"] or data.split != meta["data"]["split"]:
        raise UserError("--holdout needs the very data the version was trained on (sha256 or split differs)")
    hp = meta["hyperparameters"]
    _, val_idx = split_train_val(len(data), hp["val_fraction"], hp["seed"])
    return ImageSet(
        data.images[val_idx],
        data.labels[val_idx],
        data.class_names,
        data.source,
        data.split + "[holdout]",
        data.sha256,
        data.skipped,
    )


def load_eval_images(
    loaded: LoadedVersion, data_src: str, *, split: str | None = None, holdout: bool = False, progress: bool = True
) -> ImageSet:
    """The images to score ``loaded`` on: ``split`` of ``data_src`` (default: test, val or the
    only split), or with ``holdout`` the validation part of the training data it held out."""
    data = load_images(
        data_src,
        split=split or (["train"] if holdout else EVAL_SPLITS),
        class_names=loaded.class_names,
        progress=progress,
    )
    return holdout_subset(data, loaded.metadata) if holdout else data


def run(
    registry: Registry,
    version: str,
    data_src: str,
    *,
    split: str | None = None,
    holdout: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    loaded = registry.load(version, device=device)
    version = loaded.version
    data = load_eval_images(loaded, data_src, split=split, holdout=holdout, progress=progress)
    t0 = time.perf_counter()
    y_pred = predict_all(loaded.model, data.images, progress=progress)
    seconds = time.perf_counter() - t0
    metrics = compute_metrics(data.labels.numpy(), y_pred, loaded.class_names)
    metrics.update(
        {
            "version": version,
            "data": {
                "source": data_src,
                "split": data.split,
                "sha256": data.sha256,
                "skipped_images": len(data.skipped),
            },
            "seconds": seconds,
            "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    registry.write_metrics(version, metrics)
    from training import plots

    plots.confusion_matrix_png(
        metrics["confusion_matrix"], loaded.class_names, loaded.path / CONFUSION_PNG, title=f"{version} on {data.split}"
    )
    history = registry.history(version)
    if history:
        plots.training_curves_png(history, loaded.path / CURVES_PNG, title=version)
    registry.attach(version, CONFUSION_PNG, *([CURVES_PNG] if history else []))
    return metrics


def format_tables(metrics: dict[str, Any]) -> str:
    """Table 4 (overall) and Table 5 (per class), as the study lays them out."""
    m = metrics["macro"]
    lines = [
        "Table 4: overall performance",
        f"{'Metric':<12}{'Value':>10}",
        f"{'Accuracy':<12}{metrics['accuracy'] * 100:>9.2f}%",
        f"{'Precision':<12}{m['precision']:>10.3f}",
        f"{'Recall':<12}{m['recall']:>10.3f}",
        f"{'F1-score':<12}{m['f1']:>10.3f}",
        "",
        "Table 5: per-class performance",
        f"{'Class':<12}{'Precision':>10}{'Recall':>10}{'F1-score':>10}{'Support':>10}",
    ]
    for name, row in metrics["per_class"].items():
        lines.append(
            f"{name:<12}{row['precision']:>10.3f}{row['recall']:>10.3f}{row['f1']:>10.3f}{row['support']:>10d}"
        )
    lines.append(
        f"{'macro avg':<12}{m['precision']:>10.3f}{m['recall']:>10.3f}{m['f1']:>10.3f}{metrics['num_images']:>10d}"
    )
    return "\n".join(lines)
