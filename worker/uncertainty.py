"""Standard errors of KernelSHAP's values, from the coalitions ``shap.KernelExplainer`` drew.

Why not the local-accuracy residual: KernelExplainer solves its weighted regression with
the last player eliminated (``φ_M = f(x) − base − Σ others``), so the values always sum to
``f(x) − base`` and any sampling error lands in ``φ_M``. The residual is zero by
construction; it is kept as a check, not as a quality figure.

Where the error comes from. After ``shap_values`` the explainer keeps every row it
evaluated: ``maskMatrix`` (n, M) coalitions, ``kernelWeights`` (n,), ``ey`` (n, C) values.
The first rows enumerate every coalition of the smallest and largest sizes (fixed, no
randomness); the rest are *draws*: a size from the remaining kernel weight, a uniform
subset of that size and (for the paired sizes) its complement. A draw seen again only
raises its weight, and the random rows' weights are scaled to the kernel weight left over.
So the random part of the normal equations is a mean over independent draws, and the values
are a smooth function of that mean: their sampling error is estimated from the spread of
the draws' contributions.

Two estimators share that model; ``bench/stderr_calibration.py`` measured them (and two
independent half-sample runs) against the seed-to-seed spread, on games with exact values
and on the real model:

- :func:`bootstrap_stderr` (what the worker reports): the draws resampled with replacement
  (the enumerated rows kept), the same constrained regression re-solved on each resample.
  Calibrated: se / seed sd 1.01-1.14 and ±2 se coverage 0.94-0.99 on the games, 1.04 and
  0.97 on held-out images of the real model at the defaults; ~2 % of an explanation's time;
- :func:`sandwich_stderr`: the regression's sandwich covariance over draws, ``H⁻¹ S H⁻¹``
  with ``H = XᵀWX`` and ``S`` the covariance of the draws' scores ``w·x·e`` (the residuals
  are the value function's departure from additivity, not noise, so the textbook
  ``σ²(XᵀWX)⁻¹`` does not apply). It is the bootstrap's linearisation, and the regression
  is far from linear in its weights (``H`` varies with the draws as much as ``XᵀWy``): it
  comes out ~2× too wide at M = 50. Kept for the benchmark.

With fewer draws than players the rows leave directions of ``φ`` undetermined; there the
error is as large as the values themselves (:func:`undetermined_variance`), and the
bootstrap adds it. Between ~M and ~3M draws the bootstrap is conservative (too wide).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import binom

#: Resamples of the bootstrap: its sd is then known to ±7 % (1/√(2·100)).
BOOTSTRAP_RESAMPLES = 100

#: The convergence rule's bound: the largest standard error of the target class at most a
#: fifth of its largest |value| (the leading value known to ±40 % at ±2 se). Measured on 10
#: held-out images, real 80.9 % model, 50 segments (``bench/stderr_calibration.py``): the
#: figure is 0.044-0.144 at the default 5000 samples (all converged), 0.065-0.21 at 2000,
#: 0.11-0.36 at 1000, 0.19-0.49 at 500; at 200 segments with 20 asked (~240 superpixels,
#: the 2M floor run) 0.20-0.35, and there the bootstrap is not reliable anyway.
MAX_STDERR_RATIO = 0.2


@dataclass(frozen=True)
class KernelDesign:
    """The rows KernelExplainer evaluated, split into the enumerated and the drawn ones.

    ``X`` (n, M) 0/1 coalitions; ``w`` (n,) kernel weights; ``y`` (n, C) values minus the base;
    ``delta`` (C,) ``f(x) − base``; ``fixed``: how many leading rows were enumerated;
    ``unit`` (n − fixed,) the draw each random row belongs to (a coalition and its
    complement share one); ``counts`` (units,) how often each draw came up.
    """

    X: np.ndarray
    w: np.ndarray
    y: np.ndarray
    delta: np.ndarray
    fixed: int
    unit: np.ndarray
    counts: np.ndarray
    weight_left: float

    @property
    def draws(self) -> int:
        return int(self.counts.sum())

    @property
    def players(self) -> int:
        return int(self.X.shape[1])


def enumerated_sizes(m: int, nsamples: int) -> int:
    """How many subset sizes KernelExplainer enumerated in full (its own bookkeeping, copied
    from ``KernelExplainer.explain``: it is a local there, not kept on the explainer)."""
    num_subset_sizes = int(np.ceil((m - 1) / 2.0))
    num_paired = int(np.floor((m - 1) / 2.0))
    weights = np.array([(m - 1.0) / (i * (m - i)) for i in range(1, num_subset_sizes + 1)])
    weights[:num_paired] *= 2
    weights /= weights.sum()
    remaining = copy.copy(weights)
    left = nsamples
    full = 0
    for size in range(1, num_subset_sizes + 1):
        nsubsets = binom(m, size) * (2 if size <= num_paired else 1)
        if left * remaining[size - 1] / nsubsets < 1.0 - 1e-8:
            break
        full += 1
        left -= nsubsets
        if remaining[size - 1] < 1.0:
            remaining /= 1 - remaining[size - 1]
    return full


def _weight_left(m: int, full: int) -> float:
    num_subset_sizes = int(np.ceil((m - 1) / 2.0))
    num_paired = int(np.floor((m - 1) / 2.0))
    weights = np.array([(m - 1.0) / (i * (m - i)) for i in range(1, num_subset_sizes + 1)])
    weights[:num_paired] *= 2
    weights /= weights.sum()
    return float(weights[full:].sum())


def design_from(explainer: Any) -> KernelDesign:
    """The :class:`KernelDesign` of a ``shap.KernelExplainer`` after one ``shap_values`` call."""
    n = int(explainer.nsamplesAdded)
    m = int(explainer.M)
    X = np.asarray(explainer.maskMatrix[:n], dtype=np.float64)
    w = np.asarray(explainer.kernelWeights[:n], dtype=np.float64)
    fnull = np.atleast_1d(np.asarray(explainer.fnull, dtype=np.float64))
    y = np.asarray(explainer.ey[:n], dtype=np.float64) - fnull
    delta = np.atleast_1d(np.asarray(explainer.fx, dtype=np.float64)) - fnull
    full = enumerated_sizes(m, int(explainer.nsamples))
    sizes = X.sum(axis=1)
    enumerated = (np.minimum(sizes, m - sizes) <= full) if full else np.zeros(n, dtype=bool)
    fixed = int(np.argmin(enumerated)) if not enumerated.all() else n
    unit = _draw_units(X[fixed:], m)
    counts = _draw_counts(w[fixed:], unit)
    return KernelDesign(X, w, y, delta, fixed, unit, counts, _weight_left(m, full))


def _draw_units(rows: np.ndarray, m: int) -> np.ndarray:
    """Row -> draw: a row followed by its complement (a paired size) is one draw."""
    unit = np.empty(len(rows), dtype=np.int64)
    paired_max = int(np.floor((m - 1) / 2.0))
    i = u = 0
    while i < len(rows):
        unit[i] = u
        if i + 1 < len(rows) and rows[i].sum() <= paired_max and np.all(rows[i] + rows[i + 1] == 1):
            unit[i + 1] = u
            i += 1
        i += 1
        u += 1
    return unit


def _draw_counts(w: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """How often each draw came up: the random rows' weights are count × (weight left / draws),
    so their ratios to the smallest are the counts (a draw seen once exists unless every
    draw repeated, which only a tiny M with many samples makes likely)."""
    if len(w) == 0:
        return np.zeros(0)
    first = np.unique(unit, return_index=True)[1]
    ratio = w[first] / w[first].min()
    for scale in range(1, 9):
        counts = ratio * scale
        if np.allclose(counts, np.round(counts), atol=1e-6):
            return np.round(counts)
    return ratio


def _eliminated(d: KernelDesign) -> tuple[np.ndarray, np.ndarray]:
    """shap's reduced problem: ``φ_M = δ − Σ others`` substituted, so
    ``y − x_M·δ ≈ (x_{1..M−1} − x_M)·β``."""
    Xr = d.X[:, :-1] - d.X[:, -1:]
    yr = d.y - d.X[:, -1:] * d.delta[None, :]
    return Xr, yr


def _expand(beta: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """(M−1, C) reduced solution -> (M, C) values, the last one by efficiency."""
    return np.vstack([beta, delta[None, :] - beta.sum(axis=0, keepdims=True)])


def solve_values(d: KernelDesign, w: np.ndarray | None = None) -> np.ndarray:
    """(M, C) values of the constrained weighted regression with weights ``w`` (default: the
    explainer's). With the explainer's own weights this is ``KernelExplainer.solve`` (the same
    elimination, the same normal equations; shap's least-squares fallback for a singular
    system is the minimum-norm solution here too)."""
    w = d.w if w is None else w
    Xr, yr = _eliminated(d)
    WX = w[:, None] * Xr
    try:
        beta = np.linalg.solve(Xr.T @ WX, WX.T @ yr)
    except np.linalg.LinAlgError:
        sw = np.sqrt(w)[:, None]
        beta = np.linalg.lstsq(sw * Xr, sw * yr, rcond=None)[0]
    return _expand(beta, d.delta)


def identified(d: KernelDesign) -> bool:
    """Whether the rows pin down every value: the reduced design has full column rank."""
    Xr, _ = _eliminated(d)
    return d.players <= 1 or int(np.linalg.matrix_rank(Xr[d.w > 0])) == d.players - 1


def sandwich_stderr(d: KernelDesign, phi: np.ndarray) -> np.ndarray:
    """(M, C) standard errors from the sandwich covariance over draws (infinite where the
    regression is not identified; zero when every coalition was enumerated)."""
    m, c = phi.shape
    if d.draws == 0:
        return np.zeros((m, c))
    if not identified(d):
        return np.full((m, c), np.inf)
    Xr, yr = _eliminated(d)
    e = yr - Xr @ phi[:-1]  # (n, C) residuals at the solution
    H_inv = np.linalg.inv(Xr.T @ (d.w[:, None] * Xr))
    T = np.vstack([np.eye(m - 1), -np.ones((1, m - 1))])  # β -> φ
    L = H_inv @ T.T  # (M−1, M)
    rx, re = Xr[d.fixed :], e[d.fixed :]
    units = len(d.counts)
    # per draw: Σ over its rows of x·e (weight per occurrence = weight_left / draws)
    g = np.zeros((units, m - 1, c))
    np.add.at(g, d.unit, rx[:, :, None] * re[:, None, :])
    gbar = (d.counts[:, None, None] * g).sum(axis=0) / d.draws
    centred = (g - gbar) * np.sqrt(d.counts)[:, None, None]
    scale = d.weight_left / d.draws
    out = np.empty((m, c))
    for k in range(c):
        q = centred[:, :, k] @ L  # (units, M)
        out[:, k] = scale * np.sqrt((q * q).sum(axis=0))
    return out


def bootstrap_stderr(d: KernelDesign, reps: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(M, C) standard deviations of the values over ``reps`` resamples of the draws (the
    enumerated rows kept), plus the spread of the directions the rows leave undetermined.

    A resample keeps ~63 % of the distinct draws, so with few draws per player it can lose
    rank where the explanation did not. ``np.linalg.solve`` then returns values blown up by
    rounding (se up to 10⁴× the values at 240 players, 480 samples); the minimum-norm
    solution alone puts zero there and is far too narrow (se 0.07× the seed-to-seed spread
    on real images there). So each resample is solved in minimum norm and its lost
    directions carry the prior spread of :func:`undetermined_variance`, as the explanation's
    own null space does. One resample: two matrix products and an (M−1)² eigensolve.
    """
    m, c = d.players, d.delta.shape[0]
    if d.draws == 0 or m < 2:
        return np.zeros((m, c))
    Xr, yr = _eliminated(d)
    tau2 = _prior_scale(d, Xr)
    rng = np.random.default_rng(seed)
    p = d.counts / d.draws
    sims = np.empty((reps, m, c))
    lost = np.zeros(m)
    w = d.w.copy()
    for r in range(reps):
        w[d.fixed :] = rng.multinomial(d.draws, p)[d.unit] * (d.weight_left / d.draws)
        WX = w[:, None] * Xr
        lam, vec = np.linalg.eigh(Xr.T @ WX)
        keep = lam > lam.max() * 1e-10
        sims[r] = _expand(vec[:, keep] @ ((vec[:, keep].T @ (WX.T @ yr)) / lam[keep, None]), d.delta)
        lost += _null_share(vec[:, ~keep])
    return np.sqrt(sims.var(axis=0, ddof=1) + (lost / reps)[:, None] * tau2[None, :])


def _null_share(null: np.ndarray) -> np.ndarray:
    """(M,) how much of each value lies in the span of ``null`` ((M−1, k) orthonormal
    directions of the reduced problem): ``diag(T P Tᵀ)`` with ``T`` the map β -> φ."""
    rows = np.vstack([null, -null.sum(axis=0, keepdims=True)])  # T @ null
    return (rows**2).sum(axis=1)


def _prior_scale(d: KernelDesign, Xr: np.ndarray) -> np.ndarray:
    """(C,) ``τ²``: the values' mean square over the directions the rows determine,
    ``|β̂|² / rank`` (the minimum-norm ``β̂`` is zero elsewhere)."""
    rows = Xr[d.w > 0]
    eig = np.linalg.eigvalsh(rows.T @ rows)
    rank = max(1, int((eig > eig.max() * (d.players - 1) * 1e-10).sum()))
    return (solve_values(d)[:-1] ** 2).sum(axis=0) / rank


def undetermined_variance(d: KernelDesign, Xr: np.ndarray | None = None) -> np.ndarray:
    """(M, C) variance of the values along the directions the rows do not determine.

    With fewer draws than players the regression has a null space: KernelExplainer's
    minimum-norm solution puts zero there, whatever the true values are. A value's error
    along it is as large as the values themselves: we take each class's scale from the
    solution, ``τ² = |β̂|² / rank`` (the spread a zero-mean prior on the values would keep
    there), times how much of each value lies in the null space. Zero when identified.
    """
    m, c = d.players, d.delta.shape[0]
    if Xr is None:
        Xr, _ = _eliminated(d)
    rows = Xr[d.w > 0]
    eig, vec = np.linalg.eigh(rows.T @ rows)  # ascending; the Gram matrix is (M−1)², n need not be
    zero = eig <= eig.max() * (m - 1) * 1e-10
    rank = int((~zero).sum())
    if rank >= m - 1:
        return np.zeros((m, c))
    return _null_share(vec[:, zero])[:, None] * _prior_scale(d, Xr)[None, :]


def bootstrap_reliable(d: KernelDesign) -> bool:
    """Whether the bootstrap's resamples keep the explanation's rank: the enumerated rows alone
    determine every value, or there are at least twice as many draws as free values. Below
    that (measured on real images at 240 players, 480 samples: ~1 draw per player) its se is
    ~0.6× the seed-to-seed spread (±2 se covers ~75 %), so no verdict may rest on it."""
    m = d.players
    if d.draws == 0 or d.draws >= 2 * (m - 1):
        return True
    Xr, _ = _eliminated(d)
    fixed = Xr[: d.fixed]
    return d.fixed >= m - 1 and int(np.linalg.matrix_rank(fixed)) == m - 1


def convergence(phi: np.ndarray, stderr: np.ndarray, d: KernelDesign | None, reps: int) -> dict[str, Any]:
    """Whether the target class's values are settled: the largest standard error against the
    largest |value| (``max_stderr_ratio``) at most :data:`MAX_STDERR_RATIO`, from a bootstrap
    that can be trusted (:func:`bootstrap_reliable`). ``phi``, ``stderr``: (M,) of the target
    class; ``d`` None when nothing was sampled (M < 2)."""
    top = float(np.abs(phi).max()) if phi.size else 0.0
    worst = float(stderr.max()) if stderr.size else 0.0
    value = worst / top if top > 0 else (0.0 if worst == 0 else float("inf"))
    reliable = d is None or bootstrap_reliable(d)
    info: dict[str, Any] = {
        "converged": bool(reliable and value <= MAX_STDERR_RATIO),
        "criterion": "max_stderr_ratio",
        "value": value if np.isfinite(value) else None,
        "threshold": MAX_STDERR_RATIO,
        "estimator": "bootstrap",
        "bootstrap_resamples": reps,
        "bootstrap_reliable": reliable,
    }
    if d is not None:
        info.update(
            enumerated_rows=d.fixed,
            sampled_rows=int(d.X.shape[0]) - d.fixed,
            draws=d.draws,
            identified=bool(not undetermined_variance(d).any()),
        )
    return info
