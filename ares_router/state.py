"""The router's view of the cluster: polled server load + its own bookkeeping of the requests it relays, turned
into a `policy.ClusterSnapshot`, and the dispatch decisions taken on it.

Snapshot lifecycle: `refresh()` (after every poll round) rebuilds the snapshot from scratch; each dispatch in
between updates it incrementally (`ClusterSnapshot.with_dispatch`), so a burst arriving between two polls spreads
out instead of landing on the instance that looked emptiest at the last poll.

Cost: a rebuild touches each request the server reports only through numpy columns and C-level set operations;
Python code runs per request only for the few the server does not report (dispatched, not yet running) and for
reported rows that have no prediction yet. At 256 instances x 256 running requests that is what lets a 100 ms poll
interval hold on one core (`benchmark/router_poll_bench.py`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from ares_router.estimate import OutputEstimator
from ares_router.policy import (
    ClusterSnapshot,
    InstanceState,
    LoadModel,
    NewRequest,
    NoHealthyInstance,
    Policy,
    build_snapshot,
    get_policy,
)


@dataclass(frozen=True)
class ReportedRequest:
    """One running request as a decode server's `/ares/state` reports it."""

    rid: str
    prompt_tokens: int
    generated_tokens: int
    predicted_remaining: float | None = None
    predicted_p90: float | None = None


_EMPTY = np.zeros(0)
_EMPTY.flags.writeable = False  # shared by every empty column of every snapshot
_NO_ROWS = np.zeros(0, dtype=np.intp)
_NO_ROWS.flags.writeable = False


def _col(values: Iterable[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


@dataclass(frozen=True)
class DecodeLoad:
    """What one poll of a decode server returned; per-request state (only from `/ares/state`) in column form,
    because a poll of a busy server carries hundreds of requests and the snapshot is rebuilt after every poll."""

    capacity_tokens: int
    used_tokens: int
    running_reqs: int
    queued_reqs: int = 0
    source: str = "v1_loads"  # "ares_state" | "v1_loads"
    rids: tuple[str, ...] = ()
    prompt_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    generated_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    predicted_remaining: np.ndarray = field(default_factory=lambda: np.zeros(0))  # NaN: no prediction yet
    predicted_p90: np.ndarray = field(default_factory=lambda: np.zeros(0))  # NaN: not reported
    lengths: np.ndarray = field(init=False, repr=False, compare=False)
    length_sum: float = field(init=False, repr=False, compare=False)
    unpredicted_rows: np.ndarray = field(init=False, repr=False, compare=False)

    @classmethod
    def from_reports(
        cls, capacity_tokens: int, used_tokens: int, requests: Sequence[ReportedRequest], queued_reqs: int = 0
    ) -> DecodeLoad:
        """An `/ares/state`-style load from row-form requests."""
        return cls(
            capacity_tokens,
            used_tokens,
            len(requests),
            queued_reqs,
            "ares_state",
            tuple(r.rid for r in requests),
            _col(r.prompt_tokens for r in requests),
            _col(r.generated_tokens for r in requests),
            _col(r.predicted_remaining for r in requests),
            _col(r.predicted_p90 for r in requests),
        )

    @cached_property
    def row_of(self) -> dict[str, int]:
        """rid -> row of the per-request columns."""
        return {rid: k for k, rid in enumerate(self.rids)}

    def __post_init__(self) -> None:
        # Snapshots share these columns (no copy per poll), so nothing may change them in place.
        for col in (self.prompt_tokens, self.generated_tokens, self.predicted_remaining, self.predicted_p90):
            col.flags.writeable = False
        # Derived once per poll, here rather than in cached properties (their lock costs more than the arithmetic).
        lengths = self.prompt_tokens + self.generated_tokens
        lengths.flags.writeable = False
        object.__setattr__(self, "lengths", lengths)  # KV tokens each reported request holds
        object.__setattr__(self, "length_sum", float(lengths.sum()))  # KV tokens the reported requests explain
        nan = np.isnan(self.predicted_remaining)
        # Rows without a prediction yet (the router fills in its estimate there); usually none.
        object.__setattr__(self, "unpredicted_rows", np.flatnonzero(nan) if nan.any() else _NO_ROWS)

    def prediction_of(self, rid: str) -> tuple[float, float] | None:
        """(generated_tokens, predicted_remaining) this report gives for `rid`, or None (not reported, or reported
        without a prediction)."""
        k = self.row_of.get(rid) if self.rids else None
        if k is None:
            return None
        p = float(self.predicted_remaining[k])
        return None if np.isnan(p) else (float(self.generated_tokens[k]), p)


@dataclass
class Backend:
    """One prefill or decode server as the router tracks it."""

    role: str  # "prefill" | "decode"
    index: int
    url: str
    bootstrap_port: int | None = None
    healthy: bool = False  # unknown until the first successful poll
    last_ok: float | None = None  # monotonic time of the last successful poll
    last_error: str = "not polled yet"
    consecutive_failures: int = 0
    load: DecodeLoad | None = None
    # The report before `load`: a request that finishes just after a poll is often no longer in `load`, but its
    # last prediction is here (one reference kept per poll, no per-request work).
    prev_load: DecodeLoad | None = None
    snapshot_load: DecodeLoad | None = None  # the report the current snapshot was built from
    models: frozenset[str] | None = None  # model ids the server serves (`/v1/models`); None: not asked yet
    models_time: float | None = None  # monotonic time `models` was fetched
    inflight: int = 0  # router requests on this server now
    dispatched: int = 0  # router requests ever sent here
    tracked: dict[str, Tracked] = field(default_factory=dict, repr=False)  # decode: router requests placed here

    @property
    def name(self) -> str:
        return f"{self.role}{self.index}"


@dataclass
class Tracked:
    """A request the router is relaying: what the snapshot needs to know about it between polls."""

    rid: str
    decode: int
    prefill: int
    prompt_tokens: int
    max_tokens: int | None
    estimate: float  # initial output estimate (tokens)
    generated: int = 0  # output events relayed so far (streaming requests only)
    started: bool = False  # at least one output token seen: the request is running on its decode server
    seq: int = 0  # dispatch order: the snapshot lists the router's own rows in this order (deterministic)


@dataclass
class RouterState:
    """Bookkeeping + snapshot + decisions. Single-threaded (the event loop): no locks needed."""

    prefills: list[Backend]
    decodes: list[Backend]
    policy: Policy
    load_model: LoadModel = field(default_factory=LoadModel)
    estimator: OutputEstimator = field(default_factory=OutputEstimator)
    stale_after_s: float = 10.0
    seed: int | None = 0
    requests: dict[str, Tracked] = field(default_factory=dict)
    dispatch_count: int = 0
    snapshot: ClusterSnapshot | None = None
    snapshot_time: float = 0.0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self._prefill_rr = itertools.count()
        self._seq = itertools.count()
        self.refresh()

    @classmethod
    def create(
        cls,
        prefills: Iterable[tuple[str, int | None]],
        decodes: Iterable[str],
        policy: str | Policy = "ares",
        **kwargs,
    ) -> RouterState:
        """State for the given prefill (url, bootstrap port) pairs and decode urls, nothing polled yet."""
        p = [Backend("prefill", i, url.rstrip("/"), port) for i, (url, port) in enumerate(prefills)]
        d = [Backend("decode", i, url.rstrip("/")) for i, url in enumerate(decodes)]
        return cls(prefills=p, decodes=d, policy=get_policy(policy), **kwargs)

    # -- polled state ---------------------------------------------------------------------------------------------
    def poll_ok(self, backend: Backend, load: DecodeLoad | None, now: float | None = None) -> None:
        """Record a successful poll (a recovered server comes back here)."""
        backend.healthy = True
        backend.last_ok = time.monotonic() if now is None else now
        backend.last_error = ""
        backend.consecutive_failures = 0
        if load is not None:
            backend.prev_load = backend.load
            backend.load = load

    def poll_failed(self, backend: Backend, error: str, threshold: int = 1) -> None:
        """Record a failed poll; after `threshold` in a row the server is not chosen until a poll succeeds again."""
        backend.last_error = error
        backend.consecutive_failures += 1
        if backend.consecutive_failures >= threshold:
            backend.healthy = False

    def mark_failed(self, backend: Backend, error: str) -> None:
        """A request to `backend` failed: take it out of rotation now, not at the next poll."""
        self.poll_failed(backend, error)
        if backend.role == "decode":
            self._rebuild_healthy()

    def _rebuild_healthy(self) -> None:
        if self.snapshot is not None and len(self.decodes):
            mask = np.array([d.healthy and d.load is not None for d in self.decodes], dtype=bool)
            self.snapshot = replace(self.snapshot, healthy=mask)

    def refresh(self, now: float | None = None) -> ClusterSnapshot:
        """Rebuild the snapshot from the last polls and the requests in flight (call after each poll round)."""
        now = time.monotonic() if now is None else now
        for b in itertools.chain(self.prefills, self.decodes):
            if b.healthy and (b.last_ok is None or now - b.last_ok > self.stale_after_s):
                b.healthy = False
                b.last_error = f"stale: no successful poll for {self.stale_after_s:g}s"
        instances = [self._instance(d) for d in self.decodes]
        self.snapshot = build_snapshot(instances, self.load_model, dispatch_count=self.dispatch_count)
        self.snapshot_time = now
        return self.snapshot

    def _instance(self, d: Backend) -> InstanceState:
        load = d.load
        d.snapshot_load = load
        tracked = d.tracked
        # Requests the server reports (/ares/state): its view wins (exact lengths, the head's prediction). That
        # includes requests this router does not relay (other routers, direct clients): they are load too.
        n_rep = len(load.rids) if load is not None else 0
        # The router's own rows are only the requests the server does not report: a set difference in C, so the
        # Python loop below runs over the few dispatched-but-not-yet-running requests, not over every request.
        own = tracked.keys() - load.rids if n_rep and tracked else tracked.keys()
        if n_rep and len(own) > 1:
            own = sorted(own, key=lambda rid: tracked[rid].seq)  # few rows; a set's order is not stable
        running = [t for t in map(tracked.__getitem__, own) if t.started]  # known from the router's own relaying
        pending = [t for t in map(tracked.__getitem__, own) if not t.started]  # prefill, KV transfer or queue
        if running:
            own_prompt = np.array([t.prompt_tokens for t in running], dtype=np.float64)
            own_gen = np.array([t.generated for t in running], dtype=np.float64)
            cap = np.array([np.nan if t.max_tokens is None else t.max_tokens for t in running], dtype=np.float64)
            own_rem = self.estimator.remaining_array(own_prompt, cap, own_gen)
            own_len = own_prompt + own_gen
        if n_rep:
            rep_rem = load.predicted_remaining
            missing = load.unpredicted_rows
            if missing.size:  # no prediction yet: the initial estimate, capped by the request's max_tokens
                rep_max = np.full(missing.size, np.nan)
                for i, k in enumerate(missing.tolist()):
                    t = tracked.get(load.rids[k])
                    if t is not None and t.max_tokens is not None:
                        rep_max[i] = t.max_tokens
                rep_rem = rep_rem.copy()
                rep_rem[missing] = self.estimator.remaining_array(
                    load.prompt_tokens[missing], rep_max, load.generated_tokens[missing]
                )
            if running:
                lengths = np.concatenate([load.lengths, own_len])
                generated = np.concatenate([load.generated_tokens, own_gen])
                remaining = np.concatenate([rep_rem, own_rem])
                upper = np.concatenate([load.predicted_p90, np.full(len(running), np.nan)])
                request_ids = load.rids + tuple(t.rid for t in running)
                length_sum = load.length_sum + float(own_len.sum())
            else:  # the usual case: the server reports every running request (no copies)
                lengths, generated, remaining = load.lengths, load.generated_tokens, rep_rem
                upper, request_ids, length_sum = load.predicted_p90, load.rids, load.length_sum
        elif running:
            lengths, generated, remaining = own_len, own_gen, own_rem
            upper, request_ids = np.full(len(running), np.nan), tuple(t.rid for t in running)
            length_sum = float(own_len.sum())
        else:
            lengths = generated = remaining = upper = _EMPTY
            request_ids, length_sum = (), 0.0
        used = max(load.used_tokens, length_sum) if load is not None else length_sum
        capacity = load.capacity_tokens if load is not None and load.capacity_tokens > 0 else 1
        return InstanceState(
            instance_id=d.name,
            capacity_tokens=int(capacity),
            used_tokens=int(used),
            healthy=d.healthy and load is not None,
            url=d.url,
            request_ids=request_ids,
            lengths=lengths,
            generated=generated,
            predicted_remaining=remaining,
            predicted_upper=upper,
            pending_ids=tuple(t.rid for t in pending),
            pending_prompt=np.array([t.prompt_tokens for t in pending], dtype=np.float64) if pending else _EMPTY,
            pending_predicted=np.array([t.estimate for t in pending], dtype=np.float64) if pending else _EMPTY,
        )

    # -- decisions ------------------------------------------------------------------------------------------------
    def choose_decode(self, prompt_tokens: int, max_tokens: int | None, exclude: Iterable[int] = ()) -> int:
        """Index of the decode server for a new request (policy on the current snapshot); the snapshot then counts
        the request as pending there. Raises `NoHealthyInstance`."""
        snap = self.snapshot
        assert snap is not None
        estimate = self.estimator.total(prompt_tokens, max_tokens)
        request = NewRequest("", prompt_tokens, estimate)
        excluded = list(exclude)
        if excluded:
            mask = snap.healthy.copy()
            mask[excluded] = False
            snap = replace(snap, healthy=mask)
        index = self.policy.dispatcher.dispatch(snap, request, self.rng)
        self.snapshot = self.snapshot.with_dispatch(index, request)
        self.dispatch_count += 1
        return index

    def choose_prefill(self, exclude: Iterable[int] = ()) -> int:
        """Index of the prefill server: the healthy one with the fewest requests in flight (ties in turn)."""
        excluded = set(exclude)
        cand = [p for p in self.prefills if p.healthy and p.index not in excluded]
        if not cand:
            raise NoHealthyInstance("no healthy prefill server")
        least = min(p.inflight for p in cand)
        ties = [p for p in cand if p.inflight == least]
        return ties[next(self._prefill_rr) % len(ties)].index

    # -- request bookkeeping --------------------------------------------------------------------------------------
    def start(self, rid: str, decode: int, prefill: int, prompt_tokens: int, max_tokens: int | None) -> Tracked:
        """Track a request just sent to (prefill, decode)."""
        estimate = self.estimator.total(prompt_tokens, max_tokens)
        t = Tracked(rid, decode, prefill, prompt_tokens, max_tokens, estimate, seq=next(self._seq))
        self.requests[rid] = t
        self.decodes[decode].tracked[rid] = t
        for b in (self.decodes[decode], self.prefills[prefill]):
            b.inflight += 1
            b.dispatched += 1
        return t

    def move(self, rid: str, decode: int) -> None:
        """A migrated request now runs on `decode` (its tokens so far stay counted)."""
        t = self.requests.get(rid)
        if t is None or t.decode == decode:
            return
        self.decodes[t.decode].tracked.pop(rid, None)
        self.decodes[t.decode].inflight -= 1
        t.decode = decode
        self.decodes[decode].tracked[rid] = t
        self.decodes[decode].inflight += 1

    def finish(self, rid: str) -> None:
        """Forget a request (finished, failed or aborted); idempotent."""
        t = self.requests.pop(rid, None)
        if t is not None:
            self.decodes[t.decode].tracked.pop(rid, None)
            self.decodes[t.decode].inflight -= 1
            self.prefills[t.prefill].inflight -= 1

    def last_prediction(self, rid: str) -> tuple[float, float] | None:
        """(generated_tokens, predicted_remaining) from the latest poll of its decode server that reported `rid`
        with a prediction (the last two polls are kept), or None. Call before `finish`; one lookup per request,
        never per poll."""
        t = self.requests.get(rid)
        if t is None:
            return None
        d = self.decodes[t.decode]
        for load in (d.load, d.prev_load):
            if load is not None and (found := load.prediction_of(rid)) is not None:
                return found
        return None

    # -- reporting ------------------------------------------------------------------------------------------------
    def predicted_peak_tokens(self) -> np.ndarray:
        """Per decode instance: predicted peak KV demand over the load model's horizon (tokens)."""
        assert self.snapshot is not None
        return self.snapshot.demand.max(axis=1) if self.snapshot.demand.size else np.zeros(len(self.decodes))

    def predicted_tokens_at_horizon(self) -> np.ndarray:
        """Per decode instance: predicted KV demand on the load model's last grid interval, i.e. `horizon_tokens`
        decode steps from now (tokens; an upper bound over that interval, pending requests included)."""
        assert self.snapshot is not None
        return self.snapshot.demand[:, -1].copy() if self.snapshot.demand.size else np.zeros(len(self.decodes))

    def served_models(self) -> frozenset[str] | None:
        """Model ids any server reported (`/v1/models`), or None when none has answered yet."""
        known = [b.models for b in itertools.chain(self.prefills, self.decodes) if b.models is not None]
        return frozenset().union(*known) if known else None

    def cluster_json(self) -> dict:
        """The current snapshot and bookkeeping as JSON-able data (`GET /ares/cluster`)."""
        snap = self.snapshot
        assert snap is not None
        now = time.monotonic()
        peaks = self.predicted_peak_tokens()

        def backend(b: Backend) -> dict:
            out = {
                "name": b.name,
                "url": b.url,
                "healthy": b.healthy,
                "last_error": b.last_error or None,
                "seconds_since_poll": None if b.last_ok is None else round(now - b.last_ok, 3),
                "consecutive_failures": b.consecutive_failures,
                "inflight": b.inflight,
                "dispatched": b.dispatched,
            }
            if b.bootstrap_port is not None:
                out["bootstrap_port"] = b.bootstrap_port
            return out

        decodes = []
        for j, d in enumerate(self.decodes):
            inst = snap.instances[j]
            load, snap_load = d.load, d.snapshot_load  # the latest poll; the one the snapshot was built from
            decodes.append(
                {
                    **backend(d),
                    "source": load.source if load else None,
                    "capacity_tokens": int(snap.capacity[j]),
                    "used_tokens": int(inst.used_tokens),
                    "used_tokens_with_pending": float(snap.used[j]),
                    "predicted_peak_tokens": float(peaks[j]),
                    "running_reqs": load.running_reqs if load else 0,
                    "queued_reqs": load.queued_reqs if load else 0,
                    "requests": [
                        {
                            "rid": str(rid),
                            "length": float(inst.lengths[k]),
                            "generated": float(inst.generated[k]),
                            "predicted_remaining": _num(inst.predicted_remaining[k]),
                            # the server's head predicted it (else: the router's estimate from the prompt)
                            "by_head": snap_load is not None and snap_load.prediction_of(str(rid)) is not None,
                        }
                        for k, rid in enumerate(inst.request_ids)
                    ],
                    "pending": [str(rid) for rid in inst.pending_ids],
                }
            )
        return {
            "policy": self.policy.name,
            "dispatch_count": self.dispatch_count,
            "snapshot_age_s": round(now - self.snapshot_time, 3),
            "inflight": len(self.requests),
            "decode": decodes,
            "prefill": [backend(p) for p in self.prefills],
        }


def _num(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


__all__ = ["Backend", "DecodeLoad", "NoHealthyInstance", "ReportedRequest", "RouterState", "Tracked"]
