"""Training and serving prepare an image identically: the preprocessing of the model a training
run builds and scores (its validation loss, early stopping) is the one the service and the
worker rebuild from the published version. A different mean, std or input size on either side
changes every prediction while each side's own tests still pass."""

from __future__ import annotations

from pathlib import Path

import torch

from shapcore.registry import Registry


def batch() -> torch.Tensor:
    """Images that tell every channel's mean and std apart: random uint8 pixels, plus pure black
    and pure white."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    images[0], images[1] = 0, 255
    return images


def test_serving_preprocesses_as_training_did(training_classifier, smoke_model: tuple[Path, str]) -> None:
    """One uint8 batch through training's preprocessing and through the one the registry rebuilds
    for the service and the worker (``Registry.load``, which both use): the same tensors."""
    registry, version = smoke_model
    served = Registry(registry).load(version).model
    images = batch()
    with torch.no_grad():
        trained_input = training_classifier.preprocess(images)
        served_input = served.preprocess(images)
    assert trained_input.shape == served_input.shape, "the input size differs"
    torch.testing.assert_close(served_input, trained_input, rtol=0, atol=1e-6)
    # the check has teeth: the preprocessing normalises (black and white are far from 0 and 1)
    assert trained_input[0].mean() < -1.5 and trained_input[1].mean() > 1.5


def test_the_worker_feeds_the_served_preprocessing(smoke_model: tuple[Path, str]) -> None:
    """The worker's eager model (what its value function and gradient methods run) keeps the
    version's preprocessing, and takes the float [0, 1] images its value function makes to the
    same network input as the uint8 ones."""
    from shapcore.jobs.settings import ExplainSettings
    from worker.runtime import Runtime

    registry, version = smoke_model
    settings = ExplainSettings(model_registry=registry, explain_runtime="torchscript", explain_jit=False)
    rt = Runtime(settings).load(version)
    served = Registry(registry).load(version).model
    images = batch()
    with torch.no_grad():
        worker_input = rt.autograd_model.preprocess(images.float() / 255.0)
        served_input = served.preprocess(images)
    torch.testing.assert_close(worker_input, served_input, rtol=0, atol=1e-6)
