"""Coalitions as boolean rows: Shapley-kernel weights, random subsets of one size, and keys
that tell two drawn coalitions apart.

Everything the samplers need about subsets of ``{0, …, M−1}`` and nothing else, NumPy only.
Large binomials (``C(250, 125)`` ~ 1e74) stay in floating point through ``math.lgamma``: the
estimators only ever need them in ratios and logarithms.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def log_binom(n: int, k: np.ndarray | int) -> np.ndarray:
    """``log C(n, k)`` elementwise (float64), exact enough for weights at any M."""
    k = np.asarray(k, dtype=np.float64)
    lg = np.vectorize(math.lgamma, otypes=[np.float64])
    return lg(n + 1.0) - lg(k + 1.0) - lg(n - k + 1.0)


def size_mass(m: int, sizes: np.ndarray) -> np.ndarray:
    """The Shapley kernel's total weight on all coalitions of each size, ``(M−1) / (s (M−s))``.

    Lundberg & Lee (NeurIPS 2017): the kernel weight of one coalition of size ``s`` is
    ``(M−1) / (C(M, s) s (M−s))``; summed over the ``C(M, s)`` coalitions of that size it is this.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    return (m - 1.0) / (sizes * (m - sizes))


def random_subsets(m: int, size: int, count: int, rng: np.random.Generator, *, fixed_first: bool = False) -> np.ndarray:
    """(count, M) boolean rows, each a uniform subset of ``size`` players (drawn independently).

    ``fixed_first``: player 0 is always in and the other ``size − 1`` are uniform among the
    rest; this names each complementary pair of a self-paired size (``size = M/2``) once.
    """
    rows = np.zeros((count, m), dtype=bool)
    if count == 0 or size == 0:
        return rows
    lo = 1 if fixed_first else 0
    rest = size - lo
    if rest > 0:
        keys = rng.random((count, m - lo))
        picked = np.argpartition(keys, rest - 1, axis=1)[:, :rest] + lo
        rows[np.arange(count)[:, None], picked] = True
    if fixed_first:
        rows[:, 0] = True
    return rows


def all_subsets(m: int, size: int, *, fixed_first: bool = False) -> np.ndarray:
    """(C, M) boolean rows: every subset of ``size`` players (with player 0 in, if ``fixed_first``)."""
    lo = 1 if fixed_first else 0
    combos = list(itertools.combinations(range(lo, m), size - lo))
    rows = np.zeros((len(combos), m), dtype=bool)
    if combos and size - lo > 0:
        idx = np.asarray(combos, dtype=np.int64)
        rows[np.arange(len(combos))[:, None], idx] = True
    if fixed_first:
        rows[:, 0] = True
    return rows


def row_keys(rows: np.ndarray) -> list[bytes]:
    """A hashable key per row (its bits packed), to keep draws without replacement distinct."""
    packed = np.packbits(rows, axis=1)
    return [r.tobytes() for r in packed]
