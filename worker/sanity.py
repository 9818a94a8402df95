"""Model-randomisation sanity checks (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

Cascading randomisation: on a deep copy of the trained network, the blocks are
re-initialised from the top, cumulatively (``fc``, then ``layer4``, ``layer3``, ``layer2``,
``layer1``, then the stem ``conv1``/``bn1``), and after each step the method explains the same
image for the same target class (the trained model's). An explanation that depends on what the
model learnt must drift away from the trained model's: the Spearman rank correlation of the
per-superpixel values (of their absolute values, as in the paper, and signed) falls towards
zero. One that only looks at the image (edges, brightness) stays at one.

What is ranked is each superpixel's value *per unit area* (its value over its area in model
pixels). The per-superpixel value of a pixel method is a sum over the superpixel's area, and a
smooth map (Grad-CAM's 4×4 grid upsampled) summed over areas ranks the superpixels largely by
size, whatever the model: measured on the real model, |ρ| of Grad-CAM's sums with the areas
is 0.8, and its sums stay at |ρ| ≈ 0.6 with the trained ones after the whole network is
randomised, while the densities fall to ≈ 0.3. Area is exactly the kind of model-independent
signal the check must not credit, so the headline ρ uses densities; the ρ of the raw sums is
kept alongside (``spearman_abs_sum``).

Re-initialisation is each layer's own PyTorch default (``reset_parameters``: Kaiming-uniform
convolutions and linear layers, batch norms to the identity). The worker's network has its
batch norms folded into the convolutions (:func:`worker.runtime.prepare_model`), so a
randomised block has no normalisation; the default initialisation's smaller gain keeps the
activations finite through 50 layers (He's fan-out gain, torchvision's ResNet init, makes
them grow with every residual block and saturates the softmax).

Every step runs on the eager copy (no TorchScript): the sampling methods use it through the
shared value function, the gradient methods through autograd.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from shapcore.background import BackgroundSet
from shapcore.value import CoalitionModel
from worker.methods import Attribution, MethodContext, run_method

#: The cascade, from the output to the input: (step name, the network's attributes it re-initialises).
CASCADE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fc", ("fc",)),
    ("layer4", ("layer4",)),
    ("layer3", ("layer3",)),
    ("layer2", ("layer2",)),
    ("layer1", ("layer1",)),
    ("stem", ("conv1", "bn1")),
)

Method = str | Callable[[MethodContext], Attribution]


@dataclass(frozen=True)
class SanityStep:
    """After re-initialising every block down to ``block``: Spearman ρ with the trained values."""

    block: str
    spearman_abs: float  # of |value| / area, as in the paper (absolute values)
    spearman_signed: float  # of value / area
    spearman_abs_sum: float  # of |value| (the per-superpixel sums the result reports)
    values: np.ndarray  # (M,) the target class's per-superpixel values at this step


@dataclass
class SanityResult:
    method: str
    target: int
    trained: np.ndarray  # (M,) the trained model's per-superpixel values for the target
    steps: list[SanityStep] = field(default_factory=list)

    def table(self) -> dict[str, dict[str, float]]:
        return {
            s.block: {"abs": s.spearman_abs, "signed": s.spearman_signed, "abs_sum": s.spearman_abs_sum}
            for s in self.steps
        }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ (scipy); 0 when either side is constant (nothing ranked, nothing shared)."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def reinitialise(module: torch.nn.Module) -> None:
    """Every layer inside ``module`` back to its PyTorch default initialisation (in place)."""
    with torch.no_grad():
        for layer in module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
            if hasattr(layer, "reset_running_stats"):
                layer.reset_running_stats()


def randomised_models(model: torch.nn.Module, *, seed: int = 0):
    """Yield (step name, model) down the cascade; one deep copy, re-initialised cumulatively.

    The same model object is yielded every time (each step adds to the previous one's damage);
    the trained ``model`` is never touched. The initialisation is seeded (``torch.random.fork_rng``
    keeps the caller's generator as it was).
    """
    randomised = copy.deepcopy(model).eval()
    net = getattr(randomised, "net", randomised)
    for index, (step, attributes) in enumerate(CASCADE):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * len(CASCADE) + index)
            for attribute in attributes:
                reinitialise(getattr(net, attribute))
        yield step, randomised


def explain_with(
    method: Method,
    model: torch.nn.Module,
    model_input: torch.Tensor,
    weights: np.ndarray,
    background: BackgroundSet,
    *,
    samples: int,
    seed: int,
    target: int | None = None,
    batch_size: int = 256,
) -> tuple[Attribution, int]:
    """``method`` on one image with ``model`` (eager, used for both the value function and
    autograd); returns the attribution and the target (the top-1 class when None)."""
    f = CoalitionModel(model, model_input, weights, background, batch_size=batch_size)
    target = int(np.argmax(f.fx())) if target is None else int(target)
    ctx = MethodContext(f=f, autograd_model=model, samples=samples, seed=seed, target=target)
    attribution = run_method(method, ctx) if isinstance(method, str) else method(ctx)
    return attribution, target


def cascading_randomisation(
    method: Method,
    model: torch.nn.Module,
    model_input: torch.Tensor,
    weights: np.ndarray,
    background: BackgroundSet,
    *,
    samples: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
) -> SanityResult:
    """The cascade for one method and one image.

    ``model``: the trained eager network (``worker.runtime.prepare_model``'s second element);
    ``model_input``: uint8 (3, 32, 32); ``weights``: the segmentation's (M, 32·32) area weights;
    ``method``: a name :func:`worker.methods.run_method` knows, or a callable of the same shape.
    The target is the trained model's top-1 class, kept fixed down the cascade.
    """
    trained, target = explain_with(method, model, model_input, weights, background,
                                   samples=samples, seed=seed, batch_size=batch_size)
    reference = trained.phi[:, target]
    area = np.asarray(weights, dtype=np.float64).sum(axis=1)  # model pixels per superpixel
    name = method if isinstance(method, str) else getattr(method, "__name__", "custom")
    result = SanityResult(method=name, target=target, trained=reference)
    for step, randomised in randomised_models(model, seed=seed):
        attribution, _ = explain_with(method, randomised, model_input, weights, background,
                                      samples=samples, seed=seed, target=target, batch_size=batch_size)
        values = attribution.phi[:, target]
        result.steps.append(
            SanityStep(
                block=step,
                spearman_abs=spearman(np.abs(reference) / area, np.abs(values) / area),
                spearman_signed=spearman(reference / area, values / area),
                spearman_abs_sum=spearman(np.abs(reference), np.abs(values)),
                values=values,
            )
        )
    return result
