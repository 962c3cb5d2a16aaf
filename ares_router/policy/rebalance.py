"""Rebalancing: which running requests to move, with their KV cache, from which instance to which.

Shaped after Llumnix's global scheduler (`docs/peers.md`): a round takes instances in decreasing load and, for each,
runs three small decisions:

    filter (is it a source?) -> pair (which targets to try) -> choose request (which one moves, where, and why)

`Rebalancer` is that loop; the load it ranks by (`CurrentLoad`: KV used now; `PredictedLoad`: the load model's
predicted peak), the filter (`LoadThresholds`), the pairing (`LeastLoadedTargets`) and the chooser (`HalfGapChooser`:
current sizes, Llumnix's balance; `PeakGainChooser`: ARES's predicted peak reduction net of migration cost) are the
parts. A target must admit the moved request by SGLang's rule (`Admission`), taking it as a request whose prompt is
its KV so far and whose max_tokens is what it may still generate. Named rebalancers live in `REBALANCERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import numpy as np

from ares_router.policy.snapshot import ClusterSnapshot, Migration


class RebalancePolicy(Protocol):
    """A rebalancing policy."""

    def plan(self, snapshot: ClusterSnapshot) -> list[Migration]:
        """The migrations wanted now (`source`/`target` index `snapshot.instances`)."""
        ...


@dataclass(frozen=True)
class NoRebalance:
    """Static placement never moves a running request."""

    def plan(self, snapshot: ClusterSnapshot) -> list[Migration]:
        """Nothing."""
        return []


# -- load: what ranks instances ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurrentLoad:
    """KV tokens in use now (pending prompts included), as a fraction of capacity."""

    def of(self, rnd: Round) -> np.ndarray:
        """Per instance."""
        return rnd.used / rnd.snapshot.capacity


@dataclass(frozen=True)
class PredictedLoad:
    """The load model's predicted peak demand over the horizon, as a fraction of capacity."""

    def of(self, rnd: Round) -> np.ndarray:
        """Per instance."""
        return rnd.demand.max(axis=1) / rnd.snapshot.capacity


# -- the round's working state -------------------------------------------------------------------------------------

# Up to this many running requests in all, `Round.terms` computes every instance's row terms in one pass.
_BATCH_ROWS = 4096


@dataclass(frozen=True)
class RowTerms:
    """Per running row of one instance, what moving it involves whatever the target: its demand curve (the load
    model's `contributions`, [rows, points+1]), its migration seconds (`MigrationCost.seconds`) and the output it
    may still generate (max_new_tokens - generated; NaN: no max_tokens)."""

    curves: np.ndarray
    seconds: np.ndarray
    max_new_left: np.ndarray


@dataclass
class Round:
    """One rebalancing round: the snapshot's aggregates after the moves chosen so far, and who is still free (an
    instance is a source or a target at most once per round)."""

    snapshot: ClusterSnapshot
    used: np.ndarray
    count: np.ndarray
    running_tokens: np.ndarray
    single_need: np.ndarray
    demand: np.ndarray
    free: np.ndarray  # bool per instance: not yet a source or target this round
    load: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per instance, the rebalancer's `load`
    moved: dict[int, set[int]] = field(default_factory=dict)  # rows of each source already moved this round
    row_terms: dict[int, RowTerms] = field(default_factory=dict)  # `terms` of the instances asked so far

    @classmethod
    def start(cls, snapshot: ClusterSnapshot) -> Round:
        """The round before any move."""
        return cls(
            snapshot,
            snapshot.used.copy(),
            snapshot.count.copy(),
            snapshot.running_tokens.copy(),
            snapshot.single_need.copy(),
            snapshot.demand.copy(),
            snapshot.healthy.copy(),
        )

    def admits(self, target: int, source: int, rows: np.ndarray) -> np.ndarray:
        """Per row of `source` (indices `rows`): would `target` admit that request by SGLang's rule now?"""
        snap = self.snapshot
        inst = snap.instances[source]
        length, generated = inst.lengths[rows], inst.generated[rows]
        cap = snap.capacity[target]
        # What it may still generate: its max_tokens less what it has generated (NaN: no max_tokens, stays NaN).
        return snap.admission.admits(
            cap - self.used[target],
            self.count[target],
            self.running_tokens[target],
            self.single_need[target],
            length,
            inst.max_new_tokens[rows] - generated,
            cap,
        )

    def admits_targets(self, targets: np.ndarray, source: int) -> np.ndarray:
        """[targets, rows of `source`]: `admits` for every row and several targets, in one broadcast call of the
        admission rule (the same arithmetic per element as one call per target, at a fraction of the dispatch
        cost on the few rows a small-concurrency instance has)."""
        snap = self.snapshot
        t = targets[:, None]
        cap = snap.capacity[t]
        return snap.admission.admits(
            cap - self.used[t],
            self.count[t],
            self.running_tokens[t],
            self.single_need[t],
            snap.instances[source].lengths,
            self.terms(source).max_new_left,
            cap,
        )

    def terms(self, source: int) -> RowTerms:
        """The target-free terms of moving each row of `source` (`RowTerms`), computed once per round: the
        snapshot's rows do not change within one. The first call computes them for every instance in one pass
        when the cluster runs at most `_BATCH_ROWS` requests (a few numpy calls per round instead of a few per
        source: on small arrays the calls, not the arithmetic, are the cost), else for `source` alone. Each term of
        a row depends on that row only, so both ways give the same numbers."""
        got = self.row_terms.get(source)
        if got is not None:
            return got
        insts = self.snapshot.instances
        which = [source]
        if not self.row_terms and sum(i.lengths.size for i in insts) <= _BATCH_ROWS:
            which = list(range(len(insts)))
        parts = [insts[j] for j in which]
        lengths = np.concatenate([i.lengths for i in parts])
        lm = self.snapshot.load_model
        remaining = lm.remaining(
            np.concatenate([i.predicted_remaining for i in parts]), np.concatenate([i.predicted_upper for i in parts])
        )
        curves = lm.contributions(lengths, remaining)
        seconds = self.snapshot.migration_cost.seconds(lengths)
        left = np.concatenate([i.max_new_tokens for i in parts]) - np.concatenate([i.generated for i in parts])
        end = 0
        for j, inst in zip(which, parts, strict=True):
            a, end = end, end + inst.lengths.size
            self.row_terms[j] = RowTerms(curves[a:end], seconds[a:end], left[a:end])
        return self.row_terms[source]

    def movable(self, source: int) -> np.ndarray:
        """Per row of `source`: not already moved this round."""
        mask = np.ones(self.snapshot.instances[source].lengths.size, dtype=bool)
        mask[list(self.moved.get(source, ()))] = False
        return mask

    def move(self, source: int, target: int, row: int, contribution: np.ndarray) -> None:
        """Account for moving row `row` of `source` to `target` (its demand curve is `contribution`)."""
        self.moved.setdefault(source, set()).add(row)
        snap = self.snapshot
        inst = snap.instances[source]
        tokens = float(inst.lengths[row])
        self.used[source] -= tokens
        self.used[target] += tokens
        self.count[source] -= 1
        self.count[target] += 1
        self.running_tokens[source] -= tokens
        self.running_tokens[target] += tokens
        rest = inst.max_new_tokens[row] - inst.generated[row]
        foot = snap.admission.footprint(tokens, float(rest), float(snap.capacity[target]))
        self.single_need[target] = max(float(self.single_need[target]), foot)
        self.demand[source] -= contribution
        self.demand[target] += contribution


# -- filter, pair, choose ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadThresholds:
    """Filter: an instance gives load away when its load is above `high_watermark` or more than `gap` above the
    least loaded instance still free this round."""

    high_watermark: float = 0.9
    gap: float = 0.2

    def is_source(self, load: float, lowest: float) -> bool:
        """Whether an instance at `load` should shed load."""
        return load > self.high_watermark or load - lowest > self.gap


@dataclass(frozen=True)
class LeastLoadedTargets:
    """Pairing: the `targets_per_source` least loaded free instances (ties: lowest index)."""

    targets_per_source: int = 1

    def targets(self, load: np.ndarray, free: np.ndarray) -> np.ndarray:
        """Targets to try for one source, best first."""
        return free[np.argsort(load[free], kind="stable")][: self.targets_per_source]


@dataclass(frozen=True)
class Choice:
    """A chooser's pick: row `row` of the source moves to `target`; `gain` in the chooser's unit."""

    row: int
    target: int
    gain: float


class RequestChooser(Protocol):
    """Which request of a source moves, and to which of the offered targets."""

    def choose(self, rnd: Round, source: int, targets: np.ndarray) -> Choice | None:
        """The pick, or None when no move is worth it."""
        ...


@dataclass(frozen=True)
class HalfGapChooser:
    """Current sizes only (Llumnix-style balance): with the first target, the largest request whose KV closes at
    most half the gap in tokens between the two, if the target admits it."""

    def choose(self, rnd: Round, source: int, targets: np.ndarray) -> Choice | None:
        """The largest request that fits in half the gap."""
        inst = rnd.snapshot.instances[source]
        if inst.lengths.size == 0 or targets.size == 0:
            return None
        target = int(targets[0])
        half_gap = (rnd.used[source] - rnd.used[target]) / 2.0
        rows = np.arange(inst.lengths.size)
        ok = (inst.lengths <= half_gap) & rnd.admits(target, source, rows) & rnd.movable(source)
        if not ok.any():
            return None
        cand = np.flatnonzero(ok)
        r = int(cand[np.argmax(inst.lengths[cand])])
        return Choice(r, target, float(2 * inst.lengths[r] / rnd.snapshot.capacity[source]))


@dataclass(frozen=True)
class PeakGainChooser:
    """ARES: the (request, target) pair that lowers the predicted peak of the pair the most, net of cost.

    gain = max(peak_src, peak_dst) before - after (fractions of capacity, the load model);
    cost = cost_per_second * migration seconds (`MigrationCost`): how much predicted peak reduction one second of
    migration is worth. Only gains above `min_gain` count.
    """

    min_gain: float = 0.02
    cost_per_second: float = 0.1

    def choose(self, rnd: Round, source: int, targets: np.ndarray) -> Choice | None:
        """The best net gain over the source's requests and the offered targets."""
        snap = rnd.snapshot
        inst = snap.instances[source]
        if inst.lengths.size == 0 or targets.size == 0:
            return None
        cap = snap.capacity
        terms = rnd.terms(source)
        contrib = terms.curves
        src_after = (rnd.demand[source][None, :] - contrib).max(axis=1) / cap[source]
        cost = self.cost_per_second * terms.seconds
        # Every target at once ([targets, rows]): each element is computed as a per-target pass would compute it,
        # and the targets are then compared in order as before (first best wins ties).
        dst_after = (rnd.demand[targets][:, None, :] + contrib[None, :, :]).max(axis=2) / cap[targets][:, None]
        load_src = rnd.load[source]
        before = np.array([[max(load_src, rnd.load[t])] for t in targets])  # Python's max, as per target before
        net = before - np.maximum(src_after[None, :], dst_after) - cost[None, :]
        ok = rnd.admits_targets(targets, source)
        if source in rnd.moved:  # else every row is movable
            ok &= rnd.movable(source)[None, :]
        net = np.where(ok, net, -np.inf)
        rows = net.argmax(axis=1)
        best: Choice | None = None
        for k, target in enumerate(targets.tolist()):
            r = int(rows[k])
            if best is None or net[k, r] > best.gain:
                best = Choice(r, target, float(net[k, r]))
        if best is None or best.gain <= self.min_gain:
            return None
        return best


# -- the loop ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rebalancer:
    """filter -> pair -> choose, over sources in decreasing load: up to `moves_per_source` moves from each source
    (re-filtered and re-paired after each), at most `max_per_round` in all (default: half the healthy instances
    times `moves_per_source`); an instance is a source or a target, not both, within a round.

    Several moves per source matter where a migration takes many rounds (a CPU cluster: seconds): one move per round
    would leave the gate at most one migration to run at a time."""

    load: CurrentLoad | PredictedLoad
    source_filter: LoadThresholds
    pairing: LeastLoadedTargets
    chooser: HalfGapChooser | PeakGainChooser
    max_per_round: int | None = None
    moves_per_source: int = 1

    def plan(self, snapshot: ClusterSnapshot) -> list[Migration]:
        """The round's migrations, in the order chosen."""
        healthy = np.flatnonzero(snapshot.healthy)
        if healthy.size < 2:
            return []
        rnd = Round.start(snapshot)
        rnd.load = self.load.of(rnd)
        limit = self.max_per_round or max(1, healthy.size // 2) * self.moves_per_source
        out: list[Migration] = []
        for src in healthy[np.argsort(-rnd.load[healthy], kind="stable")]:
            src = int(src)
            if len(out) >= limit:
                break
            if not rnd.free[src]:
                continue
            rnd.free[src] = False  # a source this round is not a target later in it (it is among the most loaded)
            targets_used: list[int] = []
            for _ in range(self.moves_per_source):
                free = np.flatnonzero(rnd.free)
                if free.size == 0 or len(out) >= limit:
                    break
                if not self.source_filter.is_source(float(rnd.load[src]), float(rnd.load[free].min())):
                    break
                pick = self.chooser.choose(rnd, src, self.pairing.targets(rnd.load, free))
                if pick is None:
                    break
                inst = snapshot.instances[src]
                r = pick.row
                contribution = rnd.terms(src).curves[r]
                out.append(Migration(inst.request_ids[r], src, pick.target, int(inst.lengths[r]), pick.gain))
                rnd.move(src, pick.target, r, contribution)
                rnd.load = self.load.of(rnd)
                targets_used.append(pick.target)
            rnd.free[targets_used] = False  # a target this round is not a source later in it
        return out


def current_load_rebalancer() -> Rebalancer:
    """Llumnix-style balance of current KV usage: above 90% or 20 points above the least used instance, move the
    largest request that closes at most half the gap to the least used one; up to 4 moves per source a round."""
    return Rebalancer(
        CurrentLoad(), LoadThresholds(0.9, 0.2), LeastLoadedTargets(1), HalfGapChooser(), moves_per_source=4
    )


def predicted_rebalancer() -> Rebalancer:
    """ARES: predicted peak above 90% or 15 points above the least loaded; best net peak reduction over the four
    least loaded targets."""
    return Rebalancer(PredictedLoad(), LoadThresholds(0.9, 0.15), LeastLoadedTargets(4), PeakGainChooser())


REBALANCERS: Mapping[str, Callable[[], RebalancePolicy]] = MappingProxyType(
    {"none": NoRebalance, "current_load": current_load_rebalancer, "predicted": predicted_rebalancer}
)
