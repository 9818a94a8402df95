"""More value functions with exact Shapley values, for the estimator tests and
``bench/estimator_table.py`` (beside :mod:`shapley_games`; no tests here).

Why these: paired sampling makes every regression estimator exact on games whose
interactions are of order two at most (the pairwise games of :mod:`shapley_games`), so a
comparison of estimators needs higher-order interactions:

- :func:`unanimity_game`: a sum of unanimity games ``c_T · [T ⊆ S]`` over random sets ``T``
  of orders 1-5 (the Harsanyi dividends). Each member of ``T`` gets ``c_T / |T|``: closed-form
  values for any M, and as much interaction as asked (``interaction`` scales the orders ≥ 2);
- :func:`additive_game`: ``v(S) = Σ_{j∈S} a_j``, the easy case (the regression fits it
  exactly from any identified sample);
- :func:`voting_game`: a weighted majority game, ``v(S) = [Σ_{j∈S} w_j ≥ q]`` and its
  complement, discontinuous; exact values by enumerating all 2^M coalitions (M ≤ 16).

``shap_kernel_values`` runs ``shap.KernelExplainer`` on such a game (the all-zeros
background, the all-ones point: its masked inputs are the coalitions themselves).
"""

from __future__ import annotations

from collections.abc import Callable
from math import factorial

import numpy as np

from tests.support.shapley_games import Game


def unanimity_game(m: int, seed: int = 0, terms: int | None = None, interaction: float = 1.0) -> Game:
    """Two classes ``v`` and ``−v/2``; ``terms`` random sets (default 2M) of orders 1-5."""
    rng = np.random.default_rng(seed)
    count = terms if terms is not None else 2 * m
    orders = rng.integers(1, min(5, m) + 1, size=count)
    sets = [rng.choice(m, size=int(k), replace=False) for k in orders]
    coef = rng.normal(size=count) * np.where(orders > 1, interaction, 1.0)
    member = np.zeros((count, m))
    for t, members in enumerate(sets):
        member[t, members] = 1.0
    sizes = member.sum(axis=1)

    def f(Z: np.ndarray) -> np.ndarray:
        Z = np.asarray(Z, dtype=np.float64)
        gathered = Z @ member.T  # (K, terms): how many of T are in S
        full = gathered >= sizes[None, :] - 1e-9  # T ⊆ S
        v = full.astype(np.float64) @ coef
        return np.stack([v, -0.5 * v], axis=1)

    phi = (member * (coef / sizes)[:, None]).sum(axis=0)
    return Game(f, np.stack([phi, -0.5 * phi], axis=1))


def additive_game(m: int, seed: int = 0) -> Game:
    """Two classes ``Σ a_j z_j`` and ``1 − that``: each player's value is its own term."""
    a = np.random.default_rng(seed).normal(size=m)

    def f(Z: np.ndarray) -> np.ndarray:
        v = np.asarray(Z, dtype=np.float64) @ a
        return np.stack([v, 1.0 - v], axis=1)

    return Game(f, np.stack([a, -a], axis=1))


def voting_game(m: int, seed: int = 0) -> Game:
    """Weighted majority: weights ~ U(0, 1), quota half the total; classes win and lose."""
    w = np.random.default_rng(seed).uniform(size=m)
    quota = w.sum() / 2

    def f(Z: np.ndarray) -> np.ndarray:
        win = (np.asarray(Z, dtype=np.float64) @ w >= quota).astype(np.float64)
        return np.stack([win, 1.0 - win], axis=1)

    return Game(f, enumerated_values(f, m))


def enumerated_values(f: Callable[[np.ndarray], np.ndarray], m: int) -> np.ndarray:
    """(M, C) exact Shapley values by the permutation formula over all 2^M coalitions."""
    if m > 16:
        raise ValueError(f"enumerating 2^{m} coalitions is too many")
    codes = np.arange(1 << m)
    Z = ((codes[:, None] >> np.arange(m)[None, :]) & 1).astype(bool)
    v = np.asarray(f(Z), dtype=np.float64).reshape(len(codes), -1)
    sizes = Z.sum(axis=1)
    weight = np.array([factorial(s) * factorial(m - s - 1) / factorial(m) for s in range(m)])
    phi = np.zeros((m, v.shape[1]))
    for j in range(m):
        without = codes[~Z[:, j]]
        phi[j] = (weight[sizes[without]][:, None] * (v[without | (1 << j)] - v[without])).sum(axis=0)
    return phi


def shap_kernel_values(game: Game, nsamples: int, seed: int) -> np.ndarray:
    """(M, C) values from ``shap.KernelExplainer`` with ``nsamples`` (``l1_reg`` off), its draws
    seeded through NumPy's global generator (restored afterwards)."""
    return shap_kernel(game.f, game.players, nsamples, seed)


def shap_kernel(f: Callable[[np.ndarray], np.ndarray], m: int, nsamples: int, seed: int) -> np.ndarray:
    """:func:`shap_kernel_values` for any value function ``f`` over ``m`` players."""
    import shap

    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        explainer = shap.KernelExplainer(f, np.zeros((1, m)))
        phi = explainer.shap_values(np.ones((1, m)), nsamples=nsamples, l1_reg=False, silent=True)
    finally:
        np.random.set_state(state)
    phi = np.asarray(phi, dtype=np.float64)
    return phi[0] if phi.ndim == 3 else phi.reshape(m, -1)


def relative_error(estimate: np.ndarray, exact: np.ndarray) -> float:
    """``‖φ̂ − φ‖ / ‖φ‖`` over every player and class."""
    return float(np.linalg.norm(estimate - exact) / np.linalg.norm(exact))
