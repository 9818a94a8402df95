"""What every method shares: its input (:class:`MethodContext`), its output (:class:`Attribution`)
and the small helpers the pixel methods need.

Every method explains the same thing, the model's class probabilities on one image, with
the same players and the same fill for a hidden part (the value function
:class:`shapcore.value.CoalitionModel`), and returns per-player values for every class. Pixel
methods (Grad-CAM, integrated gradients, the partition explainer's pixel grid) sum their
pixel map over each player's area weights and keep the map for the heatmap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shapcore.value import CoalitionModel


@dataclass
class MethodContext:
    """What a method may use. ``f`` is the shared value function (frozen model, fill, area
    weights ``f.A`` (M, 32·32)); ``autograd_model`` the same network with autograd (eager,
    ``None`` when the worker has none); ``fill``: the background images (B, 3, 32, 32) in
    [0, 1] with their weights, the baselines of the gradient methods."""

    f: CoalitionModel
    autograd_model: torch.nn.Module | None
    samples: int
    seed: int
    target: int
    auto: bool = False


@dataclass
class Attribution:
    """Per-superpixel values of every class, and what a reader needs to trust them.

    ``phi`` (M, C); ``base`` (C,): the value with every superpixel hidden; ``fx`` (C,): with
    none hidden; ``stderr`` (M, C) or None for methods with no sampling error; ``convergence``:
    ``{"converged": bool, "criterion": str, ...}``; ``pixel_maps`` (C, 32, 32) for pixel methods
    (drawn instead of the superpixel values); ``coalitions``: samples actually evaluated.
    """

    phi: np.ndarray
    base: np.ndarray
    fx: np.ndarray
    convergence: dict[str, Any]
    stderr: np.ndarray | None = None
    pixel_maps: np.ndarray | None = None
    coalitions: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def per_superpixel(pixel_maps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(C, 32, 32) pixel attributions -> (M, C): each superpixel's share of every pixel, summed."""
    flat = pixel_maps.reshape(pixel_maps.shape[0], -1).astype(np.float64)  # (C, P)
    return weights.astype(np.float64) @ flat.T  # (M, P) @ (P, C)


def all_hidden(ctx: MethodContext) -> np.ndarray:
    """``base``: the value with every pixel hidden (the fill alone, background-weighted)."""
    pixels = int(ctx.f.A.shape[1])
    return ctx.f.keep_probabilities(np.zeros((1, pixels), dtype=np.float32))[0]


def model_image(ctx: MethodContext) -> torch.Tensor:
    """The model input as a float (1, 3, 32, 32) batch in [0, 1]."""
    return ctx.f.x[0].detach().clone()


def require_autograd(ctx: MethodContext, method: str) -> torch.nn.Module:
    if ctx.autograd_model is None:
        raise ValueError(
            f"method {method!r} needs the model with autograd (the worker runtime's eager network); "
            "the frozen TorchScript model has no gradients"
        )
    return ctx.autograd_model.eval()


def probabilities_of(model: torch.nn.Module):
    def forward(images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(images).float(), dim=-1)

    return forward


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)
