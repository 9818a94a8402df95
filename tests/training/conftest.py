"""Training (``training``) in-process: data sources, the model and its registry round trip, the
CLI, a run's behaviour (learning, early stopping, budgets), starting weights, the report."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def training_classifier():
    """The model a smoke training run builds (``training.setup``): what it steps, and what its
    evaluation (validation loss, early stopping) scores. Random weights, no download."""
    import torch

    from training.distributed import Dist
    from training.presets import PROFILES
    from training.setup import _build_model

    model, _ = _build_model(PROFILES["smoke"], 10, Dist(), torch.device("cpu"), None)
    return model.eval()
