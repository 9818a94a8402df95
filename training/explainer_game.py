"""The value function the amortised explainer is fitted against: the version's classifier as the
worker evaluates it, on the 8×8 grid's players with a fixed fill, on one device (CPU or CUDA).
Shared by ``fit-explainer`` (:mod:`training.fastshap`), its labels (:mod:`training.shapley_labels`)
and its scoring (:mod:`training.explainer_quality`).
"""

from __future__ import annotations

import torch

from shapcore.background import BackgroundSet
from shapcore.inference import prepare_for_explaining
from shapcore.players import GRID_CELLS, grid_weights
from shapcore.registry import LoadedVersion
from shapcore.value import masked_probabilities


def value_model(loaded: LoadedVersion, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The version's network exactly as the worker evaluates it on ``device`` (batch norms
    folded; frozen on the CPU, eager on CUDA: :func:`shapcore.inference.prepare_for_explaining`)."""
    loaded.model.to(device)
    return prepare_for_explaining(loaded.model, jit=True)[0]


class Game:
    """The value function of the grid's players on a batch of images (``mean`` fill), evaluated
    on ``device`` (the model's): inputs are moved there, values are returned there."""

    def __init__(
        self, model: torch.nn.Module, fill: BackgroundSet, batch_size: int = 256, device: torch.device | str = "cpu"
    ) -> None:
        self.device = torch.device(device)
        self.model, self.batch_size = model, batch_size
        self.fill = BackgroundSet(fill.images.to(self.device), fill.weights.to(self.device))
        self.A = torch.from_numpy(grid_weights(GRID_CELLS)).to(self.device)  # (64, 1024)
        self.evaluations = 0

    def grand(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C) probabilities on the images themselves."""
        keep = torch.ones(len(images), 1, self.A.shape[1], device=self.device)
        return self.values(images, keep)[:, 0]

    def null(self) -> torch.Tensor:
        """(C,) probabilities on the fill alone: v(∅), the same for every image."""
        return self.values(self.fill.images[:1].clone(), torch.zeros(1, 1, self.A.shape[1], device=self.device))[0, 0]

    def coalitions(self, images: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """(N, K, 64) coalitions -> (N, K, C) values."""
        return self.values(images, s.to(self.device) @ self.A)

    def values(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        self.evaluations += keep.shape[0] * keep.shape[1] * len(self.fill)
        return masked_probabilities(
            self.model, images.to(self.device), keep.to(self.device), self.fill, batch_size=self.batch_size
        )
