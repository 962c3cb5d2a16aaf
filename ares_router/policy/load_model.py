"""Load model: predicted KV demand of decode instances over a horizon, and what a migration costs.

Time is counted in decode steps (one token per running request per step). A running request r with current length
l_r and predicted remaining tokens p_r occupies l_r + s KV tokens s steps from now while s <= p_r and nothing after.
On a grid 0 = s_0 < s_1 < ... < s_G = horizon the instance's demand on the interval (s_{k-1}, s_k] is bounded above by

    U_k = sum over r with p_r > s_{k-1} of (l_r + min(p_r, s_k))

(every request alive at the start of the interval, each at its largest size in the interval), so the grid never
misses the peak that sits just before a request finishes. A request with no prediction keeps its current length for
the whole horizon ("current load" fallback): with no predictions anywhere the ARES policy ranks instances exactly like
`least_kv`. Tokens the server reports but no request explains (reservations, KV held for a migration in flight) stay
constant over the horizon. Beside the demand, the same pass counts the requests alive on each interval (what SGLang's
admission reserves for).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class MigrationCost:
    """What moving a request costs: KV bytes over the link, a fixed setup and the request's pause."""

    kv_bytes_per_token: float = 524_288.0  # Llama-2-7B: 2 * 32 layers * 32 kv heads * 128 dim * 2 bytes
    link_bytes_per_s: float = 25e9
    pause_s: float = 0.02
    setup_s: float = 0.0  # per migration, independent of its size (commands, the target's reservation)

    def seconds(self, tokens: float | np.ndarray) -> float | np.ndarray:
        """How long migrating a request of `tokens` KV tokens takes, end to end (transfer, setup, pause)."""
        return np.asarray(tokens) * self.kv_bytes_per_token / self.link_bytes_per_s + self.pause_s + self.setup_s


@dataclass(frozen=True)
class LoadModel:
    """Predicted KV demand of instances over a horizon of decode steps (see the module docstring)."""

    horizon_tokens: int = 2048
    points: int = 16
    use_upper: bool = False  # plan with the upper quantile where the predictor gives one

    @cached_property
    def _grids(self) -> tuple[np.ndarray, np.ndarray]:
        s = np.linspace(0.0, float(self.horizon_tokens), self.points + 1)
        return s, np.concatenate(([-1.0], s[:-1]))  # interval 0 is the present: everyone is alive

    def grid(self) -> np.ndarray:
        """Step offsets s_0 = 0 < ... < s_G = horizon."""
        return self._grids[0]

    def remaining(self, predicted: np.ndarray, upper: np.ndarray) -> np.ndarray:
        """Remaining tokens used for planning (NaN: no prediction): the prediction, or its upper quantile where
        given if `use_upper`."""
        if self.use_upper and upper.size:
            return np.where(np.isnan(upper), predicted, upper)
        return predicted

    def contributions(self, lengths: np.ndarray, remaining: np.ndarray) -> np.ndarray:
        """[n_requests, points+1] upper-bound KV demand of each request on each grid interval."""
        s, s_prev = self._grids
        known = ~np.isnan(remaining)
        rem = np.where(known, np.maximum(remaining, 0.0), np.inf)
        alive = rem[:, None] > s_prev[None, :]
        grow = np.where(known, 1.0, 0.0)[:, None] * np.minimum(rem[:, None], s[None, :])
        return np.where(alive, lengths[:, None] + grow, 0.0)

    def pending_curve(self, prompt_tokens: float, predicted_output: float | None) -> tuple[np.ndarray, np.ndarray]:
        """(demand, alive) curves of one request not yet running (a new request); no prediction: flat."""
        s, s_prev = self._grids
        if predicted_output is None or np.isnan(predicted_output):
            return np.full(s.size, float(prompt_tokens)), np.ones(s.size)
        out = max(float(predicted_output), 0.0)
        alive = out > s_prev
        return np.where(alive, prompt_tokens + np.minimum(out, s), 0.0), alive.astype(np.float64)

    def binned(
        self, lengths: np.ndarray, remaining: np.ndarray, owner: np.ndarray, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """([n, points+1] demand, [n, points+1] requests alive) per `owner` (0..n-1): `contributions` summed per
        owner (and its non-zero entries counted), without building the
        [requests, points+1] matrix: O(requests) binning plus O(n * points) sums, so a rebuild over 65k requests
        costs a few milliseconds.

        With grid s_0 < ... < s_G, a request with known remaining p >= 0 and length l adds, on interval k,
        l + min(p, s_k) when p > s_{k-1} (s_{-1} = -1): that is l for every k <= b (b = #{s_i < p}), plus s_k while
        p >= s_k (k < c, c = #{s_i <= p}), plus p on the one interval with s_{k-1} < p < s_k (b == c == k). Suffix
        sums over b and c give every interval at once. A request without a prediction adds l everywhere.
        """
        s = self._grids[0]
        g = s.size  # points + 1 intervals; bin g means "beyond the horizon"
        out = np.zeros((n, g))
        alive = np.zeros((n, g))
        if lengths.size == 0:
            return out, alive
        known = ~np.isnan(remaining)
        if not known.all():
            out += np.bincount(owner[~known], weights=lengths[~known], minlength=n)[:, None]
            alive += np.bincount(owner[~known], minlength=n)[:, None]
        if not known.any():
            return out, alive
        p = np.maximum(remaining[known], 0.0)
        own, ln = owner[known], lengths[known]
        b, c = _grid_bins(s, p)

        def per_bin(bins: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
            return np.bincount(own * (g + 1) + bins, weights=weights, minlength=n * (g + 1)).reshape(n, g + 1)

        def suffix(x: np.ndarray) -> np.ndarray:  # [:, k] = sum of x[:, k:]
            return np.cumsum(x[:, ::-1], axis=1)[:, ::-1]

        out += suffix(per_bin(b, ln))[:, :g]  # alive on interval k: b >= k
        alive += suffix(per_bin(b, None))[:, :g]
        out += s[None, :] * suffix(per_bin(c, None))[:, 1:]  # grown to s_k: c > k
        inside = b == c  # finishes strictly inside an interval: p there, counted on interval b only
        if inside.any():
            in_bins = own[inside] * (g + 1) + b[inside]
            out += np.bincount(in_bins, weights=p[inside], minlength=n * (g + 1)).reshape(n, g + 1)[:, :g]
        return out, alive


def _grid_bins(s: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(#{s_i < p}, #{s_i <= p}) per value of `p` (>= 0) on the sorted grid `s` (s_0 = 0). The grid is uniform, so
    the index comes from one multiplication, then is corrected against the grid itself (so values exactly on a grid
    point land exactly as `searchsorted` puts them): a third of `searchsorted`'s time at 65k requests."""
    g = s.size - 1
    if g < 1 or s[-1] <= 0:
        return np.searchsorted(s, p, side="left"), np.searchsorted(s, p, side="right")
    k = np.minimum(p * (g / s[-1]), g).astype(np.intp)  # last grid point <= p, give or take one (rounding)
    k -= s[k] > p
    np.maximum(k, 0, out=k)
    k += (k < g) & (s[np.minimum(k + 1, g)] <= p)
    c = k + 1
    return c - (s[k] == p), c
