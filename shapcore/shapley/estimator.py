"""Shapley values of any value function over M players, sampled in rounds until converged.

The one entry point, :func:`estimate_shapley`: a value function ``value(Z) -> (n, C)`` over
boolean coalitions (``Z[i, j]`` true: player ``j`` is in), a sampling method, and a budget
in evaluations, or ``"auto"``: rounds of geometrically growing size, each adding pairs to
the ones already evaluated (the samplers nest, so nothing is evaluated twice), stopping when
the standard errors say the values have converged (:mod:`shapcore.shapley.convergence`) or
at the cap. The result says which, after how many evaluations and rounds.

Methods (:mod:`shapcore.shapley.sampling`):

- ``"leverage"``: Leverage SHAP (Musco & Witter, ICLR 2025): sizes by leverage score, paired,
  without replacement, inverse-probability weighted; exact once the budget covers all 2^M;
- ``"kernel"``: paired KernelSHAP with i.i.d. kernel-distributed draws (Covert & Lee 2021);
- ``"kernel_strata"``: the leverage design's sampler with pairs spread by the kernel's mass
  (the small sizes enumerated first, as ``shap.KernelExplainer`` does);
- ``"adjusted"``: regression-adjusted (Witter, Liu & Musco, NeurIPS 2025): Leverage SHAP's
  draws, a kernel ridge surrogate's exact Shapley values plus the leverage regression on its
  out-of-sample residuals (:mod:`shapcore.shapley.adjusted`);
- ``"leverage_uncorrected"``, ``"adjusted_uncorrected"``: planted faults, the draws without
  their inverse-probability weights; kept so that the tests can show their figures fail when
  they should.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from shapcore.shapley.adjusted import adjusted_solve
from shapcore.shapley.convergence import DEFAULT_TOLERANCE, Scale, converged, stderr_ratio
from shapcore.shapley.regression import Solution, solve
from shapcore.shapley.sampling import PairedKernelDraws, StratifiedPairs, total_pairs

ValueFunction = Callable[[np.ndarray], np.ndarray]
Method = Literal["leverage", "kernel", "kernel_strata", "leverage_uncorrected", "adjusted", "adjusted_uncorrected"]
METHODS: tuple[str, ...] = (
    "leverage", "kernel", "kernel_strata", "leverage_uncorrected", "adjusted", "adjusted_uncorrected",
)  # fmt: skip
Stopped = Literal["converged", "cap", "budget"]

#: The cap of ``samples="auto"`` (evaluations): the worker's fixed default today.
DEFAULT_CAP = 5000
#: How much each round of ``samples="auto"`` multiplies the evaluations so far by.
DEFAULT_GROWTH = 2.0


@dataclass(frozen=True)
class ShapleyEstimate:
    """``values`` (M, C) with ``Σ_j values[j] = fx − base`` exactly; ``stderr`` (M, C) (zero
    where exact, inf where the rows leave a value undetermined); ``base`` = ``v(∅)``, ``fx`` =
    ``v(N)`` (C,); ``evaluations``: value-function rows evaluated (the endpoints included when
    this call computed them); ``rounds``; ``stopped``: ``"converged"`` (the criterion was met, or
    every coalition was evaluated), ``"cap"`` (``samples="auto"`` ran out of budget) or
    ``"budget"`` (a fixed budget, no criterion asked); ``ratio``: the final ``max se / range``;
    ``history``: (evaluations, ratio) after each round; ``exact``: every coalition evaluated."""

    values: np.ndarray
    stderr: np.ndarray
    base: np.ndarray
    fx: np.ndarray
    evaluations: int
    rounds: int
    stopped: Stopped
    method: str
    ratio: float
    tolerance: float | None
    exact: bool
    identified: bool
    history: list[tuple[int, float]] = field(default_factory=list)
    relative_to: str = "range"

    def convergence(self) -> dict[str, Any]:
        """The verdict in the shape of the worker's ``Attribution.convergence`` dict."""
        return {
            "converged": self.stopped == "converged",
            "criterion": ("rms" if self.relative_to == "sd" else "max") + f"_stderr_{self.relative_to}_ratio",
            "value": self.ratio if np.isfinite(self.ratio) else None,
            "threshold": self.tolerance,
            "estimator": "sandwich",
            "method": self.method,
            "stopped": self.stopped,
            "evaluations": self.evaluations,
            "rounds": self.rounds,
            "exact": self.exact,
            "identified": self.identified,
            "history": [[e, r if np.isfinite(r) else None] for e, r in self.history],
        }


def _sampler(method: str, m: int, rng: np.random.Generator) -> StratifiedPairs | PairedKernelDraws:
    if method in ("leverage", "leverage_uncorrected", "adjusted", "adjusted_uncorrected"):
        return StratifiedPairs(m, rng, "leverage")
    if method == "kernel_strata":
        return StratifiedPairs(m, rng, "kernel")
    if method == "kernel":
        return PairedKernelDraws(m, rng)
    raise ValueError(f"unknown method {method!r}; one of {METHODS}")


def _solver(method: str):
    return adjusted_solve if method.startswith("adjusted") else solve


def _endpoints(
    value: ValueFunction, m: int, v_empty: np.ndarray | None, v_full: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """``v(∅)``, ``v(N)`` (C,) and how many evaluations computing the missing ones took."""
    missing = [z for z, known in ((0, v_empty), (1, v_full)) if known is None]
    got = {}
    if missing:
        rows = np.zeros((len(missing), m), dtype=bool)
        for i, z in enumerate(missing):
            rows[i] = bool(z)
        out = np.asarray(value(rows), dtype=np.float64).reshape(len(missing), -1)
        got = {z: out[i] for i, z in enumerate(missing)}
    base = np.atleast_1d(np.asarray(v_empty if v_empty is not None else got[0], dtype=np.float64))
    fx = np.atleast_1d(np.asarray(v_full if v_full is not None else got[1], dtype=np.float64))
    return base, fx, len(missing)


def _schedule(pairs_cap: int, first: int, growth: float) -> list[int]:
    """Cumulative pair counts of the rounds: ``first``, ×``growth`` each time, ending at the cap."""
    out, n = [], max(1, min(first, pairs_cap))
    while n < pairs_cap:
        out.append(n)
        n = max(n + 1, int(np.ceil(n * growth)))
    out.append(pairs_cap)
    return out


def estimate_shapley(
    value: ValueFunction,
    players: int,
    samples: int | Literal["auto"] = "auto",
    *,
    method: Method = "leverage",
    v_empty: np.ndarray | None = None,
    v_full: np.ndarray | None = None,
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
    cap: int = DEFAULT_CAP,
    first_round: int | None = None,
    growth: float = DEFAULT_GROWTH,
    classes: list[int] | None = None,
    relative_to: Scale = "range",
) -> ShapleyEstimate:
    """Shapley values of ``value`` at the full coalition against the empty one.

    ``samples``: total evaluations (an int: one round, ``stopped="budget"``) or ``"auto"``
    (rounds from ``first_round`` evaluations, default ``max(8M, 64)``, growing by ``growth``,
    until :func:`~shapcore.shapley.convergence.stderr_ratio` over ``classes`` (default all;
    ``relative_to`` the values' range, largest magnitude or standard deviation) is at most ``tolerance``, or ``cap``
    evaluations). ``v_empty``/``v_full``: the endpoints if the caller has them (then not
    counted); otherwise computed here (2 evaluations). Rows come in complementary pairs, at
    least one pair, so an odd or tiny budget is rounded down to whole pairs (or up to one).
    """
    m = int(players)
    rng = np.random.default_rng(seed)
    base, fx, spent = _endpoints(value, m, v_empty, v_full)
    delta = fx - base
    auto = samples == "auto"
    if m < 2:
        return _trivial(m, base, fx, spent, method, tolerance if auto else None)
    budget = int(cap if auto else samples)
    pairs_cap = min(total_pairs(m), max(1, (budget - spent) // 2))
    first = pairs_cap if not auto else max(1, (first_round or max(8 * m, 64)) // 2)
    sampler = _sampler(method, m, rng)
    rows, values = np.zeros((0, m), dtype=bool), np.zeros((0, delta.shape[0]))
    history: list[tuple[int, float]] = []
    for pairs in _schedule(pairs_cap, first, growth):
        new = sampler.extend(pairs)
        if len(new):
            rows = np.concatenate([rows, new])
            values = np.concatenate([values, np.asarray(value(new), dtype=np.float64).reshape(len(new), -1)])
        design = sampler.design(rows, correct=not method.endswith("_uncorrected"))
        # the adjusted solver's cost is its surrogate's fit, the same for every class: all classes' errors at once
        sol = _solver(method)(design, values - base[None, :], delta, None if method.startswith("adjusted") else classes)
        ratio = stderr_ratio(sol.values, sol.stderr, classes, relative_to)
        history.append((spent + len(rows), ratio))
        done = design.exhaustive or (auto and sol.identified and converged(ratio, tolerance))
        if done:
            break
    if classes is not None and np.isnan(sol.stderr).any():  # the rounds computed some classes' errors
        sol = _solver(method)(design, values - base[None, :], delta)
    stopped: Stopped = "converged" if done else ("cap" if auto else "budget")
    out = _result(sol, base, fx, spent + len(rows), history, stopped, method, auto, tolerance, design.exhaustive)
    return replace(out, relative_to=relative_to)


def _result(
    sol: Solution,
    base: np.ndarray,
    fx: np.ndarray,
    evaluations: int,
    history: list[tuple[int, float]],
    stopped: Stopped,
    method: str,
    auto: bool,
    tolerance: float,
    exact: bool,
) -> ShapleyEstimate:
    return ShapleyEstimate(
        values=sol.values,
        stderr=sol.stderr,
        base=base,
        fx=fx,
        evaluations=int(evaluations),
        rounds=len(history),
        stopped=stopped,
        method=method,
        ratio=history[-1][1],
        tolerance=tolerance if auto else None,
        exact=exact,
        identified=sol.identified,
        history=history,
    )


def _trivial(
    m: int, base: np.ndarray, fx: np.ndarray, spent: int, method: str, tolerance: float | None
) -> ShapleyEstimate:
    """No players or one: the lone player's value is ``v(N) − v(∅)``, exactly."""
    values = (fx - base)[None, :].repeat(m, axis=0)
    return ShapleyEstimate(
        values=values,
        stderr=np.zeros_like(values),
        base=base,
        fx=fx,
        evaluations=spent,
        rounds=0,
        stopped="converged",
        method=method,
        ratio=0.0,
        tolerance=tolerance,
        exact=True,
        identified=True,
        history=[],
    )
