"""Releasing requests held at the router (late binding, `Policy.hold_when_full`), with aging: the one rule the
router and the simulator use to say which held requests go now.

Without aging, held requests are released first fit in arrival order: each goes as soon as some instance admits it,
so a large request that fits nowhere lets the smaller ones behind it pass (no head-of-line blocking). Under steady
load that can starve it: the room it needs is taken, bit by bit, by the smaller requests passing it. Aging bounds
that: a request held `max_wait_s` or longer is *aged*, and while the oldest aged request fits nowhere, nothing
behind it is released and no new arrival is sent past it (`blocks`).

Why no held request starves with aging (any `max_wait_s` < inf): take the oldest held request A. After at most
`max_wait_s` it is aged; from then on, while A fits nowhere, no request is dispatched past it, so every instance's
load only shrinks as its running requests finish (each has a finite output) and its queued ones run. A request
always fits an empty healthy instance (the simulator and SGLang clip a request to one pool, and SGLang's rule, like
the forecast, admits a request alone on an empty pool), so some instance admits A after a finite time, and A is
released first. Then the next oldest becomes A. (Migrations only move load; the rebalancer's target check keeps
them within SGLang's rule.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The default aging, one for the router (`--ares-hold-max-wait-s`) and the simulator (`SimConfig.hold_max_wait_s`).
DEFAULT_HOLD_MAX_WAIT_S: float | None = None


def max_wait_arg(value: str) -> float | None:
    """The aging flag's value in both CLIs: seconds, or 'none' for no aging."""
    return None if value.lower() == "none" else float(value)


@dataclass(frozen=True)
class HoldRelease:
    """The release rule for held requests; `max_wait_s` None: no aging (first fit, as before)."""

    max_wait_s: float | None = DEFAULT_HOLD_MAX_WAIT_S

    def aged(self, waited_s: np.ndarray) -> np.ndarray:
        """Per held request (arrival order): whether it is aged."""
        waited = np.asarray(waited_s, dtype=np.float64)
        if self.max_wait_s is None:
            return np.zeros(waited.shape, dtype=bool)
        return waited >= self.max_wait_s

    def release(self, waited_s: np.ndarray, fits: np.ndarray) -> tuple[np.ndarray, bool]:
        """Which held requests go now, and whether an aged one is left blocking arrivals.

        `waited_s`: per held request in arrival order, how long it has been held; `fits`: whether some instance
        admits it on the current view (for a sequence of placements, call once per request in order with the
        view updated after each release, or use `stop_at`). Returns (mask of requests to release: first fit up to
        and excluding the first aged request that does not fit, nothing after it; blocked)."""
        fits = np.asarray(fits, dtype=bool)
        stop = self.stop_at(waited_s, fits)
        go = fits.copy()
        if stop is not None:
            go[stop:] = False
        return go, stop is not None

    def stop_at(self, waited_s: np.ndarray, fits: np.ndarray) -> int | None:
        """The first aged request that fits nowhere (the scan stops there), or None."""
        blocked = self.aged(waited_s) & ~np.asarray(fits, dtype=bool)
        k = np.flatnonzero(blocked)
        return int(k[0]) if k.size else None

    def blocks(self, waited_s: np.ndarray) -> bool:
        """Whether a new arrival must be held behind the held ones (an aged request waits), whatever fits."""
        return bool(self.aged(waited_s).any())
