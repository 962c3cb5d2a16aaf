"""Live migration of a running request from one decode instance to another.

The policy's rebalancer asks for it (`router_view`); the target admits it by the servers' rule as a request whose
prompt is its KV (`_start_migration`) and reserves that KV. The request leaves the source batch at the source's
next step boundary (`_send_migrations`); after setup + KV bytes / link bandwidth (`links`) + pause it joins the
target's batch at the target's next boundary (`_migrated`). One that finishes or is retracted before it leaves
gives the reservation back (`_cancel_migration`). `Migration` is a part of `ClusterSim` (whose `__init__` builds
the state it uses).
"""

from __future__ import annotations

import math

from .decode import _Decode
from .events import _MIGRATED
from .request import _Req


class Migration:
    """The migration protocol and its KV bookkeeping, as a part of `ClusterSim`."""

    def _start_migration(self, t: float, rid, src_idx: int, dst_idx: int) -> None:
        """The rebalancer asks at `t` to move running request `rid` from `src_idx` to `dst_idx`: reserve its KV
        on the target if the target admits it, else count a rejection."""
        src, dst = self.decode[src_idx], self.decode[dst_idx]
        req = src.running.get(rid)
        if req is None or req.migrate_to >= 0 or src_idx == dst_idx:
            self.migrations_rejected += 1
            self._gate_done(rid, False, t, "not_running")  # gone or moving since the snapshot: the request's reason
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
            self._gate_done(rid, False, t, "no_memory")  # the target's rejection: the gate backs the pair off
            return
        dst.held += est
        req.reserved = est
        req.migrate_to = dst_idx
        src.outgoing.append(rid)
        self._wake(src, t)
        self._wake(dst, t)  # its segment was planned without this reservation (KV exhaustion)

    def _migrated(self, t: float, req: _Req, src_idx: int, length: int) -> None:
        """`req`'s transfer of `length` KV tokens from `src_idx` is over at `t`: it joins the target."""
        src = self.decode[src_idx]
        src.held -= length
        dst = self.decode[req.migrate_to]
        dst.incoming.append((req, length))
        self.col_tracked[req.i] = dst.idx  # committed: the router now counts it on the target
        self._gate_done(req.i, True, t)
        self._wake(dst, t)
        self._wake(src, t)  # freed KV may admit queued requests

    def _send_migrations(self, inst: _Decode, t: float) -> None:
        """At `inst`'s step boundary `t`, its outgoing migrations leave the batch; their KV stays held on both sides
        until the transfer ends (`_migrated`)."""
        cost = self.cost
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

    def _cancel_migration(self, req: _Req, t: float, reason: str) -> None:
        """`req` left its batch at `t` (`reason`: finished, or retracted: not running) before its migration started:
        the target's reservation goes."""
        self.decode[req.migrate_to].held -= req.reserved
        req.migrate_to = -1
        self._gate_done(req.i, False, t, reason)

    def _gate_done(self, rid, committed: bool, t: float, reason: str | None = None) -> None:
        """A move the gate started ended at `t` (`RebalanceGate.done`, as the router reports a migration's end)."""
        if self.gate is None:
            return
        m = self.gated.pop(rid, None)
        if m is not None:
            self.gate.done(m, committed, t, reason)
