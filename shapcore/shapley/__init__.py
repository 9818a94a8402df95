"""Shapley-value estimators over coalitions of players, NumPy only (no torch).

:func:`estimate_shapley` is the entry point: Leverage SHAP (Musco & Witter, ICLR 2025) by
default, paired KernelSHAP for comparison, a fixed budget or ``samples="auto"`` (rounds
until the standard errors say converged, Covert & Lee, AISTATS 2021). See
:mod:`shapcore.shapley.estimator`.
"""

from shapcore.shapley.convergence import DEFAULT_TOLERANCE, stderr_ratio
from shapcore.shapley.estimator import DEFAULT_CAP, METHODS, ShapleyEstimate, estimate_shapley

__all__ = ["DEFAULT_CAP", "DEFAULT_TOLERANCE", "METHODS", "ShapleyEstimate", "estimate_shapley", "stderr_ratio"]
