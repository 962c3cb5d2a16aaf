"""Migration control: `POST /ares/migrate` (an operator's move), the rebalancing loop (the policy's proposals
through `RebalanceGate`), recording every move, and aborting a request on every server that may hold it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import orjson
from aiohttp import web

from ares_router.admin import json_response
from ares_router.backends import PDClient
from ares_router.config import RouterConfig
from ares_router.metrics import RouterMetrics
from ares_router.migration import Commands, InFlight, Migration, MigrationLimits, new_mid, run_migration
from ares_router.policy import Migration as PolicyMigration
from ares_router.policy import NewRequest, plan_rebalance
from ares_router.policy.gate import RebalanceGate
from ares_router.protocol import APIError
from ares_router.state import Backend, RouterState
from ares_router.wire import not_migratable

log = logging.getLogger("ares_router")


class MigrationControl:
    """The migration endpoints and loop of `app.Router` (a part of it: the attributes below are the router's)."""

    config: RouterConfig
    state: RouterState
    metrics: RouterMetrics
    client: PDClient | None
    inflight: dict[str, InFlight]
    hop_rids: dict[str, str]
    client_rids: dict[str, str]
    gate: RebalanceGate
    migration_log: list[dict]
    migration_limits: MigrationLimits
    _migration_tasks: set[asyncio.Task]
    held_longest: Callable[[], NewRequest | None]

    async def migrate(self, request: web.Request) -> web.Response:
        """`POST /ares/migrate {"rid", "to"}`: move a running request to another decode server now; answers the
        migration's record (200 committed, 409 failed or refused: the request goes on where it was)."""
        assert self.client is not None
        try:
            body = orjson.loads(await request.read())
            rid, to = str(body["rid"]), body["to"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise APIError(400, 'body must be JSON {"rid": <request id>, "to": <decode name, index or URL>}') from None
        flight = self._flight_of(rid)
        if flight is None:
            raise APIError(404, f"no request {rid!r} is running through this router")
        target = self._decode_named(to)
        why = self._why_not_migratable(flight)
        if why is not None:
            raise APIError(409, f"request {rid!r} cannot migrate: {why}")
        if target is flight.decode:
            raise APIError(409, f"request {rid!r} already runs on {target.name}")
        current = flight.pending()
        if current is not None:
            raise APIError(409, f"request {rid!r} is already migrating ({current.mid})")
        m = await self._migrate(flight, target)
        return json_response(m.record(), status=200 if m.state == "committed" else 409)

    @staticmethod
    def _why_not_migratable(flight: InFlight) -> str | None:
        """Why the relayed request cannot move, or None (`wire.not_migratable` of its endpoint and body)."""
        return not_migratable(flight.endpoint, flight.body)

    def _flight_of(self, rid: str) -> InFlight | None:
        """The relayed request `rid` names: a backend rid of any of its hops, or the client's request id."""
        first = self.hop_rids.get(rid) or self.client_rids.get(rid)
        return None if first is None else self.inflight.get(first)

    async def _migrate(self, flight: InFlight, target: Backend) -> Migration:
        """Run one migration of `flight` to `target` and record it (in the request's moves from its start, so
        the relay can find the move that ends the hop it reads)."""
        assert self.client is not None
        m = Migration(new_mid(), flight.rid, flight.decode.name, target.name)
        flight.moves.append(m)
        old_rid = flight.backend_rid

        def committed(m: Migration) -> None:
            # The request now runs on the target under its new rid: the snapshot and the policy's proposals name
            # it by that rid from here on.
            self.hop_rids[m.new_rid] = flight.rid
            self.state.move(old_rid, target.index, new_rid=m.new_rid)

        cmds = Commands(self.client.session, self.config.backend_headers, frozenset(self.config.test_lose_replies))
        await run_migration(cmds, flight, target, self.migration_limits, m, on_commit=committed)
        record = m.record()
        log.info("migration %s", " ".join(f"{k}={v}" for k, v in record.items()))
        self.migration_log = [*self.migration_log[-255:], record]
        self.metrics.observe_migration(record)
        return m

    async def _rebalance_loop(self) -> None:
        """Every `--ares-rebalance-interval`: the policy's proposals for the current snapshot, through the gate."""
        while True:
            await asyncio.sleep(self.config.rebalance_interval_s)
            try:
                policy = self.config.rebalance_policy or self.state.policy
                proposed = plan_rebalance(self.state.snapshot, policy, self.held_longest())  # held: defragmenting
                decodes = self.state.decodes
                eligible = [rid for rid, f in self.inflight.items() if self._why_not_migratable(f) is None]
                # The policy names a request by its rid on the server it runs on now; the gate keeps its history
                # (moves, cooldown) under the request's first rid, which does not change with its moves.
                proposed = [
                    replace(pm, request_id=self.hop_rids.get(str(pm.request_id), pm.request_id)) for pm in proposed
                ]
                for pm in self.gate.choose(proposed, eligible, time.monotonic()):
                    flight = self.inflight.get(str(pm.request_id))
                    if flight is None or flight.decode.index != pm.source or flight.pending() is not None:
                        # Gone, moved or moving since the snapshot: the request's business, not the pair's.
                        self.gate.done(pm, committed=False, now=time.monotonic(), reason="not_running")
                        continue
                    task = asyncio.create_task(self._rebalance_one(pm, flight, decodes[pm.target]))
                    self._migration_tasks.add(task)  # a reference until it ends (asyncio keeps weak ones)
                    task.add_done_callback(self._migration_tasks.discard)
                self.metrics.rebalance_rounds.inc()
            except Exception:  # noqa: BLE001 - one bad round must not end rebalancing
                log.exception("rebalance round failed")

    async def _rebalance_one(self, pm: PolicyMigration, flight: InFlight, target: Backend) -> None:
        if flight.pending() is not None:  # an `/ares/migrate` call started a move of it since the round chose it
            self.gate.done(pm, committed=False, now=time.monotonic(), reason="not_running")
            return
        try:
            m = await self._migrate(flight, target)
            committed, reason = m.state == "committed", m.reason
        except Exception as e:  # noqa: BLE001
            log.exception("rebalance migration of %s failed", flight.rid)
            committed, reason = False, repr(e)
        self.gate.done(pm, committed, time.monotonic(), reason)

    def _abort_everywhere(self, flight: InFlight) -> None:
        """Abort the request on every server that may hold it: the prefill, each hop's server under that hop's rid
        (a server it left ignores it), a move's target under the rid it has there."""
        assert self.client is not None
        self.client.abort(flight.rid, [flight.prefill])
        for rid, server in flight.placements():
            self.client.abort(rid, [server])

    def _decode_named(self, to: object) -> Backend:
        for d in self.state.decodes:
            if to in (d.name, d.url, d.index, str(d.index)):
                return d
        raise APIError(400, f"unknown decode server {to!r}: give its name, index or URL")

    async def migrations_list(self, request: web.Request) -> web.Response:
        """`GET /ares/migrations`: the last 256 migration records, and where every relayed request runs now."""
        return json_response(
            {"migrations": self.migration_log, "requests": flight_rows(self.client_rids, self.inflight)}
        )


def flight_rows(client_rids: dict[str, str], inflight: dict[str, InFlight]) -> list[dict]:
    """One row per request the router relays: the client's request id, its first and current backend rid, the
    servers it ran on (in order, the last is where it runs now) and the id of a move not committed yet (None when
    none). Operators find a request's server here; the chaos benchmark knows what a crash hit."""
    rows = []
    for request_id, first in list(client_rids.items()):
        flight = inflight.get(first)
        if flight is None:
            continue
        moving = flight.pending()
        rows.append({
            "request_id": request_id, "rid": flight.rid, "backend_rid": flight.backend_rid,
            "decode": flight.decode.name, "hops": [h.decode.name for h in flight.hops],
            "moving": None if moving is None or moving.state == "committed" else moving.mid,
            "moving_to": None if moving is None or moving.state == "committed" else moving.target,
        })  # fmt: skip
    return rows
