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
`rebalance_every` polls it asks the policy for migrations, and passes them through the router's migration gate
(`SimConfig.gate`: `ares_router.policy.RebalanceGate` with the router's default limits, on the simulator's clock),
which hears of every started move's end (committed, the target's rejection, the request finishing first).
A policy that holds when full (`Policy.hold_when_full`, late binding) keeps an arriving request at the router
while no instance admits it on the router's view; after every poll the held requests that some instance admits
are placed, oldest first (first fit: one that fits nowhere does not block the ones behind it).
Randomness (the random policy, predictor noise) comes from generators seeded by `SimConfig.seed`.

The simulator's parts, one job each, combined into `ClusterSim`: `decode` (decode instances: batching, queues,
retraction, step timing, token gaps), `decode_admission` (the servers' admission rule), `links` (prefill
instances and KV transfer timing), `migration` (live migration), `router_view` (polls, snapshots, dispatch,
holding, rebalancing). This module keeps the configuration, the result, the state and the event loop.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ares.workloads import Workload
from ares_router.estimate import OutputEstimator
from ares_router.policy import (
    ADMISSION_MODES,
    DEFAULT_HOLD_MAX_WAIT_S,
    Admission,
    ClusterSnapshot,
    HoldRelease,
    LoadModel,
    RebalanceGate,
    RebalanceLimits,
    get_policy,
)
from ares_router.policy import Migration as PolicyMigration

from .cost_model import CostModel, get_cost_model
from .decode import DecodeInstances, _Decode
from .decode_admission import DecodeAdmission
from .events import _ARRIVE, _MIGRATED, _POLL, _PREFILLED, _STEP
from .gaps import GapHistogram
from .links import Links
from .migration import Migration
from .predictor_model import ErrorModel
from .request import _Req
from .router_view import RouterView

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
    # The migration gate the rebalancer's proposals pass (`ares_router.policy.RebalanceGate`: limits, cooldowns,
    # confirmation rounds, back-off), on the simulator's clock; the default is the router's default. None: no gate
    # (every proposal is tried, as the simulator did before the gate was shared).
    gate: RebalanceLimits | None = field(default_factory=RebalanceLimits)
    reserve_tokens: int = 512  # SGLang's --num-reserved-decode-tokens, read by its admission rule (`Admission`)
    # The decode servers' admission rule (`--ares-admission`): "sglang" (SGLang's) or "predictive" (the forecast KV
    # peak of the running set plus the new request within the pool, `ares_router.policy.admission.KVForecast`;
    # each running request at its head's P90 capped by max_tokens, admitted-not-running ones at the estimator's
    # prior), or "predictive_point" (the same at the head's point prediction). Retracted requests come back by
    # SGLang's resume rule either way, as on the real server.
    admission: str = "sglang"
    # Aging of requests held at the router (`ares_router.policy.HoldRelease`): held this long, a request is
    # released before anything behind it and holds new arrivals back while it fits nowhere. None: no aging.
    hold_max_wait_s: float | None = DEFAULT_HOLD_MAX_WAIT_S  # the router's default (`--ares-hold-max-wait-s`)
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


class ClusterSim(RouterView, Migration, Links, DecodeAdmission, DecodeInstances):
    """One simulation run: `ClusterSim(workload, config).run()`. Its parts' modules say what each does; the state
    they share is built here."""

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
        self.gate = RebalanceGate(config.gate) if config.gate is not None else None
        self.gated: dict[int, PolicyMigration] = {}  # request -> the gate's move in flight (for `done`)
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
        """Schedule an event (`events`) at `t`; same-time events run in push order."""
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
                    self._prefilled(t, *obj)
                else:
                    self._poll(t)
            elif i < n:
                t = next_arrival
                self._arrive(t, reqs[i])
                i += 1
            else:
                break
        return self._result(t)

    def _result(self, t_end: float) -> SimResult:
        """The run's raw outcomes, ended at `t_end`."""
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
