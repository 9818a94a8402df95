"""``kernel``: KernelSHAP over the players, ``shap.KernelExplainer`` on the shared value function."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from worker.methods.base import Attribution, MethodContext


@contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """KernelExplainer draws coalitions from NumPy's global generator: seed it, then restore it."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def coalition_budget(segments: int, samples: int) -> int:
    """Coalitions KernelExplainer will actually evaluate: it stops at all 2^M − 2 proper subsets."""
    return min(samples, 2**segments - 2) if segments <= 30 else samples


def kernel_shap(f: Callable[[np.ndarray], np.ndarray], m: int, samples: int, seed: int) -> dict[str, Any]:
    """``shap.KernelExplainer`` over M players with the all-hidden reference, ``l1_reg`` off.

    Returns ``phi`` (M, C), ``base`` (C,), ``fx`` (C,) and ``coalitions`` (evaluated).
    """
    import shap

    with seeded_numpy(seed):
        explainer = shap.KernelExplainer(f, np.zeros((1, m)))
        phi = explainer.shap_values(np.ones((1, m)), nsamples=samples, l1_reg=False, silent=True)
    phi = np.asarray(phi, dtype=np.float64)
    if phi.ndim == 3:  # (1, M, C)
        phi = phi[0]
    base = np.atleast_1d(np.asarray(explainer.expected_value, dtype=np.float64))
    fx = np.atleast_1d(np.asarray(explainer.fx, dtype=np.float64))
    coalitions = int(explainer.nsamplesAdded) if m > 1 else 0
    return {"phi": phi.reshape(m, -1), "base": base, "fx": fx, "coalitions": coalitions, "explainer": explainer}


def attribute(ctx: MethodContext) -> Attribution:
    """The ``kernel`` method: KernelSHAP over the image's superpixels, with its standard errors
    (:mod:`worker.uncertainty`: a bootstrap over the drawn coalitions) and whether it converged."""
    m = int(ctx.f.A.shape[0])
    out = kernel_shap(ctx.f, m, ctx.samples, ctx.seed)
    stderr, convergence = kernel_uncertainty(out, ctx.target, ctx.seed)
    return Attribution(
        phi=out["phi"],
        base=out["base"],
        fx=out["fx"],
        convergence=convergence,
        stderr=stderr,
        coalitions=out["coalitions"],
    )


def kernel_uncertainty(out: dict[str, Any], target: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """(M, C) standard errors of :func:`kernel_shap`'s values and the convergence verdict."""
    from worker.uncertainty import BOOTSTRAP_RESAMPLES, bootstrap_stderr, convergence, design_from

    phi = out["phi"]
    if phi.shape[0] < 2:  # one player: its value is f(x) − base exactly
        stderr = np.zeros_like(phi)
        return stderr, convergence(phi[:, target], stderr[:, target], None, 0)
    design = design_from(out["explainer"])
    stderr = bootstrap_stderr(design, BOOTSTRAP_RESAMPLES, seed)
    return stderr, convergence(phi[:, target], stderr[:, target], design, BOOTSTRAP_RESAMPLES)
