"""The shap docs' image example, kept as written there: the yardstick for tests and ``bench/``.

``mask_image`` loops over coalitions and superpixels and the model is called once per
coalition (on that coalition's B masked images, one per background image). Nothing here is
used to serve requests: :mod:`worker.explain` computes the same values in batches.
"""

from __future__ import annotations

import numpy as np
import torch

from shapcore.background import BackgroundSet


def mask_image(zs: np.ndarray, segmentation: np.ndarray, image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The docs' ``mask_image``: hidden superpixels take the background's pixels (H×W×3 arrays)."""
    out = np.zeros((zs.shape[0], image.shape[0], image.shape[1], image.shape[2]))
    for i in range(zs.shape[0]):
        out[i, :, :, :] = image
        for j in range(zs.shape[1]):
            if zs[i, j] == 0:
                out[i][segmentation == j, :] = background[segmentation == j, :]
    return out


def plain_value_function(
    model: torch.nn.Module, image: np.ndarray, segmentation: np.ndarray, background: BackgroundSet
):
    """``f(z)`` for ``shap.KernelExplainer`` the plain way; ``image`` uint8 32×32×3, labels 32×32.

    Pixel values are floats in [0, 1], as the batched path feeds the model.
    """
    img = image.astype(np.float64) / 255.0
    backgrounds = background.images.permute(0, 2, 3, 1).double().numpy()
    weights = background.weights.double().numpy()

    def f(z: np.ndarray) -> np.ndarray:
        out = []
        for row in z:
            masked = np.concatenate([mask_image(row[None], segmentation, img, bg) for bg in backgrounds])
            batch = torch.from_numpy(masked).permute(0, 3, 1, 2).float()
            with torch.inference_mode():
                probs = torch.softmax(model(batch), dim=-1).double().numpy()
            out.append((probs * weights[:, None]).sum(axis=0))
        return np.array(out)

    return f
