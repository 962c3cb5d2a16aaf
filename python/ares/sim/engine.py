"""Discrete-event simulator of a PD-disaggregated cluster: P prefill and D decode instances.

Flow of a request, as SGLang 0.5.23 PD runs it: arrival -> the policy picks its decode instance (from the last
polled snapshot plus the requests dispatched since, as a live router sees it) -> the decode instance's prealloc
queue: at its next step boundary, FIFO, SGLang's decode admission rule (`ares_router.policy.Admission`, the rule
the router's policies use) preallocates the prompt's KV, which the request holds from then on -> only then its
prefill starts (FIFO on the least busy prefill instance), so a full decode instance holds prefill back -> KV
transfer P->D (KV bytes / link bandwidth) -> joins the running batch at the next step boundary -> continuous
batching, one token per running request per step -> finishes after its output tokens.

Decode instances advance event to event, not token by token: between events the batch is fixed, so the
time of k steps is closed-form (see `cost_model`). An instance's segment ends at the next request finish,
at KV exhaustion, or early at the next step boundary after an outside event (arrival, migration).
KV overflow -> SGLang-style retraction: requests with the fewest generated tokens (ties: longest prompt) are
retracted until `retract_steps` steps fit; they wait in the instance's retracted queue (nothing new is
preallocated meanwhile) until SGLang's resume rule lets them back. `SimConfig.retraction`: "backup" (0.5.23's PD
decode, `--disaggregation-decode-retraction-backup`): the KV is copied to host memory at retraction and back at
resume, each copy (KV bytes / host bandwidth) stalling the instance's batch; "recompute": nothing is kept, the
resume recomputes prompt + generated tokens (prefill time, stalling the batch).
Migration: the request leaves the source batch at its next step boundary, the target reserves the KV,
and after setup + KV bytes / link bandwidth + pause it joins the target's batch; its pause counts in its TPOT.
Links (`SimConfig.link_contention`): every instance has one NIC, full duplex; a KV transfer (P->D after prefill,
or D->D migration) takes the sender's outgoing and the receiver's incoming side for its bytes / bandwidth, FIFO
from when it is ready, so migrations and prefill transfers into (or out of) one instance queue behind each other.

Token timing: a token comes at the end of every step a request takes part in; the gap before its first step
on an instance runs from its latest token (first token = joining decode; or the step before it was retracted
or left for migration), so queueing, recompute and migration stalls are in its gaps. Gaps are accounted per
segment, not per token (`ClusterSim._gap_accounting`): every request's longest gap (`SimResult.max_gap`) and a
streaming histogram of every gap of the measured requests (`SimResult.gaps`, see `gaps`).

Every `poll_interval_s` the simulator builds a `ClusterSnapshot` the way the router does: each decode instance's
report (what `/ares/state` would say: KV, queues, running requests with the error model's predictions for ARES,
true remaining lengths for `ares_true_lengths`) plus the bookkeeping a router keeps of what it dispatched, through
the shared assembler (`ares_router.policy.assemble_instance`) and the shared output estimator; every
`rebalance_every` polls it asks the policy for migrations.
A policy that holds when full (`Policy.hold_when_full`, late binding) keeps an arriving request at the router
while no instance admits it on the router's view; after every poll the held requests that some instance admits
are placed, oldest first (first fit: one that fits nowhere does not block the ones behind it).
Randomness (the random policy, predictor noise) comes from generators seeded by `SimConfig.seed`.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from ares.workloads import Workload
from ares_router.estimate import OutputEstimator
from ares_router.policy import (
    ADMISSION_MODES,
    NO_OWN_ROWS,
    Admission,
    ClusterSnapshot,
    DecodeLoad,
    HoldRelease,
    InstanceState,
    KVForecast,
    LoadModel,
    OwnRows,
    assemble_instance,
    build_snapshot,
    get_policy,
    holds,
    new_request,
    place,
    planned_remaining,
)

from .cost_model import CostModel, get_cost_model
from .gaps import GapHistogram
from .predictor_model import ErrorModel

_STEP, _ARRIVE, _MIGRATED, _POLL, _PREFILLED = 0, 1, 2, 3, 4
RETRACTIONS = ("backup", "recompute")


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
    reserve_tokens: int = 512  # SGLang's --num-reserved-decode-tokens, read by its admission rule (`Admission`)
    # The decode servers' admission rule (`--ares-admission`): "sglang" (SGLang's) or "predictive" (the forecast KV
    # peak of the running set plus the new request within the pool, `ares_router.policy.admission.KVForecast`;
    # each running request at its head's P90 capped by max_tokens, admitted-not-running ones at the estimator's
    # prior), or "predictive_point" (the same at the head's point prediction). Retracted requests come back by
    # SGLang's resume rule either way, as on the real server.
    admission: str = "sglang"
    # Aging of requests held at the router (`ares_router.policy.HoldRelease`): held this long, a request is
    # released before anything behind it and holds new arrivals back while it fits nowhere. None: no aging.
    hold_max_wait_s: float | None = None
    retract_steps: int = 20  # SGLang's retract_decode_steps: retract until this many steps fit
    retraction: str = "backup"  # "backup" (KV to host and back, as 0.5.23's PD decode) or "recompute"
    link_contention: bool = True  # KV transfers share each instance's NIC (False: every transfer has its own link)
    # The output guess before the head reports (at dispatch, for queued requests): the router's estimator.
    estimator: OutputEstimator = field(default_factory=OutputEstimator)
    # max_tokens the clients send: None (none; SGLang budgets CLIP = 4096 new tokens), a number (outputs are cut
    # there), or "output" (each request's own output length, as `sglang.benchmark.serving` sends it).
    max_tokens: int | str | None = None
    seed: int = 0
    max_time_factor: float = 20.0  # give up draining at duration * factor (unfinished requests fail SLOs)
    record_kv_instances: int = 64  # keep the per-instance KV trace only up to this many decode instances
    check_invariants: bool = False  # assert KV bookkeeping at every step boundary (tests)
    # Token gaps go into the ITL histogram only for requests arriving at or after warmup_frac x duration: the
    # same requests `metrics.summarize` covers (a histogram cannot be filtered afterwards).
    warmup_frac: float = 0.1
    # KV capacity request lengths are clipped against (None: the cost model's). The pooled bound (`bounds`)
    # simulates one instance with the cluster's capacity but clips as one real instance would.
    clip_capacity: int | None = None


class _Req:
    __slots__ = (
        "i", "arrival", "prompt", "out", "z", "inst", "join_step", "gen0", "len0", "epoch", "t_first",
        "t_finish", "retractions", "migrations", "migrate_to", "reserved", "gen_now", "last_tok", "max_gap",
        "seg0", "meas",
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
        self.last_tok = math.nan  # time of its latest token (valid while not running; see `_gap_accounting`)
        self.max_gap = 0.0  # its longest token gap so far
        self.seg0 = 0  # index of the first segment of its current instance it takes part in
        self.meas = True  # its gaps go into the ITL histogram (arrived after the warm-up)


class _Decode:
    __slots__ = (
        "idx", "cap", "running", "heap", "waiting", "incoming", "outgoing", "n", "K", "held",
        "steps", "busy", "version", "t0", "extra", "alpha", "quad", "seg_k", "nseg", "fresh", "n_meas",
        "mx_seg", "mx_val", "t_end", "prealloc", "retracted", "n_pre", "pre",
    )  # fmt: skip

    def __init__(self, idx: int, cap: int) -> None:
        self.idx, self.cap = idx, cap
        self.running: dict[int, _Req] = {}
        self.heap: list[tuple[int, int, int]] = []  # (finish step, epoch, request)
        self.prealloc: deque[_Req] = deque()  # dispatched here, no KV yet (SGLang's prealloc queue)
        self.n_pre = 0  # KV preallocated, not running yet: in prefill, KV transfer, or `waiting`
        self.pre: dict[int, _Req] = {}  # those requests (predictive admission's rows)
        self.waiting: deque[_Req] = deque()  # KV arrived: join the batch at the next step boundary
        self.retracted: deque[_Req] = deque()  # retracted, waiting to come back (SGLang's retracted queue)
        self.incoming: list[tuple[_Req, int]] = []
        self.outgoing: list[int] = []
        self.n = 0
        self.K = 0  # KV tokens of running requests
        self.held = 0  # KV held, not running: preallocated (`n_pre`), migrations (outgoing in flight, incoming)
        self.steps = 0
        self.busy = False
        self.version = 0
        self.t0 = self.extra = self.alpha = self.quad = 0.0
        self.seg_k = 0
        # Token-gap bookkeeping (`ClusterSim._gap_accounting`): segments completed, requests that joined at the
        # last boundary (their first gap is their own), running requests whose gaps are measured, and a stack of
        # (segment index, largest gap of that segment) with decreasing gaps: the largest gap over any suffix of
        # segments is the first entry at or after the suffix's start.
        self.nseg = 0
        self.fresh: list[tuple[_Req, int]] = []
        self.n_meas = 0
        self.mx_seg: list[int] = []
        self.mx_val: list[float] = []
        self.t_end = 0.0  # when the latest segment ended (the time of its members' latest token)

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
    # Per request: its longest token gap (s), stalls included (0 for one-token outputs). Every token gap of the
    # requests arriving after `SimConfig.warmup_frac` x duration, as a streaming histogram (see `gaps`).
    max_gap: np.ndarray = field(default_factory=lambda: np.zeros(0))
    gaps: GapHistogram = field(default_factory=GapHistogram)
    gaps_warmup_frac: float = 0.1


class ClusterSim:
    """One simulation run: `ClusterSim(workload, config).run()`."""

    def __init__(self, workload: Workload, config: SimConfig) -> None:
        if config.retraction not in RETRACTIONS:
            raise ValueError(f"retraction must be one of {RETRACTIONS}, not {config.retraction!r}")
        if config.admission not in ADMISSION_MODES:
            raise ValueError(f"admission must be one of {ADMISSION_MODES}, not {config.admission!r}")
        self.predictive = config.admission != "sglang"
        self.plan_upper = config.admission == "predictive"  # plan at the P90 (else at the point prediction)
        self.wl = workload
        self.cfg = config
        self.cost = config.cost
        self.policy = get_policy(config.policy)
        self.admission = Admission(config.reserve_tokens)  # the servers' rule, and the policy's (via the snapshot)
        self.estimator = config.estimator
        self.needs_truth = self.policy.needs_true_lengths
        self.rebalances = self.policy.rebalances
        self.rng = np.random.default_rng(config.seed)  # the policy's generator (random dispatch)
        noise_rng = np.random.default_rng([config.seed, 1])
        cap = self.cost.kv_capacity_tokens
        limit = (config.clip_capacity or cap) - config.reserve_tokens - 1
        prompt = np.minimum(workload.prompt_tokens, limit // 2 if limit > 2 else 1)
        out = np.minimum(workload.output_tokens, np.maximum(limit - prompt, 1))
        if isinstance(config.max_tokens, int):  # a client's max_tokens ends the request there
            out = np.minimum(out, max(config.max_tokens, 1))
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
        self.col_tracked = np.full(n, -1, np.int64)  # where the router thinks it is (dispatched, unfinished)
        self.col_started = np.zeros(n, bool)  # its first token reached the client
        self.col_join = np.zeros(n)  # the instance's step count when it joined
        self.col_len0 = np.zeros(n)  # KV tokens when it joined
        self.col_gen0 = np.zeros(n)  # tokens generated when it joined
        self.col_gen_now = np.ones(n)  # generated tokens while not running
        self.col_prompt = prompt.astype(np.float64)
        self.col_out = out.astype(np.float64)
        self.col_z = z
        if config.max_tokens == "output":
            self.col_max_new = out.astype(np.float64)
        elif isinstance(config.max_tokens, int):
            self.col_max_new = np.full(n, float(config.max_tokens))
        elif config.max_tokens is None:
            self.col_max_new = np.full(n, np.nan)
        else:
            raise ValueError(f"max_tokens must be None, an int or 'output', not {config.max_tokens!r}")
        # SGLang's single-request admission term per request; its maximum tells when the term cannot bind.
        self.footprint = self.admission.footprint(self.col_prompt, self.col_max_new, float(cap))
        self.max_footprint = float(self.footprint.max()) if n else 0.0
        n_prefill = config.n_prefill or max(1, config.n_decode // 2)
        self.prefill = [(0.0, p) for p in range(n_prefill)]
        # When each NIC side is next free (`_transfer`): prefill senders, decode senders, decode receivers.
        self.link_p_out = [0.0] * n_prefill
        self.link_d_out = [0.0] * config.n_decode
        self.link_d_in = [0.0] * config.n_decode
        self.events: list = []
        self.seq = 0
        self.finished = 0
        self.dispatched = 0
        self.snapshot: ClusterSnapshot | None = None
        self.held: deque[_Req] = deque()  # kept at the router while every instance is full (`Policy.hold_when_full`)
        self.hold_rule = HoldRelease(config.hold_max_wait_s)
        self.migrations = 0
        self.migrations_rejected = 0
        self.bytes_moved = 0.0
        self.kv_times: list[float] = []
        self.kv_frac: list[np.ndarray] = []
        self.kv_stats: list[tuple[float, float, float, float]] = []
        self.n_events = 0
        self.gaps = GapHistogram()
        cut = config.warmup_frac * workload.duration_s
        for r in self.reqs:
            r.meas = r.arrival >= cut

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
                elif kind == _PREFILLED:
                    req, p = obj
                    done = self._transfer(t, self.link_p_out, p, req.inst, req.prompt)
                    self._push(done, _ARRIVE, req)
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
        if self.policy.hold_when_full and (
            (self.held and self.hold_rule.blocks(np.array([t - self.held[0].arrival])))
            or holds(self.snapshot, self._new(req), self.policy)
        ):
            self.held.append(req)
            return
        self._send(t, req)

    def _release_held(self, t: float) -> None:
        """Place the held requests some instance admits now, oldest first (first fit: one that does not fit
        does not block the smaller ones behind it), after a poll. The same decisions as asking `holds` for each
        in turn, without its cost on a long queue: a dispatch only adds load, so only the requests some instance
        admits at the start are candidates (those whose least requirement fits some instance's allocatable, then the
        admission rule for every (candidate, instance) pair in one pass); after each dispatch only the later
        candidates' column of the instance it went to is asked again."""
        snap = self.snapshot
        healthy = np.flatnonzero(snap.healthy)
        if healthy.size == 0:
            return
        held = list(self.held)
        prompt = np.fromiter((r.prompt for r in held), dtype=np.float64, count=len(held))
        if snap.forecasts:  # predictive servers: SGLang's least requirement says nothing there
            cand = np.arange(len(held))
        else:
            cand = np.flatnonzero(snap.admission.least_required(prompt) <= snap.allocatable(healthy).max())
        # Aging (`HoldRelease`): the scan stops at the first aged request that fits nowhere; one screened out
        # above fits nowhere now, and later dispatches only add load.
        aged = self.hold_rule.aged(t - np.fromiter((r.arrival for r in held), dtype=np.float64, count=len(held)))
        screened = np.ones(len(held), dtype=bool)
        screened[cand] = False
        first_blocked = np.flatnonzero(aged & screened)
        if first_blocked.size:
            cand = cand[cand < first_blocked[0]]
        if cand.size == 0:
            return
        prompt = prompt[cand, None]
        max_new = self.col_max_new[[held[k].i for k in cand]][:, None]
        planned = self._planned_new(prompt, max_new) if snap.forecasts else None
        ok = snap.admits_each(prompt, max_new, healthy, planned)  # [candidate, healthy]
        column = {int(j): c for c, j in enumerate(healthy)}
        sent = np.zeros(len(held), dtype=bool)
        for pos, k in enumerate(cand):
            if not ok[pos].any():
                if aged[k]:
                    break  # nothing behind an aged request that fits nowhere goes
                continue
            c = column[self._send(t, held[k])]
            sent[k] = True
            later = slice(pos + 1, None)
            ok[later, c] = self.snapshot.admits_each(
                prompt[later], max_new[later], healthy[c : c + 1], None if planned is None else planned[later]
            )[:, 0]
        if sent.any():
            self.held = deque(r for r, s in zip(held, sent, strict=True) if not s)

    def _send(self, t: float, req: _Req) -> int:
        """Dispatch `req` now (the policy's choice) into that instance's prealloc queue; returns the instance."""
        idx = self._dispatch(req)
        req.inst = idx
        self.col_tracked[req.i] = idx
        inst = self.decode[idx]
        inst.prealloc.append(req)
        if len(inst.prealloc) == 1 and not inst.retracted:  # a blocked queue is retried at every step boundary
            self._wake(inst, t)
        return idx

    def _dispatch(self, req: _Req) -> int:
        """The policy's decode instance for `req`, decided as the router decides (`RouterState.choose_decode`): the
        shared estimator's guess and the request's max_tokens, on the snapshot that counts requests sent since."""
        idx, self.snapshot = place(self.snapshot, self._new(req), self.policy, self.rng)
        self.dispatched += 1
        return idx

    def _planned_new(self, prompt: np.ndarray, max_new: np.ndarray) -> np.ndarray:
        """The output a router plans for requests not placed yet: the shared estimator's guess (`_new`)."""
        return self.estimator.total_array(prompt, max_new)

    def _new(self, req: _Req):
        """`req` as the router sees it arriving: prompt, max_tokens and the shared estimator's guess."""
        m = self.col_max_new[req.i]
        new = new_request(req.i, req.prompt, None if math.isnan(m) else int(m), self.estimator)
        if self.needs_truth:  # the true-length policy is told every output length (a simulator-only reference)
            new = replace(new, predicted_output=float(req.out - 1))
        return new

    def _preallocate(self, inst: _Decode, t: float) -> None:
        """SGLang's `pop_preallocated`: FIFO by the admission rule, the first request that does not fit stops the
        pass; an admitted one holds its prompt's KV from now on, and its prefill can start."""
        cost = self.cost
        while inst.prealloc:
            req = inst.prealloc[0]
            if not self._admits(inst, req.prompt, self.col_max_new[req.i], planned=self._prior(req)):
                break
            inst.prealloc.popleft()
            inst.held += req.prompt
            inst.n_pre += 1
            inst.pre[req.i] = req
            busy_until, p = heapq.heappop(self.prefill)
            end = max(t, busy_until) + cost.prefill_time(req.prompt)
            heapq.heappush(self.prefill, (end, p))
            if self.cfg.link_contention:  # the transfer asks for the link when its prefill is done
                self._push(end, _PREFILLED, (req, p))
            else:
                self._push(end + cost.transfer_time(req.prompt), _ARRIVE, req)

    def _transfer(self, t: float, senders: list[float], src: int, dst: int, tokens: float) -> float:
        """Book a KV transfer of `tokens` tokens ready at `t` from `senders[src]` to decode instance `dst`: it
        starts when both NIC sides are free (FIFO: transfers are booked in the order they become ready) and holds
        them for bytes / bandwidth. Returns when it ends."""
        if not self.cfg.link_contention:
            return t + self.cost.transfer_time(tokens)
        start = max(t, senders[src], self.link_d_in[dst])
        end = start + self.cost.transfer_time(tokens)
        senders[src] = self.link_d_in[dst] = end
        return end

    def _single_need(self, inst: _Decode, running_tokens: float, active: int) -> float:
        """SGLang's largest single-request footprint over the running batch, where it can matter: the term is
        max(R * active, single - running_tokens), so below the largest footprint of any request it is never
        looked at (0 then gives the same decisions) and the loop over the batch runs only on nearly empty
        instances."""
        if self.max_footprint - running_tokens <= self.admission.reserve_tokens * active:
            return 0.0
        fp = self.footprint
        return max((float(fp[i]) for i in inst.running), default=0.0)

    def _admission_state(self, inst: _Decode, k: int = 0) -> tuple[float, int, float, float]:
        """(free, active, running_tokens, single_need) of `inst` as SGLang counts them, `k` steps into its current
        segment (0: at a step boundary)."""
        active = inst.n + inst.n_pre
        kv = inst.K + inst.n * k
        running_tokens = kv + inst.n  # prompt + output ids: the KV written plus each one's latest token
        return inst.cap - kv - inst.held, active, running_tokens, self._single_need(inst, running_tokens, active)

    def _admits(self, inst: _Decode, prompt: float, max_new: float, k: int = 0, planned: float | None = None) -> bool:
        """The server's decode admission on `inst`, `k` steps into its segment: SGLang's (`Admission`, the
        policies' rule), or with `SimConfig.admission` "predictive" the forecast peak with the request, planned at
        `planned` output tokens (None: SGLang's budget for it), within the pool (`_forecast`)."""
        if self.predictive:
            q = self.admission.max_new(prompt, max_new, float(inst.cap)) if planned is None else planned
            return bool(self._forecast(inst, k).admits(float(inst.cap), prompt, q))
        free, active, running_tokens, single = self._admission_state(inst, k)
        return bool(self.admission.admits(free, active, running_tokens, single, prompt, max_new, inst.cap))

    def _prior(self, req: _Req) -> float:
        """The output a predictive server plans for a request its head has not seen: the estimator's guess (the
        true length for the true-length policy's oracle servers)."""
        if self.needs_truth:
            return float(req.out - req.gen_now)
        m = self.col_max_new[req.i]
        est = self.estimator.total(req.prompt, None if math.isnan(m) else int(m))
        return min(est, self.admission.output_limit(float(req.prompt), m, float(self.cost.kv_capacity_tokens)))

    def _forecast(self, inst: _Decode, k: int = 0) -> KVForecast:
        """What a predictive server forecasts of itself `k` steps into its segment (as `ares.engine.admission_hook`
        does): running requests at KV length prompt + generated and planned remaining = the head's P90 (the error
        model's, as `_reports` gives the router) capped by max_tokens left; preallocated ones at their prompt and
        the prior; KV held for migrations flat."""
        run = np.fromiter(inst.running.keys(), dtype=np.intp, count=inst.n)
        gen = self.col_gen0[run] + (inst.steps + k - self.col_join[run])
        out = self.col_out[run]
        rem = np.maximum(out - gen, 0.0)
        if self.needs_truth:
            pred, upper = rem, np.full(run.size, np.nan)
        else:
            f = gen / out
            em = self.cfg.error_model
            pred = em.predict(rem, f, self.col_z[run])
            upper = em.upper(pred, f)
        left = self.admission.output_limit(self.col_prompt[run], self.col_max_new[run], float(inst.cap)) - gen
        planned = planned_remaining(pred, upper, left, self.plan_upper)
        pre = list(inst.pre.values())
        pre_prompt = np.array([r.prompt for r in pre], dtype=np.float64)
        pre_planned = np.array([self._prior(r) for r in pre], dtype=np.float64)
        lengths = np.concatenate([self.col_prompt[run] + gen, pre_prompt])
        base = float(inst.held - pre_prompt.sum())  # KV held for migrations in flight
        return KVForecast.of(lengths, np.concatenate([planned, pre_planned]), max(base, 0.0))

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
            req.last_tok = t  # its first token (from prefill) reaches the client as decode takes it
        self.col_started[req.i] = True
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
        req.seg0 = inst.nseg
        inst.fresh.append((req, req.epoch))
        inst.n_meas += req.meas
        heapq.heappush(inst.heap, (inst.steps + req.out - gen, req.epoch, req.i))

    def _finish(self, req: _Req, t: float) -> None:
        req.t_finish = t
        self.col_tracked[req.i] = -1
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
        inst.n_meas -= req.meas
        if req.seg0 < inst.nseg:  # it took part in a segment here: its latest token came at the segment's end
            req.last_tok = inst.t_end
            pos = bisect_left(inst.mx_seg, req.seg0 + 1)  # its first segment was counted in `_gap_accounting`
            if pos < len(inst.mx_seg):
                req.max_gap = max(req.max_gap, inst.mx_val[pos])
        if inst.n == 0:  # no member left: no later request asks about these segments
            inst.mx_seg.clear()
            inst.mx_val.clear()
        return length, req.gen_now

    def _gap_accounting(self, inst: _Decode, t: float, k: int) -> None:
        """Token gaps of the segment of `k` steps of `inst` that ends at `t`, without a loop over its batch.

        Step i of the segment ends at t0 + seg_time(i), so a member that was running before the segment sees a
        first gap of extra + alpha (any stall, e.g. recompute, included) and then k-1 gaps alpha + 2 quad (i-1),
        i = 2..k, the same for every member. A request that joined at the segment's start (queued, retracted,
        migrated, or new) has its own first gap: from its latest token to the segment's first step.
        """
        g1 = inst.extra + inst.alpha
        inner = inst.alpha + 2.0 * inst.quad * (k - 1) if k > 1 else 0.0  # the largest of gaps 2..k
        hist = self.gaps
        fresh_meas = 0
        if inst.fresh:
            t1 = inst.t0 + g1
            for req, epoch in inst.fresh:
                if req.epoch != epoch:  # left at the boundary it joined (retracted): not a member
                    continue
                g = t1 - req.last_tok
                req.max_gap = max(req.max_gap, g, inner)
                if req.meas:
                    hist.add(g)
                    fresh_meas += 1
            inst.fresh.clear()
        if inst.n_meas > fresh_meas:
            hist.add(g1, inst.n_meas - fresh_meas)
        if k > 1 and inst.n_meas:
            hist.add_progression(inst.alpha + 2.0 * inst.quad, 2.0 * inst.quad, k - 1, inst.n_meas)
        m = max(g1, inner)  # the largest gap of this segment for members that were running before it
        while inst.mx_val and inst.mx_val[-1] <= m:
            inst.mx_val.pop()
            inst.mx_seg.pop()
        inst.mx_seg.append(inst.nseg)
        inst.mx_val.append(m)
        inst.nseg += 1
        inst.t_end = t

    def _boundary(self, inst: _Decode, t: float, k: int) -> None:
        cfg, cost = self.cfg, self.cost
        if k:
            self._gap_accounting(inst, t, k)
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
                done = self._transfer(t + cost.migration_setup_s, self.link_d_out, inst.idx, dst.idx, length)
                self._push(done + cost.migration_pause_s, _MIGRATED, (req, inst.idx, length))
            inst.outgoing.clear()
        # 3. incoming migrations join (their KV was reserved)
        if inst.incoming:
            for req, length in inst.incoming:
                inst.held -= length
                req.migrate_to = -1
                self._join(inst, req, length, req.gen_now, t)
            inst.incoming.clear()
        # 4. SGLang's decode queues (`process_decode_queue`, disaggregation/decode.py L3458): retracted requests
        #    come back first (`resume_retracted_reqs`); while any is left nothing new is preallocated and no
        #    finished transfer is taken in; otherwise FIFO preallocation by the admission rule, then the requests
        #    whose KV has arrived join the batch (they were counted as active, not running, by the admission).
        stall = 0.0
        while inst.retracted:
            req = inst.retracted[0]
            need = req.prompt + req.gen_now - 1
            if not self.admission.resumes(inst.cap - inst.K - inst.held, inst.n + inst.n_pre, need):
                break
            inst.retracted.popleft()
            # `resume_retracted_reqs` (0.5.23 disaggregation/decode.py:1021) loads the host copy back; without
            # a backup the prompt and generated tokens are recomputed
            stall += cost.host_copy_time(need) if cfg.retraction == "backup" else cost.prefill_time(need)
            self._join(inst, req, need, req.gen_now, t)
        if not inst.retracted:
            self._preallocate(inst, t)
        # With retracted requests left and nothing running, SGLang could wait for ever: take transfers in anyway.
        if inst.waiting and (not inst.retracted or inst.n == 0):
            while inst.waiting:
                req = inst.waiting.popleft()
                inst.held -= req.prompt
                inst.n_pre -= 1
                del inst.pre[req.i]
                self._join(inst, req, req.prompt + req.gen_now - 1, req.gen_now, t)
        # 5. retraction when the next step does not fit
        if inst.n and inst.cap - inst.K - inst.held < inst.n:
            order = sorted(inst.running.values(), key=lambda r: (r.gen0 + inst.steps - r.join_step, -r.prompt))
            retracted = []
            for req in order:
                free = inst.cap - inst.K - inst.held
                if free >= inst.n * cfg.retract_steps or (inst.n == 1 and free >= 1):
                    break
                length, _ = self._remove(inst, req)
                req.retractions += 1
                retracted.append(req)
                # `retract_decode` (managers/schedule_batch.py:3451) -> `backup_kv_cache` (mem_cache/common.py:331)
                # copies its KV to the host before the step runs
                if cfg.retraction == "backup":
                    stall += cost.host_copy_time(length)
                if req.migrate_to >= 0:
                    self.decode[req.migrate_to].held -= req.reserved
                    req.migrate_to = -1
            inst.retracted.extend(retracted)
        if cfg.check_invariants:
            assert 0 <= inst.K and 0 <= inst.held and inst.K + inst.held <= inst.cap, (inst.K, inst.held)
            assert 0 <= inst.n_pre <= inst.held
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
        # A blocked head may fit once the batch has grown (`first_step`; SGLang's rule only: a forecast's peak
        # sits at a finish, which ends the segment anyway)
        if inst.prealloc and not inst.retracted and not self.predictive:
            req = inst.prealloc[0]
            k_adm = self.admission.first_step(
                *self._admission_state(inst), req.prompt, self.col_max_new[req.i], inst.cap, inst.n
            )
            if k_adm is not None:
                k = min(k, k_adm)
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
        done = src.steps + j - req.join_step
        est = req.len0 + done + 1
        # The target admits it by SGLang's rule, as a request whose prompt is its KV and whose max_tokens is what
        # it may still generate (the policy's target filter asks the same).
        k = dst.steps_done(t - dst.t0) if dst.busy else 0
        left = self.col_max_new[req.i] - (req.gen0 + done)
        planned = None
        if self.predictive:  # the target's head has not seen it yet: the prior's remaining length
            m = self.col_max_new[req.i]
            gen = req.gen0 + done
            planned = (
                float(req.out - gen)
                if self.needs_truth
                else min(
                    self.estimator.remaining(req.prompt, None if math.isnan(m) else int(m), gen),
                    self.admission.output_limit(float(req.prompt), m, float(dst.cap)) - gen,
                )
            )
        if not self._admits(dst, est, left, k, planned):
            self.migrations_rejected += 1
            return
        dst.held += est
        req.reserved = est
        req.migrate_to = dst_idx
        src.outgoing.append(rid)
        self._wake(src, t)
        self._wake(dst, t)  # its segment was planned without this reservation (KV exhaustion)

    def _migrated(self, t: float, req: _Req, src_idx: int, length: int) -> None:
        src = self.decode[src_idx]
        src.held -= length
        dst = self.decode[req.migrate_to]
        dst.incoming.append((req, length))
        self.col_tracked[req.i] = dst.idx  # committed: the router now counts it on the target
        self._wake(dst, t)
        self._wake(src, t)  # freed KV may admit queued requests

    # ------------------------------------------------------------------ polling (the router's view)
    def _reports(self, t: float) -> list[DecodeLoad]:
        """What each decode instance's `/ares/state` would answer at `t`: KV capacity and use (the allocator's count:
        preallocated and held KV included), queued requests, and the running ones with the head's predictions."""
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
        gen = self.col_gen0[run] + cur[owner] - self.col_join[run]
        prompt = self.col_prompt[run]
        # The servers' length heads predict whatever the router's policy (ARES decode servers); the true-length
        # policy's servers are oracles instead.
        rem = np.maximum(self.col_out[run] - gen, 0.0)
        if self.needs_truth:
            pred, upper = rem, np.full(run.size, np.nan)
        else:
            f = gen / self.col_out[run]
            pred = em.predict(rem, f, self.col_z[run])
            upper = em.upper(pred, f)
        edges = np.searchsorted(owner, np.arange(D + 1))
        ids = run.tolist()
        loads = []
        for j, inst in enumerate(self.decode):
            a, b = edges[j], edges[j + 1]
            loads.append(
                DecodeLoad(
                    inst.cap,
                    int(used[j]),
                    int(b - a),
                    len(inst.prealloc) + inst.n_pre + len(inst.retracted),
                    "ares_state",
                    tuple(ids[a:b]),
                    prompt[a:b],
                    gen[a:b],
                    pred[a:b],
                    upper[a:b],
                    admission=self.cfg.admission,
                )
            )
        return loads

    def _build_snapshot(self, t: float) -> ClusterSnapshot:
        """What the router would build polling now: each instance's report (`_reports`) and the router's
        bookkeeping of what it dispatched (requests no server reports running, their max_tokens), through the
        shared assembler and estimator."""
        # the router's own rows: dispatched, unfinished, not running anywhere (in dispatch order per instance)
        own = np.flatnonzero((self.col_tracked >= 0) & (self.col_running < 0))
        o_owner = self.col_tracked[own]
        order = np.argsort(o_owner, kind="stable")
        own, o_owner = own[order], o_owner[order]
        o_edges = np.searchsorted(o_owner, np.arange(len(self.decode) + 1))
        max_new = self.col_max_new
        states = []
        for j, load in enumerate(self._reports(t)):
            rows = own[o_edges[j] : o_edges[j + 1]]
            state = assemble_instance(
                j,
                load,
                self._own_rows(rows) if rows.size else NO_OWN_ROWS,
                self.estimator,
                self.admission,
                lambda k, rids=load.rids: max_new[np.asarray(rids, dtype=np.intp)[k]],
            )
            if self.needs_truth and rows.size:
                state = self._true_lengths(state, rows)
            states.append(state)
        return build_snapshot(states, self.cfg.load_model, self.cost.migration_cost(), self.admission, self.dispatched)

    def _own_rows(self, rows: np.ndarray) -> OwnRows:
        """The router's rows for these requests: started ones (a token reached the client: retracted or migrating
        now) with the tokens relayed so far, and not started ones (prealloc queue, prefill, KV transfer)."""
        started = self.col_started[rows]
        run, pend = rows[started], rows[~started]
        return OwnRows(
            tuple(run.tolist()),
            self.col_prompt[run],
            self.col_gen_now[run],
            self.col_max_new[run],
            tuple(pend.tolist()),
            self.col_prompt[pend],
            self.col_max_new[pend],
        )

    def _true_lengths(self, state: InstanceState, rows: np.ndarray) -> InstanceState:
        """`state` with the true remaining lengths where the estimator guessed (the router's own rows)."""
        started = self.col_started[rows]
        run, pend = rows[started], rows[~started]
        rem = state.predicted_remaining.copy()
        if run.size:
            rem[-run.size :] = self.col_out[run] - self.col_gen_now[run]
        return replace(state, predicted_remaining=rem, pending_predicted=self.col_out[pend] - self.col_gen_now[pend])

    def _poll(self, t: float) -> None:
        snap = self._build_snapshot(t)
        self.snapshot = snap
        if self.held:
            self._release_held(t)
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
            max_gap=np.array([q.max_gap for q in r]),
            gaps=self.gaps,
            gaps_warmup_frac=self.cfg.warmup_frac,
        )


def simulate(workload: Workload, config: SimConfig) -> SimResult:
    """Run one simulation."""
    return ClusterSim(workload, config).run()
