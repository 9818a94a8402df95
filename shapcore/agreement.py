"""How close one explanation's values are to a reference's: the figures every score of an
explainer reports (the fit's quality, the benches' tables, the references' ceiling).

- :func:`spearman`: Spearman's ρ, the agreement of the two orders (what a ranking or a heatmap
  shows). A constant explanation orders nothing: its ρ is 0, not SciPy's NaN, so that a median
  over images counts it as the failure it is instead of dropping it.
- :func:`relative_l2`: ``‖values − reference‖ / ‖reference‖``, the size of the error (0: equal).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr


def spearman(values: np.ndarray, reference: np.ndarray) -> float:
    """Spearman's ρ of two 1-D value vectors; 0 when either is constant."""
    a, b = np.asarray(values, dtype=np.float64).ravel(), np.asarray(reference, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"the values ({a.shape[0]}) and the reference ({b.shape[0]}) differ in length")
    if np.ptp(a) <= 0 or np.ptp(b) <= 0:
        return 0.0
    rho = float(spearmanr(a, b).statistic)
    return rho if np.isfinite(rho) else 0.0


def relative_l2(values: np.ndarray, reference: np.ndarray) -> float:
    """``‖values − reference‖ / ‖reference‖`` (a zero reference counts as norm 1e-12)."""
    a, b = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-12))


def agreement(values: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(:func:`spearman`, :func:`relative_l2`) of ``values`` against ``reference``."""
    return spearman(values, reference), relative_l2(values, reference)
