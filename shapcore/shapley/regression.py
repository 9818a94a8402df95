"""The Shapley values as a constrained weighted least-squares problem, and its standard errors.

Charnes et al. (1988) and Lundberg & Lee (2017): the Shapley values are the ``φ`` minimising
``Σ_S w(S) (v(S) − v(∅) − 1_Sᵀφ)²`` over all proper coalitions ``S`` with the Shapley kernel
``w``, subject to efficiency ``Σ φ = v(N) − v(∅)``. With sampled rows each weighted by its
inverse inclusion probability the sum is estimated without bias, and we solve it as Musco &
Witter (ICLR 2025, Section 3) do: project out the constraint with ``P = I − 11ᵀ/M``,
``A = Z P``, ``b = y − Z1·Δ/M`` (``Δ = v(N) − v(∅)``), ``φ = (AᵀWA)⁺ AᵀWb + Δ/M``. Here
``(AᵀWA)⁺`` is taken as ``(AᵀWA + τ11ᵀ/M)⁻¹``: both sides are orthogonal to ``1``, so the
solution is too, and efficiency holds to rounding whatever was sampled.

Standard errors: ``φ̂ − φ = H⁻¹ Σ_pairs t_u`` with ``t_u`` a pair's weighted scores
``Σ_r w_r a_r e_r`` (``e`` the residual at the solution), whose sum has mean zero. Its
variance is the survey-sampling one (stratified, without replacement: ``Σ_h (1 − f_h)
k_h/(k_h − 1) Σ_u (t_u − t̄_h)²``; one stratum with ``f = 0`` for i.i.d. draws, which is the
paired-sample variance of Covert & Lee, AISTATS 2021), and ``Cov φ̂ = H⁻¹ V H⁻¹``: the
sandwich. A stratum sampled in full contributes nothing: exact rows carry no sampling error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shapcore.shapley.sampling import Design


@dataclass(frozen=True)
class Solution:
    """``values`` (M, C); ``stderr`` (M, C) (inf where the rows leave a value undetermined);
    ``identified``: the rows determine every value (rank M − 1 after the constraint)."""

    values: np.ndarray
    stderr: np.ndarray
    identified: bool


def solve(design: Design, y: np.ndarray, delta: np.ndarray, classes: list[int] | None = None) -> Solution:
    """Values and standard errors from the rows of ``design``, their values minus ``v(∅)``
    ``y`` (2K, C), and ``Δ = v(N) − v(∅)`` (C,); the errors of ``classes`` only (NaN for the
    others) when given, which is what the rounds of ``samples="auto"`` need."""
    Z = design.rows.astype(np.float64)
    m = Z.shape[1]
    sizes = Z.sum(axis=1, keepdims=True)
    A = Z - sizes / m  # Z P
    b = y - sizes * delta[None, :] / m
    WA = design.weight[:, None] * A
    G = A.T @ WA
    scale = float(np.trace(G)) / max(m - 1, 1) or 1.0  # the 1-direction at G's own scale
    H = G + np.full((m, m), scale / m)
    rhs = WA.T @ b
    eig, vec = np.linalg.eigh(H)
    keep = eig > eig.max() * 1e-10
    identified = bool(keep.all())
    inv = (vec[:, keep] / eig[keep]) @ vec[:, keep].T  # H⁻¹ (or its pseudo-inverse)
    x = inv @ rhs
    values = x + delta[None, :] / m
    if design.exhaustive:
        return Solution(values, np.zeros_like(values), identified)
    if not identified:
        return Solution(values, np.full_like(values, np.inf), identified)
    residual = b - A @ x
    return Solution(values, _sandwich(design, WA, residual, inv, classes), identified)


def _sandwich(
    design: Design, WA: np.ndarray, residual: np.ndarray, inv: np.ndarray, classes: list[int] | None
) -> np.ndarray:
    """(M, C) standard errors ``sqrt(diag(H⁻¹ V H⁻¹))`` from the pairs' scores.

    ``H⁻¹ t_u = Σ_{r∈u} (H⁻¹ w_r a_r) e_r``: one (2K, M) product serves every class, and the
    strata's sums and sums of squares are products with their (groups, K) indicator."""
    pairs = len(design.group)
    m, c = WA.shape[1], residual.shape[1]
    lever = WA @ inv  # (2K, M): row r's H⁻¹ w_r a_r (H is symmetric)
    group, fpc = _collapse(design.group, design.fpc)
    members = np.bincount(group, minlength=len(fpc)).astype(np.float64)
    live = (members >= 2) & (fpc < 1.0)
    factor = np.where(live, (1.0 - fpc) * members / np.maximum(members - 1.0, 1.0), 0.0)
    onehot = np.zeros((len(fpc), pairs))
    onehot[group, np.arange(pairs)] = 1.0
    out = np.full((m, c), np.nan)
    for k in range(c) if classes is None else classes:
        q = (lever * residual[:, k : k + 1]).reshape(pairs, 2, m).sum(axis=1)  # (K, M)
        sums, squares = onehot @ q, onehot @ (q * q)
        centred = np.maximum(squares - sums**2 / np.maximum(members, 1.0)[:, None], 0.0)
        out[:, k] = factor @ centred
    return np.sqrt(out)


def _collapse(group: np.ndarray, fpc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge each sampled stratum with a single pair into its neighbour (the collapsed-strata
    estimator: a variance needs two units; merging is conservative, so its fpc is dropped)."""
    group = group.copy()
    fpc = fpc.astype(np.float64).copy()
    counts = np.bincount(group, minlength=len(fpc))
    lonely = [h for h in range(len(fpc)) if counts[h] == 1 and fpc[h] < 1.0]
    sampled = [h for h in range(len(fpc)) if counts[h] > 0 and fpc[h] < 1.0]
    for h in lonely:
        others = [g for g in sampled if g != h]
        if not others:
            break
        target = min(others, key=lambda g: abs(g - h))
        group[group == h] = target
        fpc[target] = 0.0
    return group, fpc
