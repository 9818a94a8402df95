"""The model host (shapcore/host.py): one loader for the API's serving form and the worker's
explaining form of a version. Both forms must compute the same function of the same image,
since /predict's answer and an explanation's "predicted" class are meant to agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shapcore.host import ModelHost
from shapcore.inference import Forward
from shapcore.registry import Registry

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def host(smoke_model: tuple[Path, str]) -> ModelHost:
    registry, _ = smoke_model
    return ModelHost(Registry(registry), torch.device("cpu"), runtime="torchscript", jit=True, batch_sizes=(1, 4))


def test_serving_and_explaining_forms_agree(host: ModelHost, smoke_model: tuple[Path, str]) -> None:
    _, version = smoke_model
    serving = host.serving(version, warmup=True, warmup_budget_s=1.0)
    explaining = host.explaining(version)
    assert serving.version == explaining.version == version
    assert serving.class_names == explaining.class_names
    assert isinstance(serving.model, Forward) and serving.autograd_model is None
    assert explaining.autograd_model is not None and explaining.loaded.model is explaining.model
    assert serving.runtime.chosen == explaining.runtime.chosen == "torchscript"
    assert serving.runtime.precision == "fp32" and "not measured" in serving.runtime.reason
    assert serving.load_seconds > 0 and explaining.load_seconds > 0

    images = serving.loaded.background()[:8]  # uint8, as uploads reach /predict
    probabilities = serving.model(images)
    with torch.no_grad():
        logits = explaining.model(images.float() / 255.0)  # float in [0, 1], as the value function feeds it
        eager = explaining.autograd_model(images.float() / 255.0)
    assert torch.allclose(torch.softmax(logits.float(), 1), probabilities, atol=1e-4)
    assert torch.allclose(eager, logits, atol=1e-3)


def test_an_unknown_version_is_a_user_error(host: ModelHost) -> None:
    from shapcore.errors import UserError

    with pytest.raises(UserError):
        host.serving("20000101-000000-000000", warmup=False)
    with pytest.raises(UserError):
        host.explaining("20000101-000000-000000")
