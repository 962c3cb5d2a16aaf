"""Defragmenting moves: when a held request fits on no instance, move running requests off one instance so that it
does (Llumnix's de-fragmentation, with prediction).

KV is fragmented when the cluster has room for a request in total but no single instance has: each instance's free
tokens, net of SGLang's reserve for its active requests (or a predictive server's forecast peak), fall short. Moving
a running request with its KV from instance j to another one frees its tokens (and its reserve) on j; a few moves
can make j admit the waiting request.

`Defragmenter.plan(snapshot, request)` is pure. For the request the router holds longest (`registry.plan_rebalance`
passes it), if no healthy instance admits it now:

1. candidate sources: the `sources` instances closest to admitting it (the smallest shortfall of SGLang's
   allocatable below what the request requires);
2. on each, greedily, at most `max_moves` running requests leave, each to the least loaded other instance that
   admits it (as the rebalancer's target check: a request whose prompt is its KV so far and whose max_tokens is
   what it may still generate). Which ones: never one predicted to end within `min_remaining_tokens` (its KV frees
   soon anyway, and the move's stall would be wasted on it; the planning length is its P90 where the head gives one
   and `LoadModel.use_upper`, else its prediction; no prediction: it may move); among the others, the smallest one
   that alone covers the shortfall (the cheapest move on the link, `MigrationCost.seconds`), else the largest (the
   most tokens per move's fixed cost), ties broken by the longer predicted remaining length (the longer it would have
   held the KV);
3. after each move the source is judged again exactly as the router's view would judge it (its state without the
   moved rows, through `build_snapshot`: SGLang's rule or the server's forecast);
4. of the sources that come to admit the request, the plan with the least total migration time (link cost) wins.

The moves go through the migration gate like the rebalancer's (`gate.RebalanceGate`); the request itself is placed
by the release pass once the moved KV has left (`hold.HoldRelease`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ares_router.policy.rebalance import Round
from ares_router.policy.snapshot import ClusterSnapshot, Migration, NewRequest, build_snapshot


@dataclass(frozen=True)
class Defragmenter:
    """The defragmenting-move planner (see the module docstring)."""

    min_remaining_tokens: float = 256.0
    max_moves: int = 3
    sources: int = 4

    def plan(self, snapshot: ClusterSnapshot, request: NewRequest) -> list[Migration]:
        """Moves that make one instance admit `request` (none when one already does, or no plan does it)."""
        healthy = np.flatnonzero(snapshot.healthy)
        if healthy.size < 2 or snapshot.admits(request, healthy).any():
            return []
        adm = snapshot.admission
        cap = snapshot.capacity[healthy]
        need = adm.required(float(request.prompt_tokens), request.max_new, snapshot.running_tokens[healthy], cap)
        short = need - snapshot.allocatable(healthy)
        best: tuple[float, list[Migration]] | None = None
        for j in healthy[np.argsort(short, kind="stable")][: self.sources]:
            moves = self._free(snapshot, int(j), request)
            if moves:
                cost = float(np.sum(snapshot.migration_cost.seconds(np.array([m.kv_tokens for m in moves]))))
                if best is None or cost < best[0]:
                    best = (cost, moves)
        return [] if best is None else best[1]

    def _free(self, snapshot: ClusterSnapshot, j: int, request: NewRequest) -> list[Migration] | None:
        """Moves off instance `j` after which it admits `request`, or None."""
        inst = snapshot.instances[j]
        n = inst.lengths.size
        if n == 0:
            return None
        lm = snapshot.load_model
        rem = lm.remaining(inst.predicted_remaining, inst.predicted_upper)
        movable = np.isnan(rem) | (rem >= self.min_remaining_tokens)
        rnd = Round.start(snapshot)
        rnd.free[j] = False
        moved = np.zeros(n, dtype=bool)
        out: list[Migration] = []
        adm = snapshot.admission
        cap = float(snapshot.capacity[j])
        for _ in range(self.max_moves):
            short = float(
                adm.required(float(request.prompt_tokens), request.max_new, rnd.running_tokens[j], cap)
                - adm.allocatable(cap - rnd.used[j], rnd.count[j], rnd.running_tokens[j], rnd.single_need[j])
            )
            pick = self._pick(inst.lengths, rem, movable & ~moved, short)
            target = None
            while pick is not None:
                target = self._target(rnd, j, pick)
                if target is not None:
                    break
                movable = movable.copy()
                movable[pick] = False  # no instance takes it: try another
                pick = self._pick(inst.lengths, rem, movable & ~moved, short)
            if pick is None or target is None:
                return None
            contribution = lm.contributions(inst.lengths[pick : pick + 1], rem[pick : pick + 1])[0]
            rnd.move(j, target, pick, contribution)
            moved[pick] = True
            out.append(Migration(inst.request_ids[pick], j, target, int(inst.lengths[pick]), 0.0))
            if _admits_without(snapshot, j, moved, request):
                return out
        return None

    def _pick(self, lengths: np.ndarray, rem: np.ndarray, ok: np.ndarray, short: float) -> int | None:
        """The row to move next: the smallest that covers `short` alone, else the largest (ties: longer remaining)."""
        rows = np.flatnonzero(ok)
        if rows.size == 0:
            return None
        life = np.where(np.isnan(rem[rows]), np.inf, rem[rows])
        covers = rows[lengths[rows] >= short]
        if covers.size:
            sub = np.isin(rows, covers)
            order = np.lexsort((-life[sub], lengths[covers]))  # smallest length first, then longest life
            return int(covers[order[0]])
        order = np.lexsort((-life, -lengths[rows]))  # largest first, then longest life
        return int(rows[order[0]])

    @staticmethod
    def _target(rnd: Round, source: int, row: int) -> int | None:
        """The least loaded other instance that admits the row now (on the round's state), or None."""
        snap = rnd.snapshot
        free = np.flatnonzero(snap.healthy)
        free = free[free != source]
        for t in free[np.argsort(rnd.used[free] / snap.capacity[free], kind="stable")]:
            if rnd.admits(int(t), source, np.array([row]))[0]:
                return int(t)
        return None


def _admits_without(snapshot: ClusterSnapshot, j: int, moved: np.ndarray, request: NewRequest) -> bool:
    """Whether instance `j` admits `request` once its `moved` running rows have left, judged as the router's view
    judges it (its state without them through `build_snapshot`: SGLang's rule, or its forecast if predictive)."""
    inst = snapshot.instances[j]
    keep = ~moved
    ids = [rid for rid, k in zip(inst.request_ids, keep, strict=True) if k]
    state = replace(
        inst,
        used_tokens=int(inst.used_tokens - inst.lengths[moved].sum()),
        request_ids=tuple(ids),
        lengths=inst.lengths[keep],
        generated=inst.generated[keep],
        predicted_remaining=inst.predicted_remaining[keep],
        predicted_upper=inst.predicted_upper[keep],
        max_new_tokens=inst.max_new_tokens[keep],
    )
    one = build_snapshot([state], snapshot.load_model, snapshot.migration_cost, snapshot.admission)
    # Requests the router sent there since the poll (`ClusterSnapshot.with_dispatch`) count too: their tokens and
    # their count (a predictive server's forecast of them is left out: they are new since the poll).
    polled = float(max(inst.used_tokens, inst.lengths.sum()) + inst.pending_prompt.sum())
    extra_used = max(0.0, float(snapshot.used[j]) - polled)
    extra_count = max(0.0, float(snapshot.count[j]) - (inst.lengths.size + inst.pending_prompt.size))
    if extra_used or extra_count:
        one = replace(one, used=one.used + extra_used, count=one.count + extra_count)
    return bool(one.admits(request)[0])
