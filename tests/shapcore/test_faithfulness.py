"""Deletion and insertion curves on a synthetic model whose right order is known.

The model is a real (tiny) ``torch.nn.Module``: the target's logit is a weighted sum of the
mean intensity in each of 16 square regions (the hand-built superpixels), the other classes'
logits are zero. On a white image with a black fill, keeping region ``j`` adds exactly
``w[j]`` to the target's logit, so ``w`` itself is the right ranking: hiding the largest
``w`` first must drop the probability fastest. Everything goes through the real value
function (:class:`shapcore.value.CoalitionModel` with a :class:`shapcore.background.BackgroundSet`),
as the worker uses it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from shapcore.background import BackgroundSet
from shapcore.faithfulness import faithfulness
from shapcore.value import CoalitionModel
from worker.methods import MethodContext, run_method
from worker.segmentation import area_weights

TARGET = 1
CLASSES = 3
M = 16
#: Region strengths, symmetric around +0.2: the image's target logit is 16 · 0.2 = 3.2.
STRENGTHS = np.linspace(-1.0, 1.4, M)


class RegionLogits(torch.nn.Module):
    """Target logit = Σ_j w[j] · (mean intensity of region j); the other classes' logits are 0."""

    def __init__(self, w: np.ndarray, weights: np.ndarray) -> None:
        super().__init__()
        per_pixel = (w[:, None] * weights / weights.sum(axis=1, keepdims=True)).sum(axis=0)
        logits = torch.zeros(CLASSES, weights.shape[1])
        logits[TARGET] = torch.from_numpy(per_pixel).float()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1).flatten(1) @ self.logits.T


def blocks(side: int) -> np.ndarray:
    """32×32 labels: a ``side``×``side`` grid of square regions, numbered row by row."""
    size = 32 // side
    grid = np.arange(32) // size
    return (grid[:, None] * side + grid[None, :]).astype(np.int32)


def value_function(w: np.ndarray, labels: np.ndarray) -> CoalitionModel:
    weights = area_weights(labels, 32)
    black = BackgroundSet(images=torch.zeros(1, 3, 32, 32), weights=torch.ones(1))
    return CoalitionModel(RegionLogits(w, weights), torch.ones(3, 32, 32), weights, black)


def shuffled(seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).permutation(STRENGTHS)


def test_the_right_order_beats_random_and_the_reversed_order_loses() -> None:
    w = shuffled()
    f = value_function(w, blocks(4))
    right = faithfulness(f, w, TARGET, seed=0)
    reverse = faithfulness(f, -w, TARGET, seed=0)
    assert right["deletion_auc"] < right["random_deletion_auc"] - 0.1, right
    assert right["insertion_auc"] > right["random_insertion_auc"] + 0.05, right
    assert reverse["deletion_auc"] > reverse["random_deletion_auc"] + 0.1, reverse
    assert reverse["insertion_auc"] < reverse["random_insertion_auc"] - 0.1, reverse
    # The baseline does not depend on the attribution, only on the seed.
    assert reverse["random_deletion_auc"] == right["random_deletion_auc"]
    assert faithfulness(f, w, TARGET, seed=1)["random_deletion_auc"] != right["random_deletion_auc"]


def test_kernel_shap_on_the_synthetic_model_is_scored_as_the_truth() -> None:
    """The real ``kernel`` method's values rank the regions as ``w`` does, so its deletion AUC is
    below random and as low as the right order's (the issue's "must show")."""
    w = shuffled()
    f = value_function(w, blocks(4))
    phi = run_method("kernel", MethodContext(f=f, autograd_model=None, samples=600, seed=0, target=TARGET)).phi
    assert scipy.stats.spearmanr(phi[:, TARGET], w).statistic > 0.95
    kernel = faithfulness(f, phi[:, TARGET], TARGET, seed=0)
    right = faithfulness(f, w, TARGET, seed=0)
    assert kernel["deletion_auc"] < kernel["random_deletion_auc"] - 0.1, kernel
    assert kernel["insertion_auc"] > kernel["random_insertion_auc"] + 0.05, kernel
    assert kernel["deletion_auc"] == pytest.approx(right["deletion_auc"], abs=0.02)


def test_a_constant_attribution_scores_like_random() -> None:
    """Ties keep index order. Here the index order alternates strong and weak regions (strong,
    weak, weak, strong, ...), so it hides the evidence at the average rate, as a random order
    does in expectation: its AUCs sit by the random baseline (many orders here, to pin the
    expectation down), far from the right and the reversed orders."""
    high, low = np.sort(STRENGTHS)[::-1][: M // 2], np.sort(STRENGTHS)[: M // 2]
    w = np.array([v for k in range(M // 2) for v in ((high[k], low[k]) if k % 2 == 0 else (low[k], high[k]))])
    f = value_function(w, blocks(4))
    flat = faithfulness(f, np.zeros(M), TARGET, seed=0, random_orders=50)
    right = faithfulness(f, w, TARGET, seed=0, random_orders=1)
    reverse = faithfulness(f, -w, TARGET, seed=0, random_orders=1)
    span = reverse["deletion_auc"] - right["deletion_auc"]
    assert span > 0.5
    assert abs(flat["deletion_auc"] - flat["random_deletion_auc"]) < 0.1 * span, flat
    assert abs(flat["insertion_auc"] - flat["random_insertion_auc"]) < 0.1 * span, flat
    # Ties keep index order (a stable sort): superpixel 0 is hidden first.
    first_hidden = np.ones((1, M))
    first_hidden[0, 0] = 0
    assert flat["curves"]["deletion"][1] == pytest.approx(f(first_hidden)[0, TARGET], abs=1e-5)  # batch shapes differ


@pytest.mark.parametrize(("side", "strips", "steps"), [(4, None, 16), (8, None, 32), (None, 50, 25)])
def test_steps_curves_and_their_ends(side: int | None, strips: int | None, steps: int) -> None:
    """Up to 32 superpixels one step each; above, ceil(M / 32) per step. The deletion curve
    starts at f(x) and ends all hidden, where insertion starts; points follow the ranking."""
    labels = blocks(side) if side else (np.arange(32 * 32) * strips // (32 * 32)).reshape(32, 32).astype(np.int32)
    m = int(labels.max()) + 1
    w = np.random.default_rng(m).normal(0.0, 3.0 / math.sqrt(m), m) + 0.2
    f = value_function(w, labels)
    out = faithfulness(f, w, TARGET, seed=2)
    evaluations = f.evaluations
    curves = out["curves"]

    assert out["steps"] == steps and out["random_orders"] == 3
    assert {len(c) for c in curves.values()} == {steps + 1}
    per_step = math.ceil(m / steps)
    assert curves["fraction"] == pytest.approx(np.minimum(np.arange(steps + 1) * per_step, m) / m)
    hidden = f(np.zeros((1, m)))[0, TARGET]
    fx = f.fx()[TARGET]
    for name in ("deletion", "random_deletion"):
        assert curves[name][0] == pytest.approx(fx) and curves[name][-1] == pytest.approx(hidden)
    for name in ("insertion", "random_insertion"):
        assert curves[name][0] == pytest.approx(hidden) and curves[name][-1] == pytest.approx(fx)
    # The first step hides (deletion) or restores (insertion) the most positive superpixels.
    first = np.argsort(-w, kind="stable")[:per_step]
    kept = np.ones((1, m))
    kept[0, first] = 0
    assert curves["deletion"][1] == pytest.approx(f(kept)[0, TARGET])
    assert curves["insertion"][1] == pytest.approx(f(1 - kept)[0, TARGET])
    for name in ("deletion", "insertion", "random_deletion", "random_insertion"):
        area = scipy.integrate.trapezoid(curves[name], curves["fraction"])
        assert out[f"{name}_auc"] == pytest.approx(area)
    # Two curves for the ranking and two per random order, steps + 1 rows each, one image per
    # row (a single fill); the all-kept and all-hidden rows they share are evaluated once.
    curves_evaluated = 2 * (1 + out["random_orders"])
    assert evaluations <= curves_evaluated * (steps + 1) - 2 * (curves_evaluated - 1)


def test_a_finished_result_is_observed_by_the_worker_metrics(cifar_jpeg: bytes) -> None:
    """What the worker's parent does with a finished job's result (explained here in process,
    by the synthetic model): both AUCs land in the method's histograms; a failure adds none."""
    from PIL import Image
    from prometheus_client import CollectorRegistry

    from shapcore.explain.request import ExplainRequest
    from shapcore.images import explanation_input
    from worker.explain import ModelRuntime, explain_image
    from worker.metrics import WorkerMetrics

    pixels, model_input = explanation_input(cifar_jpeg, 16_777_216, 512)
    model = RegionLogits(shuffled(), area_weights(blocks(4), 32))
    black = BackgroundSet(images=torch.zeros(1, 3, 32, 32), weights=torch.ones(1))
    params = ExplainRequest(method="kernel", segments=12, samples=100, background="mean", seed=0, target=TARGET)
    runtime = ModelRuntime(model, ["a", "b", "c"], black)  # a black fill, whatever the name says
    result, _, _ = explain_image(runtime, params, Image.fromarray(pixels), torch.from_numpy(model_input))
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry=registry)
    metrics.job_ended("failed", 1.0, None)
    metrics.job_ended("finished", 2.0, result)
    for curve in ("deletion", "insertion"):
        labels = {"method": "kernel"}
        assert registry.get_sample_value(f"shapserve_worker_{curve}_auc_count", labels) == 1
        auc = result["faithfulness"][f"{curve}_auc"]
        assert registry.get_sample_value(f"shapserve_worker_{curve}_auc_sum", labels) == pytest.approx(auc)
