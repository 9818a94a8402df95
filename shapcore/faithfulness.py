"""Deletion and insertion curves: does the explanation's order of the superpixels matter to the model?

The superpixels are ranked by their attribution to the target class, most positive first
(a stable sort: ties keep their index order). Then, with the same fill as the explainer
(the value function :class:`shapcore.value.CoalitionModel`):

- **deletion**: start from the image and hide the superpixels in that order; the curve is
  the target's probability against the fraction hidden. A faithful ranking removes what the
  model relies on first, so the probability falls fast: **lower AUC is better**.
- **insertion**: start with everything hidden and restore the superpixels in that order;
  the probability should climb fast: **higher AUC is better**.

Neither number means much alone (an easy image keeps a high probability whatever is hidden),
so each is given beside the same curve for random orders (the mean of ``random_orders``
seeded permutations): a useful explanation has ``deletion_auc < random_deletion_auc`` and
``insertion_auc > random_insertion_auc``. AUCs are trapezoids over the fraction in [0, 1],
so they are probabilities too (1 = the target at probability one throughout).

Cost: with M superpixels, every superpixel is its own step while M ≤ ``max_steps``; above
that ``ceil(M / max_steps)`` are hidden per step. Every row of every curve (two for the
ranking and two per random order, steps + 1 points each; the all-kept and all-hidden rows
they share evaluated once) goes to ``f`` in one batched call: 194 coalitions for the default
50 superpixels (25 steps of 2) and 3 random orders, against the thousands KernelSHAP
evaluates by default (5000), with the same fill.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from shapcore.value import CoalitionModel

#: Most points per curve beyond the starting one (superpixels are grouped above this).
MAX_STEPS = 32
#: Random orders averaged into the baseline.
RANDOM_ORDERS = 3


def step_counts(m: int, max_steps: int = MAX_STEPS) -> np.ndarray:
    """Superpixels hidden (deletion) or restored (insertion) after each step: 0, k, 2k, ..., M."""
    if m < 1:
        raise ValueError("faithfulness needs at least one superpixel")
    per_step = math.ceil(m / max(1, max_steps))
    return np.minimum(np.arange(0, m + per_step, per_step), m)


def curve_rows(order: np.ndarray, counts: np.ndarray, *, insertion: bool) -> np.ndarray:
    """(len(counts), M) coalitions: after ``counts[i]`` steps of ``order``, kept = 1, hidden = 0."""
    m = len(order)
    rank = np.empty(m, dtype=np.int64)
    rank[order] = np.arange(m)  # rank[j]: when superpixel j is hidden (or restored)
    touched = rank[None, :] < counts[:, None]
    return (touched if insertion else ~touched).astype(np.float32)


def auc(fraction: np.ndarray, values: np.ndarray) -> float:
    return float(np.trapezoid(values, fraction))


def faithfulness(
    f: CoalitionModel,
    values: np.ndarray,
    target: int,
    *,
    seed: int = 0,
    max_steps: int = MAX_STEPS,
    random_orders: int = RANDOM_ORDERS,
) -> dict[str, Any]:
    """Deletion and insertion AUCs of ``values`` (M,), the attribution of class ``target``,
    beside the mean of ``random_orders`` random orders drawn from ``seed``; with their curves."""
    if random_orders < 1:
        raise ValueError("the random baseline needs at least one order")
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    m = values.shape[0]
    counts = step_counts(m, max_steps)
    order = np.argsort(-values, kind="stable")
    rng = np.random.default_rng(seed)
    randoms = [rng.permutation(m) for _ in range(random_orders)]

    blocks = [curve_rows(order, counts, insertion=False), curve_rows(order, counts, insertion=True)]
    for r in randoms:
        blocks += [curve_rows(r, counts, insertion=False), curve_rows(r, counts, insertion=True)]
    rows = np.concatenate(blocks)
    unique, inverse = np.unique(rows, axis=0, return_inverse=True)
    probs = f(unique)[:, target][inverse.reshape(-1)].reshape(len(blocks), len(counts))

    fraction = counts / m
    deletion, insertion = probs[0], probs[1]
    random_deletion, random_insertion = probs[2::2].mean(axis=0), probs[3::2].mean(axis=0)
    curves = {
        "fraction": fraction,
        "deletion": deletion,
        "insertion": insertion,
        "random_deletion": random_deletion,
        "random_insertion": random_insertion,
    }
    return {
        "deletion_auc": auc(fraction, deletion),
        "insertion_auc": auc(fraction, insertion),
        "random_deletion_auc": auc(fraction, random_deletion),
        "random_insertion_auc": auc(fraction, random_insertion),
        "steps": len(counts) - 1,
        "random_orders": random_orders,
        "curves": {name: [float(v) for v in curve] for name, curve in curves.items()},
    }
