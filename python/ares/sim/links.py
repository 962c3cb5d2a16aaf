"""Prefill instances and KV links: where a preallocated request's prefill runs and when each KV transfer ends.

A prefill runs FIFO on the prefill instance free first. With `SimConfig.link_contention` every instance has one
full-duplex NIC: a KV transfer (P->D after prefill, or D->D migration) takes the sender's outgoing and the
receiver's incoming side for its bytes / bandwidth, FIFO from when it is ready (`_transfer`); without it every
transfer has its own link. `Links` is a part of `ClusterSim` (whose `__init__` builds the state it uses).
"""

from __future__ import annotations

import heapq

from .events import _ARRIVE, _PREFILLED
from .request import _Req


class Links:
    """Prefill scheduling and KV transfer timing, as a part of `ClusterSim`."""

    def _start_prefill(self, req: _Req, t: float) -> None:
        """Start `req`'s prefill (its KV was preallocated at `t`) on the prefill instance free first."""
        cost = self.cost
        busy_until, p = heapq.heappop(self.prefill)
        end = max(t, busy_until) + cost.prefill_time(req.prompt)
        heapq.heappush(self.prefill, (end, p))
        if self.cfg.link_contention:  # the transfer asks for the link when its prefill is done
            self._push(end, _PREFILLED, (req, p))
        else:
            self._push(end + cost.transfer_time(req.prompt), _ARRIVE, req)

    def _prefilled(self, t: float, req: _Req, p: int) -> None:
        """`req`'s prefill on prefill instance `p` ended at `t`: book its KV transfer to its decode instance."""
        done = self._transfer(t, self.link_p_out, p, req.inst, req.prompt)
        self._push(done, _ARRIVE, req)

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
