"""The router's view of the cluster: polled server load + its own bookkeeping of the requests it relays, turned
into a `policy.ClusterSnapshot` by the assembler the simulator uses too (`policy.assemble`), and the dispatch
decisions taken on it.

Snapshot lifecycle: `refresh()` (after every poll round) rebuilds the snapshot from scratch; each dispatch in
between updates it incrementally (`ClusterSnapshot.with_dispatch`), so a burst arriving between two polls spreads
out instead of landing on the instance that looked emptiest at the last poll.

Cost: a rebuild touches each request the server reports only through numpy columns and C-level set operations;
Python code runs per request only for the few the server does not report (dispatched, not yet running), for
reported rows that have no prediction yet, and for the rows of a nearly empty server whose max_tokens SGLang's
admission rule needs (`policy.assemble_instance`). At 256 instances x 256 running requests that is what lets a 100 ms
poll interval hold on one core (`benchmark/router_poll_bench.py`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from ares_router.estimate import OutputEstimator
from ares_router.link_profile import LinkProfile
from ares_router.policy import (
    Admission,
    ClusterSnapshot,
    DecodeLoad,
    InstanceState,
    LoadModel,
    MigrationCost,
    NoHealthyInstance,
    OwnRows,
    Policy,
    ReportedRequest,
    assemble_instance,
    build_snapshot,
    get_policy,
    holds,
    new_request,
    place,
)


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
    admission: Admission = field(default_factory=Admission)  # the decode servers' (--reserve-tokens)
    migration_cost: MigrationCost = field(default_factory=MigrationCost)  # what the rebalancing policy weighs
    # The link's profile (--ares-migrate-link): with the KV bytes per token the servers report, it sets
    # `migration_cost` at each refresh; None keeps `migration_cost` as given.
    link: LinkProfile | None = None
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
        if self.link is not None:
            kvb = next((d.load.kv_bytes_per_token for d in self.decodes if d.load and d.load.kv_bytes_per_token), None)
            if kvb is not None and kvb != self.migration_cost.kv_bytes_per_token:
                self.migration_cost = self.link.migration_cost(kvb)
        self.snapshot = build_snapshot(
            instances, self.load_model, self.migration_cost, self.admission, dispatch_count=self.dispatch_count
        )
        self.snapshot_time = now
        return self.snapshot

    def _instance(self, d: Backend) -> InstanceState:
        """The decode server's last report plus this router's bookkeeping of it, through the shared assembler."""
        load = d.load
        d.snapshot_load = load
        tracked = d.tracked
        reported = load.rids if load is not None else ()
        # The router's own rows are only the requests the server does not report: a set difference in C, so the
        # Python loop below runs over the few dispatched-but-not-yet-running requests, not over every request.
        own = tracked.keys() - reported if reported and tracked else tracked.keys()
        if reported and len(own) > 1:
            own = sorted(own, key=lambda rid: tracked[rid].seq)  # few rows; a set's order is not stable
        rows = [tracked[rid] for rid in own]
        running = [t for t in rows if t.started]  # known from the router's own relaying
        pending = [t for t in rows if not t.started]  # prefill, KV transfer or the decode queue

        def max_new(ts: list[Tracked]) -> np.ndarray:
            return np.array([np.nan if t.max_tokens is None else t.max_tokens for t in ts], dtype=np.float64)

        def max_new_of(report_rows: np.ndarray) -> np.ndarray:  # max_tokens of reported rows (NaN: none/unknown)
            rids = [load.rids[k] for k in report_rows.tolist()]
            return np.array(
                [np.nan if (t := tracked.get(r)) is None or t.max_tokens is None else t.max_tokens for r in rids],
                dtype=np.float64,
            )

        own_rows = OwnRows(
            running_ids=tuple(t.rid for t in running),
            running_prompt=np.array([t.prompt_tokens for t in running], dtype=np.float64),
            running_generated=np.array([t.generated for t in running], dtype=np.float64),
            running_max_new=max_new(running),
            pending_ids=tuple(t.rid for t in pending),
            pending_prompt=np.array([t.prompt_tokens for t in pending], dtype=np.float64),
            pending_max_new=max_new(pending),
        )
        return assemble_instance(
            d.name, load, own_rows, self.estimator, self.admission, max_new_of, healthy=d.healthy, url=d.url
        )

    # -- decisions ------------------------------------------------------------------------------------------------
    def choose_decode(self, prompt_tokens: int, max_tokens: int | None, exclude: Iterable[int] = ()) -> int:
        """Index of the decode server for a new request (policy on the current snapshot); the snapshot then counts
        the request as pending there. Raises `NoHealthyInstance`."""
        assert self.snapshot is not None
        request = new_request("", prompt_tokens, max_tokens, self.estimator)
        index, self.snapshot = place(self.snapshot, request, self.policy, self.rng, exclude)
        self.dispatch_count += 1
        return index

    def holds(self, prompt_tokens: int, max_tokens: int | None) -> bool:
        """Whether the policy keeps a new request at the router for now: it holds when full and no healthy decode
        server admits the request on the current snapshot (`ares_router.policy.holds`)."""
        if self.snapshot is None:
            return False
        return holds(self.snapshot, new_request("", prompt_tokens, max_tokens, self.estimator), self.policy)

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
        t = Tracked(rid, decode, prefill, prompt_tokens, max_tokens, seq=next(self._seq))
        self.requests[rid] = t
        self.decodes[decode].tracked[rid] = t
        for b in (self.decodes[decode], self.prefills[prefill]):
            b.inflight += 1
            b.dispatched += 1
        return t

    def move(self, rid: str, decode: int, new_rid: str | None = None) -> None:
        """A migrated request now runs on `decode`, under `new_rid` there when given (the rid its new server
        reports it by); its tokens so far stay counted."""
        t = self.requests.get(rid)
        if t is None:
            return
        self.decodes[t.decode].tracked.pop(rid, None)
        self.decodes[t.decode].inflight -= 1
        if new_rid is not None:
            del self.requests[rid]
            t.rid = rid = new_rid
            self.requests[rid] = t
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
