"""Cheap, noisy, unbiased Shapley labels for the amortised explainer (stochastic amortization).

Covert, Kim, Lee et al. ("Stochastic Amortization", NeurIPS 2024) fit the explainer by plain
regression to per-image estimates that are noisy but unbiased: the noise averages out across
images, and a label is paid for once however many epochs reuse it. Here a label is Leverage SHAP
(:func:`shapcore.shapley.estimate_shapley`, Musco & Witter, ICLR 2025) with a few hundred
evaluations of the version's value function over the 64 grid cells (``mean`` fill), every
class at once. It is the same value function as FastSHAP's objective (:class:`training.explainer_game.Game`)
and as the reference KernelSHAP the explainer is scored against.

No flip augmentation: a mirrored image's values are its label's cells mirrored only when the
fill is its own mirror image, and the ``mean`` fill (100 stored training images averaged) is not
quite one; a label must stay unbiased.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shapcore.agreement import spearman
from shapcore.fastshap import Network, efficient_normalize
from shapcore.players import GRID_CELLS
from shapcore.shapley import estimate_shapley

M = GRID_CELLS * GRID_CELLS


def label_images(
    game, images: torch.Tensor, null: torch.Tensor, samples: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, 32, 32) -> (their probabilities (N, C), Leverage SHAP values (N, 64, C)),
    ``samples`` evaluations each, both on the CPU whatever the game's device (the labels pool stays
    in host memory); ``game`` is a :class:`training.explainer_game.Game`."""
    x = images.float() / 255.0
    grand = game.grand(x).cpu()
    A = game.A
    v_empty = null.double().cpu().numpy()
    phis = []
    for i in range(len(x)):
        xi = x[i : i + 1]

        def value(z: np.ndarray, xi: torch.Tensor = xi) -> np.ndarray:
            keep = torch.from_numpy(z.astype(np.float32)).to(A.device) @ A
            return game.values(xi, keep.unsqueeze(0))[0].double().cpu().numpy()

        est = estimate_shapley(value, M, samples, method="leverage", v_empty=v_empty,
                               v_full=grand[i].double().numpy(), seed=seed + i)  # fmt: skip
        phis.append(torch.from_numpy(est.values).float())
    return grand, torch.stack(phis)


def label_loss(phi: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Squared error summed over cells and classes, mean over images."""
    return ((phi - labels) ** 2).sum(dim=(1, 2)).mean()


@dataclass
class LabelValidation:
    """Held-out images with labels computed once: the fit's yardstick under the labels objective.

    The labels are noisy, but their noise is independent of the explainer, so the loss against
    them ranks explainers as the loss against exact values would (it adds a constant). The
    *gain* is the share of the even split's error removed; ``rho`` the median Spearman ρ over
    the images' predicted class (against noisy labels: a floor of the ρ against exact values).
    """

    x: torch.Tensor  # float images in [0, 1]
    grand: torch.Tensor
    labels: torch.Tensor
    null: torch.Tensor

    def __post_init__(self) -> None:
        even = efficient_normalize(torch.zeros_like(self.labels), self.grand, self.null)
        self.even_error = float(((even - self.labels) ** 2).sum())

    def score(self, net: Network) -> tuple[float, float, float]:
        """(loss per image, gain over the even split, median ρ on the predicted class)."""
        net.eval()
        with torch.no_grad():
            phi = torch.cat([efficient_normalize(net(self.x[i : i + 64], self.grand[i : i + 64]),
                                                 self.grand[i : i + 64], self.null)
                             for i in range(0, len(self.x), 64)])  # fmt: skip
        net.train()
        residual = float(((phi - self.labels) ** 2).sum())
        target = self.grand.argmax(dim=1)
        phi, labels = phi.cpu(), self.labels.cpu()
        rhos = [spearman(phi[i, :, t].numpy(), labels[i, :, t].numpy()) for i, t in enumerate(target.tolist())]
        rho = float(np.nanmedian(rhos)) if rhos else float("nan")
        return residual / len(self.x), 1.0 - residual / max(self.even_error, 1e-30), rho
