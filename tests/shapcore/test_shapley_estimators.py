"""The Shapley estimators of :mod:`shapcore.shapley` against exact values.

What must hold (issue 26): at equal evaluations Leverage SHAP's error is below
``shap.KernelExplainer``'s, averaged over seeds, on games with exact values (M = 10 by
enumeration or in closed form, M = 50 in closed form); the same comparison goes red for a
planted fault (Leverage SHAP's draws without their inverse-probability weights);
``samples="auto"`` stops at once on an additive game and later on one with strong
interactions; efficiency holds whatever was sampled; the values are exact once the budget
covers all 2^M coalitions; the standard errors match the seed-to-seed spread they stand for.

Budgets: shap gets ``nsamples`` equal to our total evaluations, which count ``v(∅)`` and
``v(N)``; shap evaluates those two on top, so it gets two evaluations more than we do.
Errors are ``‖φ̂ − φ‖ / ‖φ‖`` over players and classes, averaged over fixed seeds.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from shapcore.shapley import METHODS, estimate_shapley, stderr_ratio
from tests.support.shapley_games import Game, saturating_game
from tests.support.shapley_games_exact import (
    additive_game,
    enumerated_values,
    relative_error,
    shap_kernel_values,
    unanimity_game,
    voting_game,
)

SEEDS = range(12)


def _mean_error(game: Game, budget: int, method: str) -> float:
    errors = []
    for seed in SEEDS:
        if method == "shap":
            values = shap_kernel_values(game, budget, seed)
        else:
            values = estimate_shapley(game.f, game.players, budget, method=method, seed=seed).values
        errors.append(relative_error(values, game.exact))
    return float(np.mean(errors))


#: (game, budget): M = 10 with exact values by enumeration (a logistic of a pairwise sum; a
#: sum of unanimity games of orders 1-5), M = 14 (weighted majority, enumerated), M = 50 (a
#: sum of unanimity games, closed form). Measured here (12 seeds), Leverage SHAP's error over
#: shap's: 0.77, 0.77, 0.86, 0.89; the planted fault's: 0.91, 2.41, 1.18, 3.82.
CASES = {
    "saturating-10": (lambda: saturating_game(10), 400),
    "unanimity-10": (lambda: unanimity_game(10), 600),
    "voting-14": (lambda: voting_game(14), 400),
    "unanimity-50": (lambda: unanimity_game(50), 1000),
}


@pytest.fixture(scope="module")
def shap_errors() -> dict[str, float]:
    return {name: _mean_error(make(), budget, "shap") for name, (make, budget) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_leverage_shap_beats_shap_kernel_explainer(case: str, shap_errors: dict[str, float]) -> None:
    make, budget = CASES[case]
    ours = _mean_error(make(), budget, "leverage")
    assert ours < shap_errors[case], f"{case}: Leverage SHAP {ours:.4f} vs shap {shap_errors[case]:.4f}"


@pytest.mark.parametrize("case", ["unanimity-10", "voting-14", "unanimity-50"])
def test_the_comparison_fails_for_planted_wrong_weights(case: str, shap_errors: dict[str, float]) -> None:
    """Leverage SHAP's uniform-size draws weighted by the kernel alone (no ``C(M,s)/k_s``):
    the same figure must say it is no better than shap and clearly worse than the real one.
    (On the smooth saturating game the fault costs little at M = 10, so it is not used here.)"""
    make, budget = CASES[case]
    game = make()
    wrong = _mean_error(game, budget, "leverage_uncorrected")
    right = _mean_error(game, budget, "leverage")
    assert wrong >= shap_errors[case], f"{case}: planted {wrong:.4f} vs shap {shap_errors[case]:.4f}"
    assert wrong >= 1.3 * right, f"{case}: planted {wrong:.4f} vs Leverage SHAP {right:.4f}"


#: The regression-adjusted estimator (``method="adjusted"``) against shap, on the cases where
#: a surrogate has something to learn; measured here (12 seeds), its error over shap's: 0.28
#: (saturating-10), 0.29 (unanimity-10), 0.79 (unanimity-50), against Leverage SHAP's 0.77,
#: 0.77, 0.89. Its planted fault (the draws without their inverse-probability weights) at
#: M = 50: 4.9 (at M = 10 most strata are sampled whole at these budgets, so the weights
#: barely matter there and the fault is not visible: those cases are not used for it).
ADJUSTED_BOUND = 0.85


@pytest.mark.parametrize("case", ["saturating-10", "unanimity-10", "unanimity-50"])
def test_regression_adjusted_beats_shap_kernel_explainer(case: str, shap_errors: dict[str, float]) -> None:
    make, budget = CASES[case]
    ours = _mean_error(make(), budget, "adjusted")
    assert ours < ADJUSTED_BOUND * shap_errors[case], f"{case}: adjusted {ours:.4f} vs shap {shap_errors[case]:.4f}"


def test_regression_adjusted_comparison_fails_for_planted_wrong_weights(shap_errors: dict[str, float]) -> None:
    make, budget = CASES["unanimity-50"]
    wrong = _mean_error(make(), budget, "adjusted_uncorrected")
    assert wrong >= ADJUSTED_BOUND * shap_errors["unanimity-50"], f"planted {wrong:.4f}"


def test_regression_adjusted_auto_stops_early_on_an_easy_game_and_later_on_a_hard_one() -> None:
    """An additive game is the surrogate's own kind: nothing left to correct, one round. A game
    with strong interactions of orders 3-5 needs more rounds, and still meets the tolerance."""
    easy = estimate_shapley(additive_game(50).f, 50, "auto", method="adjusted", tolerance=0.05, seed=0)
    hard = estimate_shapley(unanimity_game(50, interaction=3.0).f, 50, "auto", method="adjusted", tolerance=0.05,
                            cap=5000, seed=0)  # fmt: skip
    assert easy.stopped == "converged" and easy.rounds == 1, easy.history
    assert relative_error(easy.values, additive_game(50).exact) < 1e-6
    assert hard.stopped == "converged" and hard.rounds > easy.rounds, hard.history
    assert hard.evaluations >= 2 * easy.evaluations


def test_auto_stops_early_on_an_easy_game_and_later_on_a_hard_one() -> None:
    easy = estimate_shapley(additive_game(50).f, 50, "auto", tolerance=0.05, seed=0)
    hard_game = unanimity_game(50, interaction=3.0)
    hard = estimate_shapley(hard_game.f, 50, "auto", tolerance=0.05, seed=0)
    assert easy.stopped == "converged" and easy.rounds == 1, easy.history
    assert hard.stopped == "converged" and hard.rounds > easy.rounds, hard.history
    assert hard.evaluations >= 2 * easy.evaluations
    assert hard.ratio <= 0.05 < hard.history[0][1]
    assert relative_error(easy.values, additive_game(50).exact) < 1e-10


def test_auto_stops_at_the_cap_and_says_so() -> None:
    game = unanimity_game(50, interaction=3.0)
    out = estimate_shapley(game.f, 50, "auto", tolerance=0.001, cap=1500, seed=0)
    assert out.stopped == "cap" and out.evaluations <= 1500
    assert out.evaluations == out.history[-1][0] and out.rounds == len(out.history)
    assert out.ratio > 0.001


def test_auto_evaluates_no_coalition_twice_and_counts_what_it_evaluated() -> None:
    game = unanimity_game(20, seed=3)
    seen: list[np.ndarray] = []

    def counting(Z: np.ndarray) -> np.ndarray:
        seen.append(np.array(Z, dtype=bool))
        return game.f(Z)

    out = estimate_shapley(counting, 20, "auto", tolerance=0.0, cap=900, seed=0)
    rows = np.concatenate(seen)
    assert len(rows) == out.evaluations and out.rounds > 2
    assert len(np.unique(np.packbits(rows, axis=1), axis=0)) == len(rows)
    ends = game.f(np.stack([np.zeros(20), np.ones(20)]))
    given = estimate_shapley(counting, 20, 300, v_empty=ends[0], v_full=ends[1])
    assert given.evaluations == 300


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [12, 60, 400])
def test_efficiency_holds_whatever_was_sampled(method: str, budget: int) -> None:
    game = unanimity_game(30, seed=1)
    out = estimate_shapley(game.f, 30, budget, method=method, seed=2)
    assert np.allclose(out.values.sum(axis=0), out.fx - out.base, atol=1e-9)
    assert out.evaluations <= budget
    if budget < 30:  # fewer pairs than players: some values are not determined by the rows
        assert not out.identified and np.isinf(out.stderr).all()


@pytest.mark.parametrize("method", ["leverage", "kernel_strata", "leverage_uncorrected", "adjusted"])
@pytest.mark.parametrize("m", [2, 5, 8, 11])
def test_exact_when_the_budget_covers_every_coalition(method: str, m: int) -> None:
    game = voting_game(m, seed=m)
    out = estimate_shapley(game.f, m, 2**m, method=method, seed=0)
    assert out.exact and out.evaluations == 2**m and out.stopped == "converged"
    assert np.allclose(out.values, game.exact, atol=1e-10)
    assert not out.stderr.any()
    auto = estimate_shapley(game.f, m, "auto", cap=10**6, tolerance=0.0, method=method)
    assert auto.exact and auto.evaluations == 2**m and np.allclose(auto.values, game.exact, atol=1e-10)


def test_enumeration_matches_the_closed_form() -> None:
    """The games' exact values agree with each other's method (the test oracle itself)."""
    game = unanimity_game(9, seed=5)
    assert np.allclose(enumerated_values(game.f, 9), game.exact, atol=1e-12)


@pytest.mark.parametrize(
    ("method", "m", "budget"), [("leverage", 50, 1000), ("leverage", 14, 400), ("kernel", 50, 1000)]
)
def test_standard_errors_match_the_seed_to_seed_spread(method: str, m: int, budget: int) -> None:
    """The se that ``samples="auto"`` stops on: its RMS over seeds against the values' sd,
    per player, and ±2 se covering the exact value (measured: 0.93-1.03 and 0.93-0.96)."""
    game = unanimity_game(m, seed=7)
    runs = [estimate_shapley(game.f, m, budget, method=method, seed=s) for s in range(30)]
    values = np.array([r.values for r in runs])
    stderr = np.array([r.stderr for r in runs])
    ratio = np.sqrt((stderr**2).mean(axis=0)) / values.std(axis=0, ddof=1)
    coverage = (np.abs(values - game.exact) <= 2 * stderr).mean()
    assert 0.75 <= float(np.median(ratio)) <= 1.3, float(np.median(ratio))
    assert 0.85 <= coverage <= 0.99, coverage


def test_one_player_and_no_player() -> None:
    game = additive_game(1)
    out = estimate_shapley(game.f, 1, "auto")
    assert out.exact and np.allclose(out.values, game.exact) and out.evaluations == 2


def test_the_package_needs_numpy_only() -> None:
    code = "import sys, shapcore.shapley; print(sorted({'torch', 'scipy', 'shap'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_verdict_travels_in_the_workers_shape() -> None:
    """``classes`` and ``relative_to="max_abs"`` give the worker's rule today (0.2 of the
    target's largest |value|); the errors of every class are still reported at the end."""
    game = unanimity_game(40, seed=2)
    out = estimate_shapley(game.f, 40, "auto", classes=[0], relative_to="max_abs", tolerance=0.2, seed=0)
    verdict = out.convergence()
    assert verdict["converged"] and verdict["criterion"] == "max_stderr_max_abs_ratio"
    assert verdict["value"] <= 0.2 and verdict["evaluations"] == out.evaluations
    assert out.stderr[:, 0].max() <= 0.2 * np.abs(out.values[:, 0]).max()
    assert np.isfinite(out.stderr).all() and (out.stderr[:, 1] > 0).any()


def test_the_rank_rule_measures_the_errors_against_the_values_spread() -> None:
    """``relative_to="sd"``: the typical error (rms) against the typical spread (sd), where the
    range rule takes the largest error against the two extremes."""
    values = np.array([[1.0], [0.3], [0.2], [0.1], [0.0], [-0.1]])
    stderr = np.array([[0.3], [0.1], [0.1], [0.1], [0.1], [0.1]])
    assert stderr_ratio(values, stderr, relative_to="range") == pytest.approx(0.3 / 1.1)
    assert stderr_ratio(values, stderr, relative_to="sd") == pytest.approx(np.sqrt(0.14 / 6) / float(values.std()))
    game = unanimity_game(50, interaction=3.0)
    out = estimate_shapley(game.f, 50, "auto", method="adjusted", relative_to="sd", tolerance=0.2, seed=0,
                           classes=[0], cap=20000)  # fmt: skip
    verdict = out.convergence()
    assert verdict["converged"] and verdict["criterion"] == "rms_stderr_sd_ratio" and verdict["value"] <= 0.2
    se, phi = out.stderr[:, 0], out.values[:, 0]
    assert np.sqrt(np.mean(se**2)) <= 0.2 * phi.std()
