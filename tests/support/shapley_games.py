"""Value functions whose Shapley values are known exactly (for the uncertainty tests and
``bench/stderr_calibration.py``; no tests here).

``pairwise_game(m, seed)``: ``v(z) = Σ a_j z_j + Σ_{j<k} b_jk z_j z_k`` for a second class and
its negative-scaled copy; its Shapley values are ``a_j + Σ_k b_jk / 2`` for any M (each pair's
surplus is split evenly). ``saturating_game(m, seed)``: a logistic of such a sum, whose values
no formula gives: :func:`exact_values` enumerates all 2^M coalitions (shap's ``Exact``
explainer), so keep M small (≤ 14).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Game:
    """``f``: (K, M) 0/1 coalitions -> (K, C) values; ``exact``: (M, C) Shapley values with the
    empty coalition as the reference."""

    f: Callable[[np.ndarray], np.ndarray]
    exact: np.ndarray

    @property
    def players(self) -> int:
        return int(self.exact.shape[0])


def _coefficients(m: int, seed: int, interaction: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=m)
    b = np.triu(rng.normal(size=(m, m)) * (interaction / np.sqrt(m)), 1)
    return a, b


def pairwise_game(m: int, seed: int = 0, interaction: float = 0.3) -> Game:
    """Three classes: ``v``, ``−v/2 + z_0`` and a constant (all-zero values)."""
    a, b = _coefficients(m, seed, interaction)

    def f(Z: np.ndarray) -> np.ndarray:
        Z = np.asarray(Z, dtype=np.float64)
        v = Z @ a + np.einsum("ij,jk,ik->i", Z, b, Z)
        return np.stack([v, -0.5 * v + Z[:, 0], np.full(len(Z), 0.25)], axis=1)

    phi = a + (b.sum(axis=1) + b.sum(axis=0)) / 2
    first = np.zeros(m)
    first[0] = 1.0
    return Game(f, np.stack([phi, -0.5 * phi + first, np.zeros(m)], axis=1))


def saturating_game(m: int, seed: int = 0, interaction: float = 0.6) -> Game:
    """Two classes: a probability ``σ(v − mean)`` and its complement (exact values by enumeration)."""
    a, b = _coefficients(m, seed, interaction)
    centre = a.sum() / 2

    def f(Z: np.ndarray) -> np.ndarray:
        Z = np.asarray(Z, dtype=np.float64)
        p = 1.0 / (1.0 + np.exp(-(Z @ a + np.einsum("ij,jk,ik->i", Z, b, Z) - centre)))
        return np.stack([p, 1.0 - p], axis=1)

    return Game(f, exact_values(f, m))


def exact_values(f: Callable[[np.ndarray], np.ndarray], m: int) -> np.ndarray:
    """(M, C) exact Shapley values of ``f`` at the all-ones coalition against the all-zeros one,
    every one of the 2^M coalitions evaluated (``shap.explainers.Exact``)."""
    import shap

    if m > 14:
        raise ValueError(f"enumerating 2^{m} coalitions is too many")
    masker = shap.maskers.Independent(np.zeros((1, m)), max_samples=1)
    out = shap.explainers.Exact(f, masker)(np.ones((1, m)), max_evals=2**m + 2)
    return np.asarray(out.values[0], dtype=np.float64).reshape(m, -1)
