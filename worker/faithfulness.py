"""Deletion and insertion curves of one explanation (placeholder until the faithfulness work lands)."""

from __future__ import annotations

from typing import Any

import numpy as np

from worker.value import CoalitionModel


def faithfulness(f: CoalitionModel, values: np.ndarray, target: int, *, seed: int = 0) -> dict[str, Any]:
    raise NotImplementedError
