"""Decode instances: SGLang's continuous batching, advanced event to event rather than token by token.

`_Decode` is one instance's state. Between events its batch is fixed, so the time of k steps is closed-form
(`_Decode.seg_time`; see `cost_model`). `DecodeInstances`, one part of `ClusterSim`, acts at an instance's step
boundaries: finishes, migrations leaving and joining, SGLang's decode queues (retracted requests back first, then
FIFO preallocation by the admission rule, then the requests whose KV arrived), retraction when the next step does
not fit, and the next segment's plan; it accounts every segment's token gaps (`_gap_accounting`).
It asks the servers' admission rule (`decode_admission`), starts prefills (`links`) and hands migrations on
(`migration`); what a step boundary does, in order, is the comment list in `_boundary`.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections import deque

from .events import _STEP
from .request import _Req


class _Decode:
    """One decode instance: its batch, its queues, its KV accounting and the segment it is running."""

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
        """Time of the first `k` steps of the current segment (any stall before them included)."""
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


class DecodeInstances:
    """The decode instances' behaviour, as a part of `ClusterSim` (whose `__init__` builds the state it uses)."""

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
        """`req` joins `inst`'s batch at step boundary `t` with `length` KV tokens and `gen` generated tokens
        (or finishes there, nothing left to decode)."""
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
        """`req` finished at `t` (the router stops tracking it)."""
        req.t_finish = t
        self.col_tracked[req.i] = -1
        req.gen_now = req.out
        self.col_gen_now[req.i] = req.out
        self.finished += 1
        if self.gate is not None:
            self.gate.forget([req.i])  # as the router does when a request ends

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
        """`inst` reached a step boundary at `t`, `k` steps into its segment (0: it was idle): act, then plan the
        next segment."""
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
                self._cancel_migration(req, t, "finished")
        # 2. outgoing migrations leave the batch; their KV stays held until the transfer ends
        if inst.outgoing:
            self._send_migrations(inst, t)
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
                    self._cancel_migration(req, t, "not_running")
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

    def _preallocate(self, inst: _Decode, t: float) -> None:
        """SGLang's `pop_preallocated`: FIFO by the admission rule, the first request that does not fit stops the
        pass; an admitted one holds its prompt's KV from now on, and its prefill can start."""
        while inst.prealloc:
            req = inst.prealloc[0]
            if not self._admits(inst, req.prompt, self.col_max_new[req.i], planned=self._prior(req)):
                break
            inst.prealloc.popleft()
            inst.held += req.prompt
            inst.n_pre += 1
            inst.pre[req.i] = req
            self._start_prefill(req, t)
