"""The router's view: what a live router would see and decide, asked of the same policy functions.

Every `SimConfig.poll_interval_s` (`_poll`) the decode instances report what their `/ares/state` would say
(`_reports`) and the snapshot is built from those reports plus the router's bookkeeping of what it dispatched, through
the shared assembler and estimator (`_build_snapshot`); every `rebalance_every` polls the policy's rebalancer plans
migrations, which start as far as the router's migration gate lets them (`SimConfig.gate`). An arriving request is
placed by the policy on the snapshot that counts what was sent since (`_dispatch`), or, for a policy that holds when
full, kept at the router while no instance admits it and released after a poll (`_release_held`).
`RouterView` is a part of `ClusterSim` (whose `__init__` builds the state it uses).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import replace

import numpy as np

from ares_router.policy import (
    NO_OWN_ROWS,
    ClusterSnapshot,
    DecodeLoad,
    InstanceState,
    NewRequest,
    OwnRows,
    assemble_instance,
    build_snapshot,
    holds,
    new_request,
    place,
    plan_rebalance,
)

from .events import _POLL
from .request import _Req


class RouterView:
    """Snapshots, dispatch, holding and rebalancing as the router does them, as a part of `ClusterSim`."""

    def _arrive(self, t: float, req: _Req) -> None:
        """`req` arrives at the router at `t`: dispatch it now, or hold it (`Policy.hold_when_full`)."""
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

    def _new(self, req: _Req) -> NewRequest:
        """`req` as the router sees it arriving: prompt, max_tokens and the shared estimator's guess."""
        m = self.col_max_new[req.i]
        new = new_request(req.i, req.prompt, None if math.isnan(m) else int(m), self.estimator)
        if self.needs_truth:  # the true-length policy is told every output length (a simulator-only reference)
            new = replace(new, predicted_output=float(req.out - 1))
        return new

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
        # Python ints for the per-instance loop (numpy scalar indexing there costs more than the slicing itself)
        edges = np.searchsorted(owner, np.arange(D + 1)).tolist()
        used_of = used.tolist()
        ids = run.tolist()
        loads = []
        for j, inst in enumerate(self.decode):
            a, b = edges[j], edges[j + 1]
            loads.append(
                DecodeLoad(
                    inst.cap,
                    used_of[j],
                    b - a,
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
        """The router polls at `t`: new snapshot, held requests released, KV recorded, maybe rebalancing."""
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
            # the request held longest, for a policy that defragments (as the router passes its own)
            held = self._new(self.held[0]) if self.held and self.policy.defragmenter is not None else None
            proposed = plan_rebalance(snap, self.policy, held)
            if self.gate is None:
                for m in proposed:
                    self._start_migration(t, m.request_id, m.source, m.target)
            else:
                # As the router's rebalance loop: the proposals through the gate (every running request is
                # eligible: the simulator relays and can move all of them); each started move's end feeds `done`.
                for m in self.gate.choose(proposed, [m.request_id for m in proposed], t):
                    self.gated[m.request_id] = m
                    self._start_migration(t, m.request_id, m.source, m.target)
        if self.finished < len(self.reqs):
            self._push(t + self.cfg.poll_interval_s, _POLL, None)
