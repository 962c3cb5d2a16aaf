"""Streaming histogram of token gaps (inter-token latencies) with a bounded relative quantile error.

256 decode instances x 1 simulated hour produce ~10^10 token gaps: too many to store. The simulator advances a
decode instance k steps at a time with a closed-form step time (see `decode._Decode.seg_time`), so the gaps of
one segment come as runs: every member of the batch sees the same k-1 inner gaps (an arithmetic progression,
the KV grows by the batch each step) plus one first gap that carries any stall. `GapHistogram` takes such runs
in O(bins touched) and keeps only per-bin weights.

Bins are log-spaced: bin b >= 1 holds [lo * r^(b-1), lo * r^b) with r = 1 + rel_width; bin 0 holds gaps below
`lo` (zero included), the last bin gaps at or above `hi`. A quantile is reported as the geometric midpoint of
the bin that holds it, clamped to the exact smallest/largest gap seen, so for a quantile inside [lo, hi) the
relative error is at most sqrt(r) - 1 (0.5% for the default 1% bins). Count, sum and extremes are exact.
"""

from __future__ import annotations

import math

import numpy as np


class GapHistogram:
    """Weighted log-binned histogram of gap durations in seconds (module docstring)."""

    def __init__(self, lo: float = 1e-5, hi: float = 1e5, rel_width: float = 0.01) -> None:
        if not (0 < lo < hi and rel_width > 0):
            raise ValueError("need 0 < lo < hi and rel_width > 0")
        self.lo, self.hi, self.r = lo, hi, 1.0 + rel_width
        self._inv_log_r = 1.0 / math.log(self.r)
        self.nb = math.ceil(math.log(hi / lo) * self._inv_log_r)
        # a Python list: the engine adds a few bins per step boundary, where numpy's per-call cost would dominate
        self._counts = [0.0] * (self.nb + 2)
        self.count = 0.0  # total weight (number of gaps)
        self.total = 0.0  # sum of weight x gap (seconds)
        self.min = math.inf
        self.max = -math.inf

    @property
    def counts(self) -> np.ndarray:
        """Weight per bin (bin 0: below lo; last: at or above hi)."""
        return np.array(self._counts)

    @property
    def max_rel_error(self) -> float:
        """Bound on the relative error of a reported quantile that lies in [lo, hi)."""
        return math.sqrt(self.r) - 1.0

    def _bin(self, v: float) -> int:
        if v < self.lo:
            return 0
        return min(int(math.log(v / self.lo) * self._inv_log_r) + 1, self.nb + 1)

    def add(self, v: float, w: float = 1.0) -> None:
        """One gap `v` seconds long, counted `w` times."""
        if w <= 0:
            return
        self._counts[self._bin(v)] += w
        self.count += w
        self.total += w * v
        self.min = min(self.min, v)
        self.max = max(self.max, v)

    def add_progression(self, first: float, step: float, n: int, w: float = 1.0) -> None:
        """Gaps first, first + step, ..., first + (n-1) step (step >= 0), each counted `w` times."""
        if n <= 0 or w <= 0:
            return
        last = first + step * (n - 1)
        b0, b1 = self._bin(first), self._bin(last)
        counts = self._counts
        if b0 == b1 or step <= 0:
            counts[b0] += w * n
        else:
            # How many of the n values lie below the upper edge E of each bin, from the closed form
            # (value i < E  <=>  i < (E - first) / step): monotone in E, so every bin gets a count >= 0.
            prev = 0
            for b in range(b0, b1):
                edge = self.lo * self.r**b  # upper edge of bin b (bin 0's is lo)
                below = min(max(math.ceil((edge - first) / step), prev), n)
                counts[b] += w * (below - prev)
                prev = below
            counts[b1] += w * (n - prev)
        self.count += w * n
        self.total += w * (n * first + step * n * (n - 1) / 2)
        self.min = min(self.min, first)
        self.max = max(self.max, last)

    def quantile(self, q: float) -> float:
        """Smallest gap with at least a fraction `q` of the weight at or below it (NaN when empty)."""
        if self.count <= 0:
            return math.nan
        cum = np.cumsum(self._counts)
        b = int(np.searchsorted(cum, q * self.count * (1 - 1e-12), side="left"))
        b = min(b, self.nb + 1)
        if b == 0:
            mid = self.min
        elif b == self.nb + 1:
            mid = self.max
        else:
            mid = self.lo * self.r ** (b - 0.5)
        return float(min(max(mid, self.min), self.max))

    @property
    def mean(self) -> float:
        """Mean gap (exact; NaN when empty)."""
        return self.total / self.count if self.count > 0 else math.nan
