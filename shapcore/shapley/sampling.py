"""Which coalitions to evaluate, and the weight each evaluated row carries in the regression.

Two samplers, both of *complementary pairs* (a coalition and its complement are evaluated
together: Covert & Lee, AISTATS 2021, "Improving KernelSHAP", show pairing cuts the
variance; Musco & Witter prove it keeps Leverage SHAP's guarantee):

- :class:`StratifiedPairs`: Leverage SHAP's design (Musco & Witter, ICLR 2025, "Provably
  Accurate Shapley Value Estimation via Leverage Score Sampling"). The rows of the Shapley
  regression have leverage score ``1 / C(M, s)`` for a coalition of size ``s``, so every size
  carries the same total leverage: sample the same number of coalitions of every size (capped
  at how many exist), uniformly within a size, *without replacement*, and weight each row by
  the inverse of its inclusion probability (``C(M, s) / k_s``). The paper draws each
  coalition as an independent Bernoulli trial; like the authors' reference code we take the
  expected count per size, rounded, and draw that many distinct pairs (stratified simple
  random sampling), which nests: a later round only adds pairs, and once a size is sampled in
  full its rows are exact (weight 1, no sampling error). ``allocation="kernel"`` spreads the
  pairs over sizes in proportion to the Shapley kernel's mass instead (what
  ``shap.KernelExplainer`` approximates by enumerating the smallest sizes first).
- :class:`PairedKernelDraws`: the textbook KernelSHAP baseline, i.i.d. pairs with sizes drawn
  from the Shapley-kernel distribution (Lundberg & Lee 2017; Covert & Lee 2021), so every
  row has the same regression weight.

``correct=False`` (:meth:`StratifiedPairs.design`) drops the inverse-probability factor: a
planted fault for the tests (uniform sizes weighted as if they had been drawn from the
kernel), which must be measurably worse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from shapcore.shapley.subsets import all_subsets, log_binom, random_subsets, row_keys, size_mass

Allocation = Literal["leverage", "kernel"]

#: A stratum with at most this many pairs is enumerated outright when it is to be taken whole.
ENUMERATE_MAX = 1 << 18


@dataclass(frozen=True)
class Design:
    """The evaluated rows and their regression weights.

    ``rows`` (2K, M) boolean: rows ``2u`` and ``2u+1`` are pair ``u`` (a coalition and its
    complement). ``weight`` (2K,): Shapley-kernel weight × inverse inclusion probability.
    ``group`` (K,): the pair's variance stratum; ``fpc`` (groups,): the fraction of that
    stratum that was sampled (0 for draws with replacement), the finite-population correction
    of the variance. ``exhaustive``: every pair was evaluated (the values are exact).
    """

    rows: np.ndarray
    weight: np.ndarray
    group: np.ndarray
    fpc: np.ndarray
    exhaustive: bool


def total_pairs(m: int) -> int:
    """Complementary pairs of proper, non-empty coalitions: ``2^(M−1) − 1``."""
    return (1 << (m - 1)) - 1 if m >= 1 else 0


def water_fill(target: float, share: np.ndarray, cap: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """Integer counts ``k_h`` with ``floor ≤ k_h ≤ cap``, ``Σ k_h = target`` (or Σ cap), and
    otherwise in proportion to ``share``: ``k_h = clip(c·share_h, floor_h, cap_h)`` for the
    ``c`` that meets the target (bisection), rounded by largest remainder."""
    target = float(min(target, cap.sum()))
    if target <= floor.sum():
        return floor.astype(np.int64)
    lo, hi = 0.0, float(np.max(cap / share)) + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.clip(mid * share, floor, cap).sum() < target:
            lo = mid
        else:
            hi = mid
    exact = np.clip(hi * share, floor, cap)
    counts = np.minimum(np.floor(exact + 1e-9), cap).astype(np.int64)
    left = round(target) - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    for h in order:
        if left <= 0:
            break
        if counts[h] < cap[h]:
            counts[h] += 1
            left -= 1
    return counts


class StratifiedPairs:
    """Complementary pairs drawn without replacement, stratified by coalition size.

    Stratum ``h`` holds the pairs whose smaller side has ``s_h`` players (``s_h < M/2``:
    ``C(M, s_h)`` pairs; ``s_h = M/2``: ``C(M, M/2) / 2`` pairs, each named by its side holding
    player 0). :meth:`extend` grows the sample to a total number of pairs; the rows come back
    in drawing order, pair by pair.
    """

    def __init__(self, m: int, rng: np.random.Generator, allocation: Allocation = "leverage") -> None:
        self.m = m
        self.rng = rng
        self.sizes = np.arange(1, m // 2 + 1, dtype=np.int64)
        middle = (m % 2 == 0) & (self.sizes == m // 2)
        self.middle = middle
        self.log_count = log_binom(m, self.sizes) - np.where(middle, np.log(2.0), 0.0)
        raw = np.exp(self.log_count)  # pairs per stratum (float; huge for large M), integral below 2^50
        self.count = np.where(self.log_count < 50 * np.log(2.0), np.round(raw), raw)
        if allocation == "leverage":  # every size gets the same number of coalitions
            share = np.ones(len(self.sizes))
        elif allocation == "kernel":  # coalitions in proportion to the kernel's mass of the size
            share = size_mass(m, self.sizes)
        else:
            raise ValueError(f"unknown allocation {allocation!r}")
        self.share = np.where(middle, 0.5, 1.0) * share
        self.k = np.zeros(len(self.sizes), dtype=np.int64)
        self._seen: list[set[bytes]] = [set() for _ in self.sizes]
        self._stratum: list[np.ndarray] = []

    @property
    def pairs(self) -> int:
        return int(self.k.sum())

    def extend(self, pairs: int) -> np.ndarray:
        """Grow to ``pairs`` pairs in all (as the allocation spreads them); the new rows (2k, M)."""
        cap = np.minimum(self.count, float(np.iinfo(np.int64).max // 4))
        want = water_fill(float(pairs), self.share, cap, self.k.astype(np.float64))
        blocks = []
        for h in np.flatnonzero(want > self.k):
            reps = self._draw(h, int(want[h] - self.k[h]), whole=want[h] >= self.count[h])
            self.k[h] += len(reps)
            self._stratum.append(np.full(len(reps), h, dtype=np.int64))
            pair = np.empty((2 * len(reps), self.m), dtype=bool)
            pair[0::2], pair[1::2] = reps, ~reps
            blocks.append(pair)
        return np.concatenate(blocks) if blocks else np.zeros((0, self.m), dtype=bool)

    def _draw(self, h: int, count: int, *, whole: bool) -> np.ndarray:
        """``count`` new representatives of stratum ``h``, distinct from every earlier one."""
        size, fixed, seen = int(self.sizes[h]), bool(self.middle[h]), self._seen[h]
        if whole and self.count[h] <= ENUMERATE_MAX:
            reps = all_subsets(self.m, size, fixed_first=fixed)
            keep = [i for i, key in enumerate(row_keys(reps)) if key not in seen]
            reps = reps[keep]
            seen.update(row_keys(reps))
            return reps
        out: list[np.ndarray] = []
        while count > 0:
            batch = random_subsets(self.m, size, max(2 * count, 16), self.rng, fixed_first=fixed)
            for row, key in zip(batch, row_keys(batch), strict=True):
                if key not in seen:
                    seen.add(key)
                    out.append(row)
                    count -= 1
                    if count == 0:
                        break
        return np.asarray(out, dtype=bool).reshape(-1, self.m)

    def design(self, rows: np.ndarray, *, correct: bool = True) -> Design:
        """Weights of ``rows`` (everything :meth:`extend` returned, in order): the kernel weight
        of the row's size times ``C_h / k_h`` (the inverse of its inclusion probability)."""
        stratum = np.concatenate(self._stratum) if self._stratum else np.zeros(0, dtype=np.int64)
        sizes = rows.sum(axis=1)
        s = sizes.astype(np.float64)
        log_kernel = -log_binom(self.m, sizes) - np.log(s * (self.m - s))
        row_stratum = np.repeat(stratum, 2)
        log_inverse = self.log_count[row_stratum] - np.log(self.k[row_stratum])
        log_w = log_kernel + (log_inverse if correct else 0.0)
        weight = np.exp(log_w - log_w.max()) if len(log_w) else log_w  # scale-free: the regression ignores it
        fpc = np.minimum(self.k / self.count, 1.0)
        exhaustive = bool(np.all(self.k >= self.count))
        return Design(rows, weight, stratum, fpc, exhaustive)


class PairedKernelDraws:
    """KernelSHAP's sampling: i.i.d. pairs, the size from the Shapley kernel's distribution
    ``p(s) ∝ (M−1)/(s(M−s))`` over ``1 … M−1``, the coalition uniform within its size, and its
    complement. Draws may repeat (with replacement), as in Covert & Lee's paired estimator."""

    def __init__(self, m: int, rng: np.random.Generator) -> None:
        self.m = m
        self.rng = rng
        sizes = np.arange(1, m, dtype=np.int64)
        mass = size_mass(m, sizes)
        self.sizes, self.p = sizes, mass / mass.sum()
        self.pairs = 0

    def extend(self, pairs: int) -> np.ndarray:
        count = max(0, pairs - self.pairs)
        drawn = self.rng.choice(self.sizes, size=count, p=self.p)
        rows = np.zeros((2 * count, self.m), dtype=bool)
        for size in np.unique(drawn):
            where = np.flatnonzero(drawn == size)
            reps = random_subsets(self.m, int(size), len(where), self.rng)
            rows[2 * where], rows[2 * where + 1] = reps, ~reps
        self.pairs += count
        return rows

    def design(self, rows: np.ndarray, *, correct: bool = True) -> Design:
        """Every row weighs the same: the kernel weight over the probability of drawing the pair
        (``2 p(s) / C(M, s)``) is a constant. ``correct`` is accepted for a uniform signature."""
        del correct
        k = len(rows) // 2
        weight = np.full(len(rows), 1.0 / max(k, 1))
        return Design(rows, weight, np.zeros(k, dtype=np.int64), np.zeros(1), exhaustive=False)
