"""The agreement figures every explainer score reports (shapcore.agreement)."""

from __future__ import annotations

import numpy as np
import pytest

from shapcore.agreement import agreement, relative_l2, spearman


def test_the_same_order_agrees_fully_and_the_error_measures_the_distance() -> None:
    ref = np.array([0.3, -0.1, 0.0, 0.7, 0.2])
    assert spearman(2.0 * ref + 1.0, ref) == pytest.approx(1.0)
    assert spearman(-ref, ref) == pytest.approx(-1.0)
    assert relative_l2(ref, ref) == 0.0
    assert relative_l2(np.zeros_like(ref), ref) == pytest.approx(1.0)


def test_both_figures_move_as_the_values_get_noisier() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=50)
    figures = [agreement(ref + rng.normal(scale=s, size=50), ref) for s in (0.05, 0.3, 1.0)]
    rhos, l2s = zip(*figures, strict=True)
    assert rhos[0] > rhos[1] > rhos[2]
    assert l2s[0] < l2s[1] < l2s[2]


def test_a_constant_explanation_orders_nothing() -> None:
    assert spearman(np.ones(8), np.arange(8.0)) == 0.0
    assert spearman(np.arange(8.0), np.zeros(8)) == 0.0


def test_values_and_reference_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        spearman(np.arange(4.0), np.arange(5.0))
