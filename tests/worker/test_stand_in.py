"""The explanation methods on a tiny stand-in model (tests/worker/conftest.py) whose Shapley
values are known: fast, in-process, beside the smoke-model and real-worker tests."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.shapley_games import exact_values
from worker.methods import MethodContext, run_method


def test_kernel_on_the_stand_in_gives_the_exact_values(stand_in_game):
    """Four players, every coalition evaluated: KernelSHAP's values are the exact (enumerated)
    Shapley values of every class, they add up to f(x) − base, the quadrant no class looks at
    gets nothing, and the standard errors are zero (nothing was sampled)."""
    ctx = MethodContext(f=stand_in_game, autograd_model=None, samples=100, seed=0, target=0)
    a = run_method("kernel", ctx)
    exact = exact_values(stand_in_game, 4)
    np.testing.assert_allclose(a.phi, exact, atol=1e-9)
    np.testing.assert_allclose(a.base + a.phi.sum(axis=0), a.fx, atol=1e-9)
    assert a.phi[0, 0] > a.phi[3, 0] > 0  # weights 6 and 2 on class 0's logit
    assert a.phi[1, 1] < 0  # weight -3 on class 1's
    assert a.phi[2] == pytest.approx(np.zeros(3), abs=1e-12)
    assert a.stderr is not None and (a.stderr == 0).all()
    assert a.convergence["converged"] is True


def test_kernel_on_the_stand_in_samples_when_asked_for_fewer_coalitions(stand_in_game):
    """Fewer samples than coalitions: still additive, close to the exact values, and each error
    within a few of its reported standard errors."""
    ctx = MethodContext(f=stand_in_game, autograd_model=None, samples=10, seed=1, target=0)
    a = run_method("kernel", ctx)
    exact = exact_values(stand_in_game, 4)
    np.testing.assert_allclose(a.base + a.phi.sum(axis=0), a.fx, atol=1e-9)
    assert np.abs(a.phi - exact).max() < 0.1
