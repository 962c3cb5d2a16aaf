"""Discrete-event simulator of a PD-disaggregated cluster: P prefill and D decode instances.

Flow of a request: arrival -> the policy picks its decode instance (from the last polled snapshot plus the
requests dispatched since, as a live router sees it) -> FIFO prefill on the least busy prefill instance ->
KV transfer P->D (KV bytes / link bandwidth) -> decode instance's queue -> admitted when its KV fits with
SGLang's headroom rule (free - need >= reserve_tokens * (running + 1)) -> continuous batching, one token per
running request per step -> finishes after its output tokens.

Decode instances advance event to event, not token by token: between events the batch is fixed, so the
time of k steps is closed-form (see `cost_model`). An instance's segment ends at the next request finish,
at KV exhaustion, or early at the next step boundary after an outside event (arrival, migration).
KV overflow -> SGLang-style retraction: requests with the fewest generated tokens (ties: longest prompt) are
retracted until `retract_steps` steps fit; they go back to the front of the queue and, when re-admitted,
recompute their KV (prefill time of prompt + generated, which stalls that instance's batch).
Migration: the request leaves the source batch at its next step boundary, the target reserves the KV,
and after KV bytes / link bandwidth + pause it joins the target's batch; its pause counts in its TPOT.

Every `poll_interval_s` the simulator builds a `ClusterSnapshot` (true remaining lengths for the oracle,
the error model's predictions for ARES) and every `rebalance_every` polls asks the policy for migrations.
Randomness (the random policy, predictor noise) comes from generators seeded by `SimConfig.seed`.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from ares.workloads import Workload
from ares_router.policy import (
    ClusterSnapshot,
    InstanceState,
    LoadModel,
    NewRequest,
    NoRebalance,
    build_snapshot,
    get_policy,
)

from .cost_model import CostModel, get_cost_model
from .predictor_model import ErrorModel

_STEP, _ARRIVE, _MIGRATED, _POLL = 0, 1, 2, 3


@dataclass
class SimConfig:
    """Cluster, policy and simulation knobs."""

    n_decode: int = 8
    n_prefill: int | None = None  # default: max(1, n_decode // 2)
    cost: CostModel = field(default_factory=lambda: get_cost_model("h100-llama2-7b"))
    policy: str = "ares"
    error_model: ErrorModel = field(default_factory=lambda: ErrorModel.parametric(0.5))
    load_model: LoadModel = field(default_factory=LoadModel)
    poll_interval_s: float = 0.5
    rebalance_every: int = 2  # polls between rebalancing rounds
    reserve_tokens: int = 512  # SGLang's num_reserved_decode_tokens: headroom per running request at admission
    retract_steps: int = 20  # SGLang's retract_decode_steps: retract until this many steps fit
    dispatch_prediction: bool = False  # ARES knows a (noisy) output length already at dispatch
    seed: int = 0
    max_time_factor: float = 20.0  # give up draining at duration * factor (unfinished requests fail SLOs)
    record_kv_instances: int = 64  # keep the per-instance KV trace only up to this many decode instances
    check_invariants: bool = False  # assert KV bookkeeping at every step boundary (tests)


class _Req:
    __slots__ = (
        "i", "arrival", "prompt", "out", "z", "inst", "join_step", "gen0", "len0", "epoch", "t_first",
        "t_finish", "retractions", "migrations", "migrate_to", "reserved", "gen_now",
    )  # fmt: skip

    def __init__(self, i: int, arrival: float, prompt: int, out: int, z: float) -> None:
        self.i, self.arrival, self.prompt, self.out, self.z = i, arrival, prompt, out, z
        self.inst = -1
        self.join_step = 0
        self.gen0 = 1  # the first token comes from prefill
        self.len0 = prompt
        self.epoch = 0
        self.t_first = math.nan
        self.t_finish = math.nan
        self.retractions = 0
        self.migrations = 0
        self.migrate_to = -1
        self.reserved = 0
        self.gen_now = 1  # generated tokens while not running (queued, retracted, migrating)


class _Decode:
    __slots__ = (
        "idx", "cap", "running", "heap", "waiting", "incoming", "outgoing", "n", "K", "held",
        "steps", "busy", "version", "t0", "extra", "alpha", "quad", "seg_k",
    )  # fmt: skip

    def __init__(self, idx: int, cap: int) -> None:
        self.idx, self.cap = idx, cap
        self.running: dict[int, _Req] = {}
        self.heap: list[tuple[int, int, int]] = []  # (finish step, epoch, request)
        self.waiting: deque[_Req] = deque()
        self.incoming: list[tuple[_Req, int]] = []
        self.outgoing: list[int] = []
        self.n = 0
        self.K = 0  # KV tokens of running requests
        self.held = 0  # KV held for migrations (outgoing in flight, incoming reserved)
        self.steps = 0
        self.busy = False
        self.version = 0
        self.t0 = self.extra = self.alpha = self.quad = 0.0
        self.seg_k = 0

    def seg_time(self, k: int) -> float:
        return self.extra + k * self.alpha + self.quad * k * (k - 1)

    def steps_done(self, dt: float) -> int:
        """Full steps of the current segment completed `dt` after its start."""
        x = dt - self.extra
        if not self.busy or x < self.alpha:
            return 0
        if self.quad <= 0:
            k = int(x / self.alpha)
        else:
            b = self.alpha - self.quad
            k = int((-b + math.sqrt(b * b + 4 * self.quad * x)) / (2 * self.quad))
        k = min(max(k, 0), self.seg_k)
        while k < self.seg_k and self.seg_time(k + 1) <= dt:
            k += 1
        while k > 0 and self.seg_time(k) > dt:
            k -= 1
        return k


@dataclass
class SimResult:
    """Raw per-request outcomes and cluster counters of one run (see `metrics.summarize`)."""

    policy: str
    n_decode: int
    duration_s: float
    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    t_first: np.ndarray
    t_finish: np.ndarray
    generated: np.ndarray
    retractions: np.ndarray
    migrations_per_request: np.ndarray
    migrations: int
    migrations_rejected: int
    bytes_moved: float
    clipped: int
    end_time: float
    kv_times: np.ndarray
    kv_frac: np.ndarray  # [polls, instances] (empty when too many instances to keep)
    kv_stats: np.ndarray  # [polls, 4]: mean, min, max, std of used fraction
    events: int


class ClusterSim:
    """One simulation run: `ClusterSim(workload, config).run()`."""

    def __init__(self, workload: Workload, config: SimConfig) -> None:
        self.wl = workload
        self.cfg = config
        self.cost = config.cost
        self.policy = get_policy(config.policy)
        if hasattr(self.policy.dispatcher, "reserve_tokens"):  # a policy that models admission uses the cluster's
            dispatcher = replace(self.policy.dispatcher, reserve_tokens=config.reserve_tokens)
            self.policy = replace(self.policy, dispatcher=dispatcher)
        self.needs_truth = self.policy.needs_true_lengths
        self.uses_pred = self.policy.uses_predictions
        self.rebalances = not isinstance(self.policy.rebalancer, NoRebalance)
        self.rng = np.random.default_rng(config.seed)  # the policy's generator (random dispatch)
        noise_rng = np.random.default_rng([config.seed, 1])
        cap = self.cost.kv_capacity_tokens
        limit = cap - config.reserve_tokens - 1
        prompt = np.minimum(workload.prompt_tokens, limit // 2 if limit > 2 else 1)
        out = np.minimum(workload.output_tokens, np.maximum(limit - prompt, 1))
        self.clipped = int(np.sum((prompt != workload.prompt_tokens) | (out != workload.output_tokens)))
        z = noise_rng.standard_normal(len(workload))
        self.reqs = [
            _Req(i, float(a), int(p), int(o), float(zz))
            for i, (a, p, o, zz) in enumerate(zip(workload.arrival_s, prompt, out, z, strict=True))
        ]
        self.decode = [_Decode(j, cap) for j in range(config.n_decode)]
        # The router's view, column-wise over all requests, so a poll is a few numpy passes rather than a
        # Python loop over every running request (the cost that dominates at 256 instances). Written where a
        # request changes state (rare), read at polls.
        n = len(self.reqs)
        self.col_running = np.full(n, -1, np.int64)  # decode instance running it, -1: none
        self.col_pending = np.full(n, -1, np.int64)  # dispatched there, not running (prefill, queue, retracted)
        self.col_join = np.zeros(n)  # the instance's step count when it joined
        self.col_len0 = np.zeros(n)  # KV tokens when it joined
        self.col_gen0 = np.zeros(n)  # tokens generated when it joined
        self.col_gen_now = np.ones(n)  # generated tokens while not running
        self.col_prompt = prompt.astype(np.float64)
        self.col_out = out.astype(np.float64)
        self.col_z = z
        n_prefill = config.n_prefill or max(1, config.n_decode // 2)
        self.prefill = [(0.0, p) for p in range(n_prefill)]
        self.events: list = []
        self.seq = 0
        self.finished = 0
        self.dispatched = 0
        self.snapshot: ClusterSnapshot | None = None
        self.migrations = 0
        self.migrations_rejected = 0
        self.bytes_moved = 0.0
        self.kv_times: list[float] = []
        self.kv_frac: list[np.ndarray] = []
        self.kv_stats: list[tuple[float, float, float, float]] = []
        self.n_events = 0

    # ------------------------------------------------------------------ event plumbing
    def _push(self, t: float, kind: int, obj) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, obj))

    def run(self) -> SimResult:
        """Simulate until every request finished (or the drain limit); return raw outcomes."""
        reqs, n = self.reqs, len(self.reqs)
        horizon = self.wl.duration_s * self.cfg.max_time_factor + 3600.0
        self._push(0.0, _POLL, None)
        i = 0
        t = 0.0
        events = self.events
        while self.finished < n:
            next_arrival = reqs[i].arrival if i < n else math.inf
            if events and events[0][0] <= next_arrival:
                t, _, kind, obj = heapq.heappop(events)
                if t > horizon:
                    break
                self.n_events += 1
                if kind == _STEP:
                    inst = self.decode[obj[0]]
                    if obj[1] == inst.version:
                        self._boundary(inst, t, inst.seg_k)
                elif kind == _ARRIVE:
                    inst = self.decode[obj.inst]
                    inst.waiting.append(obj)
                    self._wake(inst, t)
                elif kind == _MIGRATED:
                    self._migrated(t, *obj)
                else:
                    self._poll(t)
            elif i < n:
                t = next_arrival
                self._arrive(t, reqs[i])
                i += 1
            else:
                break
        return self._result(t)

    # ------------------------------------------------------------------ arrivals and prefill
    def _arrive(self, t: float, req: _Req) -> None:
        if self.snapshot is None:
            self.snapshot = self._build_snapshot(t)
        if self.needs_truth:
            pred = float(req.out - 1)
        elif self.uses_pred and self.cfg.dispatch_prediction:
            pred = float(self.cfg.error_model.predict(np.array(req.out - 1.0), np.array(0.0), np.array(req.z)))
        else:
            pred = None
        new = NewRequest(req.i, req.prompt, pred)
        idx = self.policy.dispatcher.dispatch(self.snapshot, new, self.rng)
        self.snapshot = self.snapshot.with_dispatch(idx, new)
        self.dispatched += 1
        req.inst = idx
        self.col_pending[req.i] = idx
        busy_until, p = heapq.heappop(self.prefill)
        end = max(t, busy_until) + self.cost.prefill_time(req.prompt)
        heapq.heappush(self.prefill, (end, p))
        self._push(end + self.cost.transfer_time(req.prompt), _ARRIVE, req)

    # ------------------------------------------------------------------ decode instances
    def _wake(self, inst: _Decode, t: float) -> None:
        """Make `inst` act at its first step boundary at or after `t`."""
        if not inst.busy:
            self._boundary(inst, t, 0)
            return
        k = inst.steps_done(t - inst.t0) + 1
        if k < inst.seg_k:
            inst.seg_k = k
            inst.version += 1
            self._push(inst.t0 + inst.seg_time(k), _STEP, (inst.idx, inst.version))

    def _join(self, inst: _Decode, req: _Req, length: int, gen: int, t: float) -> None:
        if math.isnan(req.t_first):
            req.t_first = t
        self.col_pending[req.i] = -1
        req.inst = inst.idx
        if gen >= req.out:  # nothing left to decode (one-token outputs)
            self._finish(req, t)
            return
        req.epoch += 1
        req.join_step, req.gen0, req.len0 = inst.steps, gen, length
        i = req.i
        self.col_running[i], self.col_join[i], self.col_gen0[i], self.col_len0[i] = inst.idx, inst.steps, gen, length
        inst.running[req.i] = req
        inst.n += 1
        inst.K += length
        heapq.heappush(inst.heap, (inst.steps + req.out - gen, req.epoch, req.i))

    def _finish(self, req: _Req, t: float) -> None:
        req.t_finish = t
        req.gen_now = req.out
        self.col_gen_now[req.i] = req.out
        self.finished += 1

    def _remove(self, inst: _Decode, req: _Req) -> tuple[int, int]:
        """Take a running request out of the batch; returns (its KV length, generated tokens)."""
        d = inst.steps - req.join_step
        del inst.running[req.i]
        req.epoch += 1  # invalidates its finish-heap entry
        inst.n -= 1
        length = req.len0 + d
        inst.K -= length
        req.gen_now = req.gen0 + d
        self.col_running[req.i] = -1
        self.col_gen_now[req.i] = req.gen_now
        return length, req.gen_now

    def _boundary(self, inst: _Decode, t: float, k: int) -> None:
        cfg, cost = self.cfg, self.cost
        if k:
            inst.steps += k
            inst.K += inst.n * k
        inst.busy = False
        # 1. finishes
        heap = inst.heap
        while heap and heap[0][0] <= inst.steps:
            _, epoch, rid = heapq.heappop(heap)
            req = inst.running.get(rid)
            if req is None or req.epoch != epoch:
                continue
            self._remove(inst, req)
            self._finish(req, t)
            if req.migrate_to >= 0:  # finished before its migration started
                self.decode[req.migrate_to].held -= req.reserved
                req.migrate_to = -1
        # 2. outgoing migrations leave the batch; their KV stays held until the transfer ends
        if inst.outgoing:
            for rid in inst.outgoing:
                req = inst.running.get(rid)
                if req is None or req.migrate_to < 0:
                    continue
                length, _ = self._remove(inst, req)
                inst.held += length
                dst = self.decode[req.migrate_to]
                dst.held += length - req.reserved
                req.reserved = length
                self.migrations += 1
                req.migrations += 1
                self.bytes_moved += length * cost.kv_bytes_per_token
                dur = cost.transfer_time(length) + cost.migration_pause_s
                self._push(t + dur, _MIGRATED, (req, inst.idx, length))
            inst.outgoing.clear()
        # 3. incoming migrations join (their KV was reserved)
        if inst.incoming:
            for req, length in inst.incoming:
                inst.held -= length
                req.migrate_to = -1
                self._join(inst, req, length, req.gen_now, t)
            inst.incoming.clear()
        # 4. admissions, FIFO (retracted requests sit at the front)
        stall = 0.0
        while inst.waiting:
            req = inst.waiting[0]
            need = req.prompt + req.gen_now - 1
            free = inst.cap - inst.K - inst.held - need
            if free < 1 or (inst.n > 0 and free < cfg.reserve_tokens * (inst.n + 1)):
                break
            inst.waiting.popleft()
            if req.retractions:  # retracted: recompute prompt + generated tokens (SGLang without backup)
                stall += cost.prefill_time(need)
            self._join(inst, req, need, req.gen_now, t)
        # 5. retraction when the next step does not fit
        if inst.n and inst.cap - inst.K - inst.held < inst.n:
            order = sorted(inst.running.values(), key=lambda r: (r.gen0 + inst.steps - r.join_step, -r.prompt))
            retracted = []
            for req in order:
                free = inst.cap - inst.K - inst.held
                if free >= inst.n * cfg.retract_steps or (inst.n == 1 and free >= 1):
                    break
                self._remove(inst, req)
                req.retractions += 1
                self.col_pending[req.i] = inst.idx
                retracted.append(req)
                if req.migrate_to >= 0:
                    self.decode[req.migrate_to].held -= req.reserved
                    req.migrate_to = -1
            inst.waiting.extendleft(reversed(retracted))
        if cfg.check_invariants:
            assert 0 <= inst.K and 0 <= inst.held and inst.K + inst.held <= inst.cap, (inst.K, inst.held)
            assert inst.n == len(inst.running) and inst.K == sum(
                r.len0 + inst.steps - r.join_step for r in inst.running.values()
            )
        # 6. next segment
        if inst.n == 0:
            return
        while heap:
            top = inst.running.get(heap[0][2])
            if top is not None and top.epoch == heap[0][1]:
                break
            heapq.heappop(heap)  # stale: retracted or migrated since it was pushed
        k_fin = heap[0][0] - inst.steps
        k_oom = max(1, (inst.cap - inst.K - inst.held) // inst.n)
        k = max(1, min(k_fin, k_oom))
        inst.busy = True
        inst.t0 = t
        inst.extra = stall
        inst.alpha = cost.step_time(inst.n, inst.K)
        inst.quad = cost.step_per_kv_token_s * inst.n / 2.0
        inst.seg_k = k
        inst.version += 1
        self._push(t + inst.seg_time(k), _STEP, (inst.idx, inst.version))

    # ------------------------------------------------------------------ migration
    def _start_migration(self, t: float, rid, src_idx: int, dst_idx: int) -> None:
        src, dst = self.decode[src_idx], self.decode[dst_idx]
        req = src.running.get(rid)
        if req is None or req.migrate_to >= 0 or src_idx == dst_idx:
            self.migrations_rejected += 1
            return
        j = src.steps_done(t - src.t0) if src.busy else 0
        est = req.len0 + src.steps + j - req.join_step + 1
        if dst.cap - dst.K - dst.held - est < self.cfg.reserve_tokens * (dst.n + 1):
            self.migrations_rejected += 1
            return
        dst.held += est
        req.reserved = est
        req.migrate_to = dst_idx
        src.outgoing.append(rid)
        self._wake(src, t)

    def _migrated(self, t: float, req: _Req, src_idx: int, length: int) -> None:
        src = self.decode[src_idx]
        src.held -= length
        dst = self.decode[req.migrate_to]
        dst.incoming.append((req, length))
        self._wake(dst, t)
        self._wake(src, t)  # freed KV may admit queued requests

    # ------------------------------------------------------------------ polling (the router's view)
    def _build_snapshot(self, t: float) -> ClusterSnapshot:
        D = len(self.decode)
        em = self.cfg.error_model
        cur = np.empty(D)
        used = np.empty(D, np.int64)
        for j, inst in enumerate(self.decode):
            k = inst.steps_done(t - inst.t0) if inst.busy else 0
            cur[j] = inst.steps + k
            used[j] = inst.K + inst.n * k + inst.held
        # running requests grouped by instance (ascending request index within one)
        run = np.flatnonzero(self.col_running >= 0)
        owner = self.col_running[run]
        order = np.argsort(owner, kind="stable")
        run, owner = run[order], owner[order]
        d = cur[owner] - self.col_join[run]
        lengths = self.col_len0[run] + d
        gen = self.col_gen0[run] + d
        pred = upper = np.full(run.size, np.nan)
        if self.uses_pred:
            rem = np.maximum(self.col_out[run] - gen, 0.0)
            if self.needs_truth:
                pred = rem
            else:
                f = gen / self.col_out[run]
                pred = em.predict(rem, f, self.col_z[run])
                upper = em.upper(pred, f)
        # pending requests (prefill, transfer, queue, retracted)
        pend = np.flatnonzero(self.col_pending >= 0)
        p_owner = self.col_pending[pend]
        order = np.argsort(p_owner, kind="stable")
        pend, p_owner = pend[order], p_owner[order]
        gen_p = self.col_gen_now[pend]
        p_prompt = self.col_prompt[pend] + gen_p - 1
        p_pred = np.full(pend.size, np.nan)
        if pend.size and self.uses_pred:
            out_p = self.col_out[pend]
            rem_p = out_p - gen_p
            if not self.needs_truth:
                rem_p = em.predict(rem_p, gen_p / out_p, self.col_z[pend])
            if self.needs_truth or self.cfg.dispatch_prediction:
                p_pred = rem_p
            else:  # the head has seen only the retracted ones decode
                p_pred = np.where(gen_p > 1, rem_p, np.nan)
        edges = np.searchsorted(owner, np.arange(D + 1))
        p_edges = np.searchsorted(p_owner, np.arange(D + 1))
        ids, p_ids = run.tolist(), pend.tolist()
        states = []
        for j, inst in enumerate(self.decode):
            a, b = edges[j], edges[j + 1]
            pa, pb = p_edges[j], p_edges[j + 1]
            states.append(
                InstanceState(
                    j,
                    inst.cap,
                    int(used[j]),
                    request_ids=ids[a:b],
                    lengths=lengths[a:b],
                    generated=gen[a:b],
                    predicted_remaining=pred[a:b],
                    predicted_upper=upper[a:b],
                    pending_ids=p_ids[pa:pb],
                    pending_prompt=p_prompt[pa:pb],
                    pending_predicted=p_pred[pa:pb],
                )
            )
        return build_snapshot(states, self.cfg.load_model, self.cost.migration_cost(), self.dispatched)

    def _poll(self, t: float) -> None:
        snap = self._build_snapshot(t)
        self.snapshot = snap
        frac = np.array([s.used_tokens for s in snap.instances], float) / snap.capacity  # without pending
        self.kv_times.append(t)
        self.kv_stats.append((float(frac.mean()), float(frac.min()), float(frac.max()), float(frac.std())))
        if len(self.decode) <= self.cfg.record_kv_instances:
            self.kv_frac.append(frac)
        if self.rebalances and len(self.kv_times) % self.cfg.rebalance_every == 0:
            for m in self.policy.rebalancer.plan(snap):
                self._start_migration(t, m.request_id, m.source, m.target)
        if self.finished < len(self.reqs):
            self._push(t + self.cfg.poll_interval_s, _POLL, None)

    # ------------------------------------------------------------------ results
    def _result(self, t_end: float) -> SimResult:
        r = self.reqs
        return SimResult(
            policy=self.policy.name,
            n_decode=len(self.decode),
            duration_s=self.wl.duration_s,
            arrival=np.array([q.arrival for q in r]),
            prompt=np.array([q.prompt for q in r]),
            output=np.array([q.out for q in r]),
            t_first=np.array([q.t_first for q in r]),
            t_finish=np.array([q.t_finish for q in r]),
            generated=np.array([q.gen_now for q in r]),
            retractions=np.array([q.retractions for q in r]),
            migrations_per_request=np.array([q.migrations for q in r]),
            migrations=self.migrations,
            migrations_rejected=self.migrations_rejected,
            bytes_moved=self.bytes_moved,
            clipped=self.clipped,
            end_time=t_end,
            kv_times=np.array(self.kv_times),
            kv_frac=np.array(self.kv_frac) if self.kv_frac else np.zeros((0, len(self.decode))),
            kv_stats=np.array(self.kv_stats).reshape(-1, 4),
            events=self.n_events,
        )


def simulate(workload: Workload, config: SimConfig) -> SimResult:
    """Run one simulation."""
    return ClusterSim(workload, config).run()
