"""Figures for a version's folder and its report (matplotlib, headless): to a path or a file object."""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def confusion_matrix_png(
    cm: list[list[int]], class_names: list[str], path: Path | BinaryIO, title: str = ""
) -> Path | BinaryIO:
    arr = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=120)
    im = ax.imshow(arr, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix {title}".strip())
    threshold = arr.max() / 2 if arr.size else 0
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            ax.text(
                j,
                i,
                str(arr[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if arr[i, j] > threshold else "black",
            )
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def training_curves_png(history: list[dict[str, Any]], path: Path | BinaryIO, title: str = "") -> Path | BinaryIO:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="validation")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    fig.suptitle(f"Training curves {title}".strip())
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
