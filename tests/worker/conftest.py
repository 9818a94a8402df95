"""The explanation worker (``worker``) in-process: the methods, KernelSHAP's uncertainty, the
runtime and its device, and (test_worker.py, test_device.py) real ``python -m worker``
processes on the suite's Redis. The quick tests use the stand-in below, not the smoke model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from shapcore.background import BackgroundSet
from shapcore.value import CoalitionModel

#: The stand-in's weights on its four quadrants (top-left, top-right, bottom-left, bottom-right):
#: the bottom-left quadrant plays no part in any class.
QUADRANT_WEIGHTS = torch.tensor([[6.0, 0.0, 0.0, 2.0], [0.0, -3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


class QuadrantModel(nn.Module):
    """A tiny stand-in classifier: float images (N, 3, 32, 32) in [0, 1] -> 3 logits, each a fixed
    weighted sum of the four quadrants' mean brightness (:data:`QUADRANT_WEIGHTS`)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().mean(1)  # (N, 32, 32)
        quads = torch.stack([x[:, :16, :16], x[:, :16, 16:], x[:, 16:, :16], x[:, 16:, 16:]], 1).flatten(2).mean(2)
        return quads @ QUADRANT_WEIGHTS.T


def quadrant_weights() -> np.ndarray:
    """(4, 32·32) area weights of the four quadrants as players (what ``Segmentation.weights`` holds)."""
    labels = np.zeros((32, 32), dtype=np.int64)
    labels[:16, 16:], labels[16:, :16], labels[16:, 16:] = 1, 2, 3
    return np.stack([(labels == k).astype(np.float32).ravel() for k in range(4)])


@pytest.fixture
def stand_in_game() -> CoalitionModel:
    """The stand-in's value function over its quadrants: a white image, a black fill."""
    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    black = BackgroundSet(images=torch.zeros(1, 3, 32, 32), weights=torch.ones(1))
    return CoalitionModel(QuadrantModel().eval(), white, quadrant_weights(), black)
