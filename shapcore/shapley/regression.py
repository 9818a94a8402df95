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


def solve(design: Design, y: np.ndarray, delta: np.ndarray) -> Solution:
    """Values and standard errors from the rows of ``design``, their values minus ``v(∅)``
    ``y`` (2K, C), and ``Δ = v(N) − v(∅)`` (C,)."""
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
    return Solution(values, _sandwich(design, WA, residual, inv), identified)


def _sandwich(design: Design, WA: np.ndarray, residual: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """(M, C) standard errors ``sqrt(diag(H⁻¹ V H⁻¹))`` from the pairs' scores."""
    pairs = len(design.group)
    m, c = WA.shape[1], residual.shape[1]
    scores = (WA[:, :, None] * residual[:, None, :]).reshape(pairs, 2, m, c).sum(axis=1)  # (K, M, C)
    projected = np.einsum("jm,kmc->kjc", inv, scores)  # H⁻¹ t_u
    group, fpc = _collapse(design.group, design.fpc)
    out = np.zeros((m, c))
    for g in np.unique(group):
        members = projected[group == g]
        k = len(members)
        if k < 2 or fpc[g] >= 1.0:
            continue
        centred = members - members.mean(axis=0, keepdims=True)
        out += (1.0 - fpc[g]) * k / (k - 1) * (centred**2).sum(axis=0)
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
