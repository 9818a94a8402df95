"""The explainers side by side: one context in, one :class:`Attribution` out.

Every method explains the same thing, the model's class probabilities on one image, with
the same players (the image's superpixels) and the same fill for a hidden part (the
value function :class:`shapcore.value.CoalitionModel`), and returns per-superpixel values
for every class. Pixel methods (Grad-CAM, integrated gradients, the partition explainer's
pixel grid) sum their pixel map over each superpixel's area weights and keep the map for
the heatmap.

- ``kernel``: ``shap.KernelExplainer`` over superpixel coalitions (:mod:`worker.kernel`);
- ``partition``: ``shap.PartitionExplainer`` with ``shap.maskers.Image`` over pixels;
- ``gradcam``: Captum's ``LayerGradCam`` on the last stage with a usable spatial size;
- ``integrated_gradients``: Captum's ``IntegratedGradients`` from the fill to the image.
"""

from __future__ import annotations

from collections.abc import Callable
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


def run_method(name: str, ctx: MethodContext) -> Attribution:
    return _methods()[name](ctx)


def _methods() -> dict[str, Callable[[MethodContext], Attribution]]:
    from worker.attribution import gradcam_attribution, integrated_gradients_attribution, partition_attribution
    from worker.kernel import kernel_attribution

    return {
        "kernel": kernel_attribution,
        "partition": partition_attribution,
        "gradcam": gradcam_attribution,
        "integrated_gradients": integrated_gradients_attribution,
    }
