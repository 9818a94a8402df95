"""The value function every explainer shares: the model on the image with hidden parts filled.

A hidden pixel is filled from the background (:class:`shapcore.background.BackgroundSet`): a
model input is ``x ⊙ w + bg ⊙ (1 − w)`` for a per-pixel keep weight ``w`` in [0, 1], and its
value is the model's class probabilities averaged over the background images (their
weights). KernelSHAP's coalitions of superpixels become keep weights through the area
weights (``w = z·A``); the partition explainer's pixel masks and the faithfulness curves use
the same fill through :meth:`CoalitionModel.keep_probabilities`, so every method and every
figure hides a part of the image the same way.

For a 32×32 upload A is a 0/1 matrix and this is exactly the shap docs' hard masking; for
larger uploads a model pixel straddling two superpixels is blended in proportion, which is
what reducing a masked full-size image would give.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from shapcore.background import BackgroundSet


class CoalitionModel:
    """``f(Z)``: (K, M) coalitions -> (K, classes) probabilities, background-averaged.

    Masking is one matrix product (``Z @ A`` -> per-pixel keep weights) and one broadcast
    blend to K×B images; the model runs on ``batch_size`` images at a time. The all-ones
    coalition (the image itself) needs one evaluation, not B.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image: torch.Tensor,
        segmentation_weights: np.ndarray,
        background: BackgroundSet,
        *,
        batch_size: int = 256,
        progress: Callable[[int], None] | None = None,
        device: torch.device | str = "cpu",
        fx: np.ndarray | None = None,
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        pixels = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        self.x = pixels.unsqueeze(0).unsqueeze(0).to(self.device)
        self.A = torch.from_numpy(segmentation_weights).to(self.device)  # masks are built where the model runs
        self.bg = background.images.unsqueeze(0).to(self.device)  # (1, B, 3, H, W)
        self.bg_weights = background.weights.double().to(self.device)
        self.B = len(background)
        self.batch_size = max(1, int(batch_size))
        self.rows_per_batch = max(1, self.batch_size // self.B)
        self.progress = progress
        self.evaluations = 0
        self.rows = 0
        self.forward_seconds = 0.0
        self._fx: np.ndarray | None = None if fx is None else np.asarray(fx, dtype=np.float64)  # f(x), if known

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            probs = torch.softmax(self.model(images).float(), dim=-1)
        self.forward_seconds += time.perf_counter() - start
        self.evaluations += int(images.shape[0])
        return probs

    def fx(self) -> np.ndarray:
        if self._fx is None:
            self._fx = self._forward(self.x[0]).double().cpu().numpy()[0]
        return self._fx

    @property
    def classes(self) -> int:
        return int(self.fx().shape[0])

    def masked_images(self, keep: torch.Tensor) -> torch.Tensor:
        """(k, P) per-pixel keep weights (P = 32·32) -> (k·B, 3, 32, 32) float images in [0, 1]."""
        side = self.x.shape[-1]
        w = keep.view(-1, 1, 1, side, side)
        images = self.x * w + self.bg * (1.0 - w)  # (k, B, 3, H, W); exact 0/1 masking for 0/1 weights
        return images.reshape(-1, *self.x.shape[2:])

    def keep_probabilities(self, keep: np.ndarray | torch.Tensor) -> np.ndarray:
        """(k, P) per-pixel keep weights -> (k, classes) background-weighted probabilities.

        A row of ones is the image itself (one evaluation, not B).
        """
        keep = torch.as_tensor(keep, dtype=torch.float32, device=self.device).reshape(keep.shape[0], -1)
        out = np.empty((keep.shape[0], self.classes), dtype=np.float64)
        full = (keep.min(dim=1).values >= 1.0).cpu().numpy()
        out[full] = self.fx()
        rest = np.flatnonzero(~full)
        for start in range(0, len(rest), self.rows_per_batch):
            rows = rest[start : start + self.rows_per_batch]
            images = self.masked_images(keep[torch.from_numpy(rows).to(self.device)])
            probs = self._forward(images).double().view(len(rows), self.B, -1)
            out[rows] = (probs * self.bg_weights.view(1, -1, 1)).sum(dim=1).cpu().numpy()
            self.rows += len(rows)
            if self.progress is not None:
                self.progress(self.rows)
        self.rows += int(full.sum())
        return out

    def __call__(self, Z: np.ndarray) -> np.ndarray:
        """(K, M) coalitions of superpixels (1 kept, 0 hidden) -> (K, classes) probabilities."""
        Z = torch.from_numpy(np.asarray(Z, dtype=np.float32)).to(self.device)
        return self.keep_probabilities(Z @ self.A)


def masked_probabilities(
    model: torch.nn.Module,
    images: torch.Tensor,
    keep: torch.Tensor,
    background: BackgroundSet,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """Many images at once: (N, 3, H, W) float images in [0, 1] and (N, K, H·W) per-pixel keep
    weights -> (N, K, classes) probabilities, background-weighted, float32.

    The same fill and the same average as :class:`CoalitionModel` (one image, K coalitions),
    for callers that value many images' coalitions in one pass: the amortised explainer's
    training (:mod:`training.fastshap`) and its faithfulness figures. A test holds the two
    equal. Runs where ``images`` are; no gradients.
    """
    n, k = keep.shape[:2]
    side = images.shape[-1]
    bg = background.images.to(images.device).unsqueeze(0)  # (1, B, 3, H, W)
    weights = background.weights.to(images.device, torch.float32).view(1, -1, 1)
    b = len(background)
    w = keep.reshape(n * k, 1, 1, side, side).to(images.dtype)  # one row per (image, coalition)
    owner = torch.arange(n, device=images.device).repeat_interleave(k)
    rows = max(1, batch_size // b)
    parts = []
    with torch.inference_mode():
        for start in range(0, n * k, rows):
            sel = slice(start, start + rows)
            blended = images[owner[sel]].unsqueeze(1) * w[sel] + bg * (1.0 - w[sel])  # (r, B, 3, H, W)
            logits = model(blended.reshape(-1, 3, side, side).contiguous(memory_format=torch.channels_last))
            probs = torch.softmax(logits.float(), dim=-1).view(-1, b, logits.shape[-1])
            parts.append((probs * weights).sum(dim=1))
    if not parts:
        return torch.empty(n, k, 0, device=images.device)
    return torch.cat(parts).view(n, k, -1)
