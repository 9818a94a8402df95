"""Regression-adjusted Shapley estimates: a surrogate's exact values plus a sampled correction.

Witter, Liu & Musco (NeurIPS 2025, "Regression-adjusted Monte Carlo estimators for Shapley
values and probabilistic values"): fit a regressor ``g`` to the evaluated (coalition, value)
pairs, take ``g``'s Shapley values exactly, and estimate the Shapley values of what ``g``
missed, ``v − g``, from the same samples. Shapley values are linear in the game, so
``φ(v) = φ(g) + φ(v − g)``; the sampled part's error scales with the residual, which a good
``g`` makes small. The paper corrects with an unbiased Monte Carlo estimator and trees; here,
NumPy only, the surrogate is a kernel ridge regression whose Shapley values have a closed
form, fitted to what the regression's additive fit leaves over (the regression is exact on
additive games: an additive part in the surrogate changes nothing), and the correction is the
Leverage SHAP regression (:mod:`.regression`) on the residuals, whose sandwich standard
errors then say when to stop.

The surrogate. Kernel ridge regression ``g(z) = c + Σ_i α_i K(z_i, z)`` with the
"interactions up to order d" kernel over present and over absent players:

    K(z, z') = Σ_{k=1..d} β_k [C(|z ∧ z'|, k) + C(|¬z ∧ ¬z'|, k)]

(``C(s, k)`` counts the k-subsets both coalitions contain: the inner product of their
order-k unanimity features). ``K(z_i, ·)`` is a sum of unanimity games over the subsets
``A ⊆ S_i`` (each gives ``1/|A|`` to its members) and of "all of A absent" games over
``A ⊆ ¬S_i`` (each gives ``−1/|A|``), so its Shapley value for player j is, exactly,
``[j ∈ S_i] Σ_k β_k C(s_i, k)/s_i − [j ∉ S_i] Σ_k β_k C(M − s_i, k)/(M − s_i)``.

Out-of-sample residuals. A surrogate fit and judged on the same rows hides what it missed
(the correction would see nothing), so each row's residual is its leave-one-out residual,
``(y_i − ŷ_i)/(1 − H_ii)`` (closed form for ridge regression, from one eigendecomposition
of the kernel matrix), which also picks the ridge penalty (the smallest leave-one-out error
over a grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shapcore.shapley.regression import Solution, solve
from shapcore.shapley.sampling import Design

#: The surrogate's interaction orders and their weights β_k (order 1 = additive).
ORDERS: tuple[float, ...] = (1.0, 1.0, 1.0)
#: The most rows the surrogate is fitted on (its cost grows as their cube).
FIT_ROWS = 500
#: Ridge penalties tried (relative to the kernel matrix's mean diagonal); leave-one-out picks.
PENALTIES: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass(frozen=True)
class Surrogate:
    """The fitted surrogate's exact Shapley values (M, C) and each row's out-of-sample residual (n, C)."""

    values: np.ndarray
    residual: np.ndarray
    at_empty: np.ndarray
    at_full: np.ndarray


def _binom(s: np.ndarray, k: int) -> np.ndarray:
    """``C(s, k)`` elementwise for a float array ``s`` (0 where s < k)."""
    out = np.ones_like(s, dtype=np.float64)
    for t in range(k):
        out = out * np.maximum(s - t, 0.0) / (t + 1)
    return out


def _kernel_of_counts(present: np.ndarray, absent: np.ndarray, orders: tuple[float, ...], m: int) -> np.ndarray:
    out = np.zeros_like(present, dtype=np.float64)
    for k, beta in enumerate(orders, start=1):
        scale = beta / _binom(np.asarray(m / 2.0), k)  # order k's term ~β_k for two typical halves
        out += scale * (_binom(present, k) + _binom(absent, k))
    return out


def kernel(a: np.ndarray, b: np.ndarray, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
    """``K(a_i, b_j)`` (n_a, n_b) for boolean coalitions."""
    af, bf = a.astype(np.float64), b.astype(np.float64)
    present = af @ bf.T
    absent = (1.0 - af) @ (1.0 - bf).T
    return _kernel_of_counts(present, absent, orders, a.shape[1])


def kernel_shapley(rows: np.ndarray, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
    """(n, M): the exact Shapley values of each game ``z ↦ K(rows_i, z)``."""
    m = rows.shape[1]
    z = rows.astype(np.float64)
    s = z.sum(axis=1)
    inside = np.zeros_like(s)
    outside = np.zeros_like(s)
    for k, beta in enumerate(orders, start=1):
        scale = beta / _binom(np.asarray(m / 2.0), k)
        inside += scale * _binom(s, k) / np.maximum(s, 1.0)
        outside += scale * _binom(m - s, k) / np.maximum(m - s, 1.0)
    return z * inside[:, None] - (1.0 - z) * outside[:, None]


def fit_surrogate(
    rows: np.ndarray,
    y: np.ndarray,
    fit_rows: int | None = None,
    orders: tuple[float, ...] = ORDERS,
    penalties: tuple[float, ...] = PENALTIES,
) -> Surrogate:
    """Kernel ridge regression of ``y`` (n, C) on the first ``fit_rows`` of ``rows`` (n, M): its
    Shapley values, every row's out-of-sample residual (leave-one-out for the rows it was fitted
    on, plain for the others), ``g(∅)`` and ``g(N)``; the penalty per class by leave-one-out error.

    The fit costs the cube of its rows (one eigendecomposition), so it stops growing at
    ``fit_rows`` (default :data:`FIT_ROWS`); the rows after them still correct it."""
    m = rows.shape[1]
    fit = min(len(rows), fit_rows or FIT_ROWS)
    K = kernel(rows[:fit], rows[:fit], orders)
    mean = y[:fit].mean(axis=0)
    yc = y[:fit] - mean
    eig, vec = np.linalg.eigh(K)
    eig = np.maximum(eig, 0.0)
    proj = vec.T @ yc  # (fit, C)
    unit = float(np.mean(np.diag(K))) or 1.0
    best_err = np.full(y.shape[1], np.inf)
    alpha = np.zeros_like(yc)
    loo = np.zeros_like(yc)
    for lam in penalties:
        shrink = 1.0 / (eig + lam * unit)
        a = vec @ (shrink[:, None] * proj)  # (fit, C)
        hat = np.einsum("ij,j,ij->i", vec, eig * shrink, vec)  # diag of K (K + λI)⁻¹
        out = (yc - K @ a) / np.maximum(1.0 - hat, 1e-9)[:, None]
        err = (out**2).mean(axis=0)
        better = err < best_err
        best_err[better] = err[better]
        alpha[:, better] = a[:, better]
        loo[:, better] = out[:, better]
    ends = np.zeros((2, m), dtype=bool)
    ends[1] = True
    at_ends = kernel(ends, rows[:fit], orders) @ alpha + mean
    residual = np.concatenate([loo, y[fit:] - (kernel(rows[fit:], rows[:fit], orders) @ alpha + mean)])
    values = kernel_shapley(rows[:fit], orders).T @ alpha
    return Surrogate(values, residual, at_ends[0], at_ends[1])


def adjusted_solve(
    design: Design, y: np.ndarray, delta: np.ndarray, classes: list[int] | None = None
) -> Solution:
    """The regression-adjusted values: the surrogate's exact Shapley values plus the Leverage SHAP
    regression on the leave-one-out residuals (``y``: values minus ``v(∅)``; ``Δ = v(N) − v(∅)``).
    The standard errors are the residual regression's sandwich."""
    if design.exhaustive or len(design.rows) <= design.rows.shape[1]:
        return solve(design, y, delta, classes)
    # the surrogate models what the regression's additive fit leaves (the regression is exact on
    # additive games, so an additive part in g would change nothing but its noise)
    additive = solve(design, y, delta, classes=[])
    fitted = design.rows.astype(np.float64) @ additive.values
    surrogate = fit_surrogate(design.rows, y - fitted)
    # the residual game r = v − g, measured from its own origin: r(S) − r(∅) = y_S − g(S) + g(∅),
    # with g(S) out of sample (y_S − g_{−S}(S) = fitted_S + the leave-one-out residual),
    # and r(N) − r(∅) = Δ − (g(N) − g(∅))
    r = fitted + surrogate.residual + surrogate.at_empty[None, :]
    correction = solve(design, r, delta - (surrogate.at_full - surrogate.at_empty), classes)
    return Solution(surrogate.values + correction.values, correction.stderr, correction.identified)
