"""The amortised explainer (FastSHAP, issue 17): its fit recovers known Shapley values, its file
round-trips, a file made for another version is refused, and its pieces agree with the
service's KernelSHAP value function.

The known game: a model whose class probabilities are an affine function of the image's
channel means (``p = a + W·mean(x)``, with ``Σ_c a_c = 1`` and ``Σ_c W_c = 0``, so softmax of
``log p`` is ``p`` itself). With the ``mean`` fill a coalition's value is then additive over
the grid's cells, and each cell's exact Shapley value is its own share of ``W·(x − fill)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from shapcore.background import summarize_background
from shapcore.errors import UserError
from shapcore.fastshap import (
    EXPLAINER_FILE,
    ExplainerNet,
    ResNetExplainer,
    efficient_normalize,
    load_explainer,
    save_explainer,
)
from shapcore.players import GRID_CELLS, grid_labels, grid_weights
from shapcore.value import CoalitionModel, masked_probabilities
from training import fastshap
from training.data import load_images
from training.shapley_labels import label_images

CLASSES = 10
M = GRID_CELLS * GRID_CELLS


class AffineProbabilities(nn.Module):
    """Float images (N, 3, H, W) in [0, 1] -> log of probabilities affine in the channel means."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(CLASSES, 3, generator=g)
        w = w - w.mean(dim=0, keepdim=True)  # every column sums to zero: probabilities sum to one
        self.register_buffer("w", 0.15 * w / w.abs().sum(dim=1).max())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (1.0 / CLASSES + (images.float().mean(dim=(2, 3)) - 0.5) @ self.w.T).log()

    def exact(self, images: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """(N, 64, C) exact Shapley values with the ``fill`` image (3, 32, 32) hiding cells."""
        A = torch.from_numpy(grid_weights())  # (64, 1024)
        diff = (images - fill).reshape(len(images), 3, -1)  # (N, 3, 1024)
        per_cell = torch.einsum("mp,ncp->nmc", A, diff) / diff.shape[-1]  # (N, 64, 3)
        return per_cell @ self.w.T


@pytest.fixture(scope="module")
def real_images(small_archive: Path) -> torch.Tensor:
    return load_images(str(small_archive), split="train", progress=False).images


def _median_rho(estimate: torch.Tensor, exact: torch.Tensor, target: torch.Tensor) -> float:
    rhos = [spearmanr(estimate[i, :, t], exact[i, :, t])[0] for i, t in enumerate(target.tolist())]
    return float(np.median(rhos))


CUDA = pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("objective", ["labels", "fastshap"])
def test_the_fitted_explainer_recovers_known_shapley_values(
    real_images: torch.Tensor, objective: str, device: str
) -> None:
    """Both objectives: FastSHAP's coalitions (the default) and Leverage SHAP labels; on the CPU,
    and on a GPU where there is one (``fit-explainer --device``): the fitted network comes back on
    the CPU, where it is stored and served."""
    model = AffineProbabilities().to(device)
    fill = summarize_background(real_images[:100], 1)
    game = fastshap.Game(model, fill, device=device)
    train, held_out = real_images[:240], real_images[240:]
    # a fixed amount of work, not of time (the cap is below pytest's timeout): the figure must not depend
    # on the machine's load. Exact labels need fewer steps than FastSHAP's coalitions.
    steps = 120 if objective == "labels" else 200
    cfg = fastshap.FitConfig(minutes=8, max_steps=steps, network="small", objective=objective, batch_images=32,
                             pairs=4, lr=3e-3, label_samples=130, train_share=0.6, width=16, val_images=30,
                             evaluations=6)  # fmt: skip
    net, null, figures = fastshap.fit(game, train, held_out, CLASSES, cfg, progress=False)
    assert next(net.parameters()).device.type == "cpu" and null.device.type == "cpu"
    assert figures["device"] == str(torch.device(device))

    x = held_out.float() / 255.0
    grand = game.grand(x).cpu()
    exact = model.exact(x, fill.images[0])
    # the known game is what the value function computes: efficiency holds exactly
    torch.testing.assert_close(exact.sum(dim=1), grand - null, atol=1e-5, rtol=0)
    with torch.no_grad():
        fitted = efficient_normalize(net(x, grand), grand, null)
        untrained = efficient_normalize(ExplainerNet(CLASSES, width=16).eval()(x, grand), grand, null)
    target = grand.argmax(dim=1)
    rho, rho_untrained = _median_rho(fitted, exact, target), _median_rho(untrained, exact, target)
    assert rho >= 0.95, (rho, figures["curve"][-3:])
    assert rho_untrained < 0.6  # the figure can fail: an explainer that learned nothing scores low
    assert figures["validation_gain"] > 0.5  # of the even split's error, removed
    assert figures["steps"] > 10
    if objective == "fastshap":
        assert figures["coalitions_seen"] == figures["images_seen"] * 8
    else:
        assert figures["labelled_images"] >= 32 and figures["validation_rho"] > 0.9


def test_masked_probabilities_is_the_kernel_explainers_value_function(real_images: torch.Tensor) -> None:
    """The batched value function used to fit equals KernelSHAP's per-image one, fill for fill."""
    model = AffineProbabilities(seed=1)
    x = real_images[:3].float() / 255.0
    gen = torch.Generator().manual_seed(0)
    s = fastshap.sample_coalitions(3, 5, M, gen)
    A = grid_weights()
    for fill in (summarize_background(real_images[:100], 1), summarize_background(real_images[:100], 4)):
        batched = masked_probabilities(model, x, s @ torch.from_numpy(A), fill, batch_size=7)
        for i in range(3):
            one = CoalitionModel(model, real_images[i], A, fill)(s[i].numpy())
            np.testing.assert_allclose(batched[i].numpy(), one, atol=1e-5)


def test_coalitions_follow_the_shapley_kernel_and_come_in_pairs() -> None:
    s = fastshap.sample_coalitions(4000, 2, M, torch.Generator().manual_seed(0))
    assert s.shape == (4000, 4, M)
    torch.testing.assert_close(s[:, 0] + s[:, 1], torch.ones(4000, M))  # each draw, then its complement
    sizes = s[:, 0::2].sum(dim=-1).long().flatten()
    assert int(sizes.min()) >= 1 and int(sizes.max()) <= M - 1
    observed = np.bincount(sizes.numpy(), minlength=M)[1:M] / len(sizes)
    expected = fastshap.shapley_sizes(M)
    assert abs(observed[0] - expected[0]) < 0.02 and abs(observed[31] - expected[31]) < 0.01
    assert observed[:3].sum() > 5 * observed[30:33].sum()  # the kernel favours the extremes


def test_grid_labels_at_any_resolution_agree_with_the_model_grid() -> None:
    assert grid_labels(32, 32).max() == M - 1
    big = grid_labels(96, 128)
    assert big[0, 0] == 0 and big[-1, -1] == M - 1 and big[95, 0] == M - GRID_CELLS
    assert np.all(np.bincount(big.ravel()) == (96 // 8) * (128 // 8))
    assert grid_weights().sum(axis=0).min() == 1.0 and grid_weights().sum(axis=1).max() == 16


def test_the_stored_explainer_round_trips_and_refuses_another_versions(tmp_path: Path) -> None:
    net = ExplainerNet(CLASSES, width=8).eval()
    null = torch.full((CLASSES,), 0.1)
    names = [f"c{i}" for i in range(CLASSES)]
    meta = {"model_version": "v1", "class_names": names, "layout": "grid", "players": M}
    path = save_explainer(tmp_path, net, null, meta)
    assert path.name == EXPLAINER_FILE and not list(tmp_path.glob(".explainer.*"))

    loaded = load_explainer(path, version="v1", class_names=names)
    x, grand = torch.rand(2, 3, 32, 32), torch.softmax(torch.randn(2, CLASSES), dim=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.explain(x, grand), efficient_normalize(net(x, grand), grand, null))
    torch.testing.assert_close(loaded.explain(x, grand).sum(dim=1), grand - null)

    with pytest.raises(UserError, match="fitted for model version 'v1', not 'v2'"):
        load_explainer(path, version="v2", class_names=names)
    with pytest.raises(UserError, match="classes"):
        load_explainer(path, version="v1", class_names=names[:9])
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(UserError, match="explainer"):
        load_explainer(tmp_path / "junk.safetensors", version="v1", class_names=names)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError):
        load_explainer(truncated, version="v1", class_names=names)


def test_labels_are_the_exact_values_of_an_additive_game(real_images: torch.Tensor) -> None:
    """Leverage SHAP labels recover an additive game's values exactly, cell for cell and class for class."""
    model = AffineProbabilities(seed=2)
    fill = summarize_background(real_images[:100], 1)
    game = fastshap.Game(model, fill)
    images = real_images[:3]
    grand, labels = label_images(game, images, game.null(), 130, seed=0)
    torch.testing.assert_close(labels, model.exact(images.float() / 255.0, fill.images[0]), atol=2e-5, rtol=0)
    torch.testing.assert_close(grand, game.grand(images.float() / 255.0))


def test_the_resnet_explainer_starts_from_the_classifiers_own_layers(tmp_path: Path) -> None:
    """Its trunk is the classifier's ResNet-50 (the same features), and its file round-trips
    (batch norms folded at load: the same values)."""
    from shapcore.model import build_model

    classifier = build_model(CLASSES).eval()
    net = ResNetExplainer.from_classifier(classifier, CLASSES, width=8).eval()
    net.head[-1].weight.data.normal_()  # values that differ by cell
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        normalized = (x - net.mean) / net.std
        classifier.fc = nn.Identity()  # its penultimate features
        theirs = classifier(normalized)
        ours = net.layer4(net.layer3(net.layer2(net.layer1(net.stem(normalized))))).mean(dim=(2, 3))
    torch.testing.assert_close(ours, theirs)
    with pytest.raises(UserError, match="not a torchvision ResNet-50"):
        ResNetExplainer.from_classifier(AffineProbabilities(), CLASSES)

    names = [f"c{i}" for i in range(CLASSES)]
    null = torch.full((CLASSES,), 0.1)
    path = save_explainer(tmp_path, net, null, {"model_version": "v1", "class_names": names, "layout": "grid"})
    loaded = load_explainer(path, version="v1", class_names=names)
    assert isinstance(loaded.net, ResNetExplainer) and loaded.meta["network"]["kind"] == "resnet50"
    grand = torch.softmax(torch.randn(2, CLASSES), dim=1)
    with torch.no_grad():
        expected = efficient_normalize(net(x, grand), grand, null)
    torch.testing.assert_close(loaded.explain(x, grand), expected, atol=1e-5, rtol=1e-4)
