"""When a sampled estimate is good enough to stop: its standard errors against its own spread.

Covert & Lee (AISTATS 2021, "Improving KernelSHAP", Section 4.2) stop sampling once the
largest standard error is a small fraction of the values' range, ``max_j se_j / (max_j φ_j −
min_j φ_j) ≤ t``: a fraction of the range is what tells the values' order apart, which is what
a ranking or a heatmap shows. The ratio is scale-free, so one threshold serves every class
and every image; a class whose values are all equal (a constant output) has nothing to order
and is left out, as long as its errors are zero too.

``relative_to="max_abs"`` divides by the largest ``|φ_j|`` instead: the worker's rule today
(``worker.uncertainty.MAX_STDERR_RATIO``, 0.2 of the target class's largest value), for a
like-for-like switch.

``relative_to="sd"`` is a rule about the order itself: the root mean square of the errors over
the values' standard deviation, ``rms_j se_j / sd_j φ_j``. With independent errors of that
relative size ``τ``, the estimate's order agrees with the true one at about ``1 / √(1 + τ²)``
(Pearson's correlation of values plus noise, which Spearman's follows closely): τ = 0.2 is
about 0.98, 0.3 about 0.96. The range rule instead asks the *largest* error to be small against
the *two extreme* values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Scale = Literal["range", "max_abs", "sd"]

#: The default threshold on ``max se / range``: the largest error a twentieth of the range.
DEFAULT_TOLERANCE = 0.05


def stderr_ratio(
    values: np.ndarray, stderr: np.ndarray, classes: Sequence[int] | None = None, relative_to: Scale = "range"
) -> float:
    """``max over classes of max_j se_j / range_j φ`` (or ``/ max_j |φ_j|``, or ``rms_j se_j /
    sd_j φ_j``) for the (M, C) values and errors (inf when an error is infinite or a class with
    errors has no spread; 0 when nothing is uncertain)."""
    cols = range(values.shape[1]) if classes is None else classes
    worst = 0.0
    for c in cols:
        if not len(values):
            spread = 0.0
        elif relative_to == "range":
            spread = float(values[:, c].max() - values[:, c].min())
        elif relative_to == "sd":
            spread = float(values[:, c].std())
        else:
            spread = float(np.abs(values[:, c]).max())
        if not len(stderr):
            top = 0.0
        elif relative_to == "sd":
            top = float(np.sqrt(np.mean(stderr[:, c] ** 2)))
        else:
            top = float(stderr[:, c].max())
        if top == 0.0:
            continue
        if not np.isfinite(top) or spread <= 0.0:
            return float("inf")
        worst = max(worst, top / spread)
    return worst


def converged(ratio: float, tolerance: float) -> bool:
    """Whether a ratio from :func:`stderr_ratio` meets the threshold."""
    return bool(np.isfinite(ratio) and ratio <= tolerance)
