"""``adjusted``: regression-adjusted Shapley values over the players, sampled until converged.

Witter, Liu & Musco (NeurIPS 2025): Leverage SHAP's draws (Musco & Witter, ICLR 2025), a
surrogate's exact Shapley values plus the leverage regression on its out-of-sample residuals
(:mod:`shapcore.shapley.adjusted`). With ``samples="auto"`` (the request's default) the rounds
grow geometrically from 8 × players evaluations and stop as soon as the largest standard
error of the target class's values is at most :data:`TOLERANCE` of their range
(``convergence.stopped``: ``converged``), else at the cap (``cap``); an integer ``samples`` is
a fixed budget (``budget``). The result says why it stopped and after how many evaluations.
"""

from __future__ import annotations

from shapcore.shapley import estimate_shapley
from worker.methods.base import Attribution, MethodContext

#: Largest standard error allowed, as a share of the range of the target's values: chosen on
#: real images against 20,000-sample references (BENCHMARKS.md, "The queued default").
TOLERANCE = 0.05


def attribute(ctx: MethodContext) -> Attribution:
    m = int(ctx.f.A.shape[0])
    fx = ctx.f.fx()
    # as KernelSHAP counts them: ``samples`` coalitions, the two endpoints on top (f(x) is known)
    budget = ctx.samples + 1
    out = estimate_shapley(ctx.f, m, "auto" if ctx.auto else budget, method="adjusted", v_full=fx, seed=ctx.seed,
                           classes=[ctx.target], tolerance=TOLERANCE, cap=budget)  # fmt: skip
    return Attribution(phi=out.values, base=out.base, fx=out.fx, stderr=out.stderr, convergence=out.convergence(),
                       coalitions=out.evaluations - 1)  # fmt: skip
