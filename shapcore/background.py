"""What fills a hidden player: the background named by ``background`` (see
:mod:`shapcore.explain.background`), built from the version's stored training images (the study
used 100 of them) or, for ``blur``, from the image itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shapcore.explain.background import BackgroundSpec


@dataclass(frozen=True)
class BackgroundSet:
    """``images``: float32 (B, 3, 32, 32) in [0, 1]; ``weights``: float32 (B,) summing to one."""

    images: torch.Tensor
    weights: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])


#: Gaussian blur of the ``blur`` background at the model's 32 px: a superpixel of the default
#: 50 is about 4.5 px across, so its inside is smoothed away, and its colours stay.
BLUR_SIGMA_PX = 2.5


def make_background(spec: BackgroundSpec, stored: torch.Tensor, model_input: torch.Tensor) -> BackgroundSet:
    """The fill named by ``spec``; ``stored``: uint8 (N, 3, 32, 32); ``model_input``: uint8 (3, 32, 32)."""
    if spec.kind == "blur":
        from torchvision.transforms.functional import gaussian_blur

        size = 2 * int(np.ceil(3 * BLUR_SIGMA_PX)) + 1
        blurred = gaussian_blur(model_input.float().unsqueeze(0) / 255.0, [size, size], [BLUR_SIGMA_PX] * 2)
        return BackgroundSet(images=blurred.contiguous(), weights=torch.ones(1))
    if spec.kind == "train":
        n = int(stored.shape[0])
        if not 1 <= spec.count <= n:
            raise ValueError(f"background train:{spec.count} needs {spec.count} stored images; the version has {n}")
        # The stored images are grouped by class: take a fixed random K of them, not the first K.
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: spec.count]
        images = stored[pick].float() / 255.0
        return BackgroundSet(images=images.contiguous(), weights=torch.full((spec.count,), 1.0 / spec.count))
    return summarize_background(stored, 1 if spec.kind == "mean" else spec.count)


def summarize_background(stored: torch.Tensor, count: int, *, seed: int = 0) -> BackgroundSet:
    """The version's stored training images (uint8 (N, 3, 32, 32)) as ``count`` weighted images.

    ``count == N``: the images themselves, equally weighted (the study's 100). ``count == 1``:
    their mean image. In between: k-means centroids weighted by cluster size (the idea of
    ``shap.kmeans``, without rounding pixels to observed values). Deterministic. NumPy only,
    no OpenMP: this may run in the worker's parent process before it forks.
    """
    n = int(stored.shape[0])
    if not 1 <= count <= n:
        raise ValueError(f"background must be between 1 and {n}, got {count}")
    data = stored.reshape(n, -1).numpy().astype(np.float64) / 255.0
    if count == n:
        centres, weights = data, np.full(n, 1.0 / n)
    elif count == 1:
        centres, weights = data.mean(axis=0, keepdims=True), np.ones(1)
    else:
        centres, weights = _kmeans(data, count, seed=seed)
    # k-means may return fewer centres than asked (a cluster that came out empty is dropped)
    images = torch.from_numpy(centres.astype(np.float32)).reshape(len(centres), *stored.shape[1:])
    return BackgroundSet(images=images.contiguous(), weights=torch.from_numpy(weights.astype(np.float32)))


def _kmeans(data: np.ndarray, k: int, *, seed: int, iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding; returns (centres, cluster-size weights)."""
    rng = np.random.default_rng(seed)
    sq = (data**2).sum(axis=1)
    centres = [data[rng.integers(len(data))]]
    for _ in range(1, k):
        d2 = np.min(sq[:, None] - 2 * data @ np.array(centres).T + (np.array(centres) ** 2).sum(1)[None], axis=1)
        d2 = np.maximum(d2, 0)
        probs = d2 / d2.sum() if d2.sum() > 0 else np.full(len(data), 1 / len(data))
        centres.append(data[rng.choice(len(data), p=probs)])
    c = np.array(centres)
    assign = np.zeros(len(data), dtype=np.int64)
    for _ in range(iterations):
        d2 = sq[:, None] - 2 * data @ c.T + (c**2).sum(1)[None]
        new_assign = d2.argmin(axis=1)
        for j in range(k):
            members = data[new_assign == j]
            if len(members):
                c[j] = members.mean(axis=0)
        if np.array_equal(new_assign, assign):
            break
        assign = new_assign
    counts = np.bincount(assign, minlength=k).astype(np.float64)
    keep = counts > 0
    return c[keep], counts[keep] / counts[keep].sum()
