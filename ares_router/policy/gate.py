"""The migration gate: which of the rebalancer's proposed migrations actually start (pure, the clock passed in).

One gate for both bodies: the live router (`migration_control`, wall clock) and the simulator (`ares.sim`,
`SimConfig.gate`, its own clock) pass the policy's proposals through it and report every started move's end to
`done` (committed, or failed with the reason: a target's rejection backs the pair off, the request's own end does
not).

`policy.plan_rebalance` says what would help now; `RebalanceGate` adds what a live system needs on top
(`docs/migration.md` §10): limits on concurrent migrations (in total and per instance), a per-request cap and
cooldown so a request does not bounce, confirmation over consecutive rounds (hysteresis: one noisy poll does not
move anything), no immediate move back along the same pair, and a back-off per (source, target, reason) for moves
that failed for a server's reason (a request that finished or is not migratable says nothing about the pair).
A migration stuck on a hung server holds its slots for at most `slot_timeout_s`: then the limits stop counting
it (it still runs to its end, and its request is not proposed again meanwhile).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from ares_router.policy.snapshot import Migration


@dataclass(frozen=True)
class RebalanceLimits:
    """The gate's knobs (router flags `--ares-migrate-*`; the simulator's `SimConfig.gate`). The defaults are the
    router's defaults, and the simulator's."""

    max_concurrent: int = 2
    per_instance: int = 1  # migrations in flight per instance, as source and as target each
    max_per_request: int = 2
    request_cooldown_s: float = 30.0
    confirm_rounds: int = 2  # a (source, target) pair must be proposed this many rounds in a row
    pair_cooldown_s: float = 10.0  # no target -> source move this soon after a source -> target one
    backoff_s: float = 5.0  # a pair whose move failed is skipped this long (per reason), doubling up to backoff_max_s
    backoff_max_s: float = 60.0
    slot_timeout_s: float = 30.0  # a migration running longer stops counting against the limits


# Failures that are the request's, not the servers': no back-off for the pair.
REQUEST_REASONS = ("not_running", "finished", "not_migratable", "cancelled", "prompt_mismatch")


def reason_class(reason: str | None) -> str:
    """The kind of a failed move's reason, for the back-off key (the first known word in it, else `other`)."""
    text = reason or ""
    for word in (*REQUEST_REASONS, "unreachable", "no_memory", "no_row", "transfer", "timeout", "layout", "401"):
        if word in text:
            return word
    return "other"


@dataclass
class RebalanceGate:
    """State across rounds: what is in flight, what moved when, which pairs keep being proposed."""

    limits: RebalanceLimits = field(default_factory=RebalanceLimits)
    in_flight: dict[Hashable, tuple[int, int, float]] = field(default_factory=dict)  # request -> (src, dst, start)
    moves: dict[Hashable, list[float]] = field(default_factory=dict)  # request -> times it moved
    pair_moved: dict[tuple[int, int], float] = field(default_factory=dict)  # (source, target) -> last move
    streak: dict[tuple[int, int], int] = field(default_factory=dict)  # pair -> consecutive rounds proposed
    # (source, target, reason class) -> (until, current back-off)
    backoff: dict[tuple[int, int, str], tuple[float, float]] = field(default_factory=dict)

    def choose(self, proposed: Sequence[Migration], eligible: Iterable[Hashable], now: float) -> list[Migration]:
        """The migrations to start this round, in the policy's order. `eligible`: requests the router can move
        (running through it on a migratable endpoint)."""
        pairs = {(m.source, m.target) for m in proposed}
        self.streak = {p: self.streak.get(p, 0) + 1 for p in pairs}
        ok_requests = set(eligible)
        lim = self.limits
        busy: dict[int, int] = {}
        counted = 0  # in flight and not yet past the slot timeout
        for s, t, started in self.in_flight.values():
            if now - started >= lim.slot_timeout_s:
                continue  # stuck on a hung server: its slots are given back
            counted += 1
            busy[s] = busy.get(s, 0) + 1
            busy[t] = busy.get(t, 0) + 1
        backing_off = {(s, t) for (s, t, _), (until, _) in self.backoff.items() if until > now}
        chosen: list[Migration] = []
        for m in proposed:
            if counted + len(chosen) >= lim.max_concurrent:
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
                or pair in backing_off
                or busy.get(m.source, 0) >= lim.per_instance
                or busy.get(m.target, 0) >= lim.per_instance
            ):
                continue
            chosen.append(m)
            busy[m.source] = busy.get(m.source, 0) + 1
            busy[m.target] = busy.get(m.target, 0) + 1
        for m in chosen:
            self.in_flight[m.request_id] = (m.source, m.target, now)
        return chosen

    def done(self, m: Migration, committed: bool, now: float, reason: str | None = None) -> None:
        """A started migration ended (`reason`: why it failed)."""
        self.in_flight.pop(m.request_id, None)
        if committed:
            self.moves.setdefault(m.request_id, []).append(now)
            self.pair_moved[(m.source, m.target)] = now
            self.streak.pop((m.source, m.target), None)  # the next move along this pair needs fresh confirmation
            for key in [k for k in self.backoff if k[:2] == (m.source, m.target)]:
                del self.backoff[key]
            return
        kind = reason_class(reason)
        if kind in REQUEST_REASONS:
            return
        key = (m.source, m.target, kind)
        _, current = self.backoff.get(key, (0.0, 0.0))
        wait = min(self.limits.backoff_max_s, current * 2 if current else self.limits.backoff_s)
        self.backoff[key] = (now + wait, wait)

    def forget(self, request_ids: Iterable[Hashable]) -> None:
        """Drop the history of requests that finished."""
        for rid in request_ids:
            self.moves.pop(rid, None)
