"""Which of the policy's proposed migrations the router actually starts (pure, clock passed in).

`policy.plan_rebalance` says what would help now; `RebalanceGate` adds what a live system needs on top
(`docs/migration.md` §10): limits on concurrent migrations (in total and per instance), a per-request cap and
cooldown so a request does not bounce, confirmation over consecutive rounds (hysteresis: one noisy poll does not
move anything), no immediate move back along the same pair, and a back-off for a target that refused or failed.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from ares_router.policy import Migration


@dataclass(frozen=True)
class RebalanceLimits:
    """The gate's knobs (router flags `--ares-migrate-*`)."""

    max_concurrent: int = 2
    per_instance: int = 1  # migrations in flight per instance, as source and as target each
    max_per_request: int = 2
    request_cooldown_s: float = 30.0
    confirm_rounds: int = 2  # a (source, target) pair must be proposed this many rounds in a row
    pair_cooldown_s: float = 10.0  # no target -> source move this soon after a source -> target one
    backoff_s: float = 5.0  # a target that refused or failed is skipped this long, doubling up to backoff_max_s
    backoff_max_s: float = 60.0


@dataclass
class RebalanceGate:
    """State across rounds: what is in flight, what moved when, which pairs keep being proposed."""

    limits: RebalanceLimits = field(default_factory=RebalanceLimits)
    in_flight: dict[Hashable, tuple[int, int]] = field(default_factory=dict)  # request -> (source, target)
    moves: dict[Hashable, list[float]] = field(default_factory=dict)  # request -> times it moved
    pair_moved: dict[tuple[int, int], float] = field(default_factory=dict)  # (source, target) -> last move
    streak: dict[tuple[int, int], int] = field(default_factory=dict)  # pair -> consecutive rounds proposed
    backoff: dict[int, tuple[float, float]] = field(default_factory=dict)  # target -> (until, current back-off)

    def choose(self, proposed: Sequence[Migration], eligible: Iterable[Hashable], now: float) -> list[Migration]:
        """The migrations to start this round, in the policy's order. `eligible`: requests the router can move
        (running through it on a migratable endpoint)."""
        pairs = {(m.source, m.target) for m in proposed}
        self.streak = {p: self.streak.get(p, 0) + 1 for p in pairs}
        ok_requests = set(eligible)
        busy: dict[int, int] = {}
        for s, t in self.in_flight.values():
            busy[s] = busy.get(s, 0) + 1
            busy[t] = busy.get(t, 0) + 1
        chosen: list[Migration] = []
        lim = self.limits
        for m in proposed:
            if len(self.in_flight) + len(chosen) >= lim.max_concurrent:
                break
            rid, pair = m.request_id, (m.source, m.target)
            times = self.moves.get(rid, [])
            if (
                rid not in ok_requests
                or rid in self.in_flight
                or len(times) >= lim.max_per_request
                or (times and now - times[-1] < lim.request_cooldown_s)
                or self.streak.get(pair, 0) < lim.confirm_rounds
                or now - self.pair_moved.get((m.target, m.source), -1e18) < lim.pair_cooldown_s
                or self.backoff.get(m.target, (0.0, 0.0))[0] > now
                or busy.get(m.source, 0) >= lim.per_instance
                or busy.get(m.target, 0) >= lim.per_instance
            ):
                continue
            chosen.append(m)
            busy[m.source] = busy.get(m.source, 0) + 1
            busy[m.target] = busy.get(m.target, 0) + 1
        for m in chosen:
            self.in_flight[m.request_id] = (m.source, m.target)
        return chosen

    def done(self, m: Migration, committed: bool, now: float) -> None:
        """A started migration ended."""
        self.in_flight.pop(m.request_id, None)
        if committed:
            self.moves.setdefault(m.request_id, []).append(now)
            self.pair_moved[(m.source, m.target)] = now
            self.streak.pop((m.source, m.target), None)  # the next move along this pair needs fresh confirmation
            self.backoff.pop(m.target, None)
        else:
            _, current = self.backoff.get(m.target, (0.0, 0.0))
            wait = min(self.limits.backoff_max_s, current * 2 if current else self.limits.backoff_s)
            self.backoff[m.target] = (now + wait, wait)

    def forget(self, request_ids: Iterable[Hashable]) -> None:
        """Drop the history of requests that finished."""
        for rid in request_ids:
            self.moves.pop(rid, None)
