"""``leverage``: Leverage SHAP over the players, sampled in rounds until it has converged.

Musco & Witter (ICLR 2025): coalition sizes drawn by their leverage scores, paired with their
complements, without replacement, inverse-probability weighted, and the constrained regression
solved exactly (:mod:`shapcore.shapley`). ``samples`` is the cap: the rounds grow geometrically
and stop as soon as the largest standard error of the target class's values is at most
:data:`TOLERANCE` of their range (``convergence.stopped``: ``converged``), else at the cap
(``cap``). The result says why it stopped and after how many evaluations.
"""

from __future__ import annotations

from shapcore.shapley import estimate_shapley
from worker.methods.base import Attribution, MethodContext

#: Largest standard error allowed, as a share of the range of the target's values (the
#: estimator's own sandwich errors, calibrated 0.93-1.03 against the seed-to-seed spread on
#: games with exact values: tests/test_shapley_estimators.py).
TOLERANCE = 0.03


def attribute(ctx: MethodContext) -> Attribution:
    m = int(ctx.f.A.shape[0])
    fx = ctx.f.fx()
    out = estimate_shapley(ctx.f, m, "auto", method="leverage", v_full=fx, seed=ctx.seed, classes=[ctx.target],
                           tolerance=TOLERANCE, cap=max(ctx.samples, 2))  # fmt: skip
    return Attribution(phi=out.values, base=out.base, fx=out.fx, stderr=out.stderr, convergence=out.convergence(),
                       coalitions=out.evaluations)  # fmt: skip
