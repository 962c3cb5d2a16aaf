"""Live migration of a running request between two ARES decode servers, driven by the router (`docs/migration.md`).

The router owns the client connection, so it runs the protocol: B attaches R's copy of the request, reserves KV,
pulls A's KV in pre-copy stages while the request keeps decoding on A, then A pauses it, B pulls the last delta and
commits (the request continues on B with the next token), and only then A ends its stream and frees the KV. On any
failure before B's commit the request goes on where it was and B frees what it holds.

`ares_router.splice` turns A's response followed by B's into one for the client.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from ares_router.backends import JSON_HEADERS, bootstrap_fields
from ares_router.protocol import GENERATE
from ares_router.state import Backend
from ares_router.wire import MID_PARAM, MIGRATE_CMD_PATH

log = logging.getLogger("ares_router.migration")

FINALIZE_TRIES = 3  # A ends its stream only when told; a lost `out_finalize` would leave the client waiting on A


@dataclass(frozen=True)
class MigrationLimits:
    """Bounds of one migration."""

    max_stages: int = 6  # pre-copy stages before the pause
    last_stage_tokens: int = 32  # pause once at most this many positions are left to copy
    attach_timeout_s: float = 30.0  # B must have R's request before this (seconds on a loaded CPU machine)
    stage_delay_s: float = 0.0  # wait between stages (tests widen the window in which the request runs on A)


@dataclass
class Migration:
    """One migration's record (also what `POST /ares/migrate` answers)."""

    mid: str
    rid: str  # the request's first backend rid
    source: str
    target: str
    state: str = "starting"  # starting | precopy | paused | committed | failed
    reason: str | None = None
    stages: int = 0
    kv_tokens: int = 0
    bytes: int = 0
    n_output: int = 0  # tokens the request had at the switch (the target continues with token n_output + 1)
    t_start: float = field(default_factory=time.monotonic)
    total_s: float | None = None
    pause_s: float | None = None  # from A's pause to B's commit (no token produced meanwhile)
    from_hop: int = 0  # the hop of the request this move ends (`InFlight.hops` index of the source)
    new_rid: str = field(default_factory=lambda: uuid.uuid4().hex)  # the request's rid on the target
    target_backend: Backend | None = field(default=None, repr=False)
    target_response: asyncio.Task | None = None  # R's request on B: its `aiohttp.ClientResponse`

    def record(self) -> dict:
        """The record as JSON-able fields (`/ares/migrate`'s answer, `/ares/migrations`, the log line)."""
        keys = ("mid", "rid", "source", "target", "state", "reason", "stages", "kv_tokens", "bytes", "n_output")
        out: dict[str, Any] = {k: getattr(self, k) for k in keys}
        out["total_ms"] = None if self.total_s is None else round(self.total_s * 1e3, 2)
        out["pause_ms"] = None if self.pause_s is None else round(self.pause_s * 1e3, 2)
        return out


@dataclass(frozen=True)
class Hop:
    """One stretch of a request's life on one decode server, under the backend rid it has there. Every move gives
    the request a fresh rid on its target (same length, so SGLang's prefix-matching abort still tells them
    apart): a server the request left may still hold a delayed abort of the old rid (SGLang's tokenizer manager
    aborts a finished rid again ~2 s later), which must not hit the request if it comes back."""

    rid: str
    decode: Backend


class OnHops:
    """Where a relayed request runs now, read off its `hops` (the last is the current one): the router's `InFlight`
    and the multi-process brain's `RemoteFlight` (`ares_router.brain`)."""

    hops: list[Hop]

    @property
    def decode(self) -> Backend:
        """The decode server the request runs on now (the latest committed move's target)."""
        return self.hops[-1].decode

    @property
    def backend_rid(self) -> str:
        """The request's rid on the server it runs on now."""
        return self.hops[-1].rid


@dataclass
class InFlight(OnHops):
    """What the router keeps about a request it relays, for migrating it: its body, where it ran and runs, and its
    moves (the relay follows them hop by hop)."""

    rid: str  # the backend rid of the first hop: the request's id towards the client and the router's key for it
    endpoint: str
    body: dict
    stream: bool
    prefill: Backend
    hops: list[Hop]
    moves: list[Migration] = field(default_factory=list)

    @classmethod
    def create(cls, rid: str, endpoint: str, body: dict, stream: bool, prefill: Backend, decode: Backend) -> InFlight:
        """A request just dispatched to `decode` under `rid`."""
        return cls(rid, endpoint, body, stream, prefill, [Hop(rid, decode)])

    def pending(self, hop: int | None = None) -> Migration | None:
        """The move of the request from hop `hop` (default: the current one) that has not failed, if any: a move
        in progress, or (for an earlier hop) the one that ended it."""
        hop = len(self.hops) - 1 if hop is None else hop
        for m in reversed(self.moves):
            if m.from_hop == hop and m.state != "failed":
                return m
        return None

    def committed_from(self, hop: int, mid: str | None = None) -> Migration | None:
        """The committed move that ended hop `hop` (and has id `mid`, when given)."""
        m = self.pending(hop)
        if m is None or m.state != "committed" or (mid is not None and m.mid != mid):
            return None
        return m

    def placements(self) -> list[tuple[str, Backend]]:
        """Every (rid, decode server) pair that may hold the request now: its hops (a server it left may still be
        ending it) and a move's target that has not committed yet."""
        out = [(h.rid, h.decode) for h in self.hops]
        m = self.pending()
        if m is not None and m.state != "committed":
            out.append((m.new_rid, m.target_backend))
        return out


class MigrationFailed(Exception):
    """A command was refused or failed; `reason` says which and why. `refused`: the server answered that it did
    not do it (4xx); otherwise (no answer, 5xx) whether it acted is not known."""

    def __init__(self, reason: str, refused: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.refused = refused


# A connection that broke without an answer (a command may be tried once more); a refused connect is one of them.
_BROKEN = (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)


@dataclass(frozen=True)
class Commands:
    """Sends migration commands to the decode servers over the router's pool, with the servers' admin key (their
    command endpoint is an SGLang admin endpoint: `ares.engine.http_routes`)."""

    session: aiohttp.ClientSession
    headers: dict = field(default_factory=dict)  # e.g. {"Authorization": "Bearer <the servers' admin key>"}
    # Fault injection for tests (`--ares-test-lose-reply`): these commands act on the server, but their answers are
    # dropped as if the connection broke after the server acted.
    lose_replies: frozenset[str] = frozenset()

    async def __call__(self, server: Backend, msg: dict, timeout_s: float = 120.0) -> dict:
        """One command to `server`; its answer, or MigrationFailed naming the server and reason.

        A connection that breaks before any answer (reset, closed by the server) is tried once more on a fresh
        one: the pool reuses idle connections that SGLang's server (uvicorn, 5 s keep-alive) may be closing just
        then, and a server resumed after a stop closes the connections it held idle, with the command unread.
        Every command is safe to repeat: the agent answers a repeated state-changing command once (by migration
        id and command), and the others only read or copy the same positions again."""
        for attempt in range(2):
            try:
                async with self.session.post(
                    server.url + MIGRATE_CMD_PATH, data=orjson.dumps(msg), headers={**JSON_HEADERS, **self.headers},
                    timeout=aiohttp.ClientTimeout(total=timeout_s),
                ) as resp:  # fmt: skip
                    body = await resp.read()
                break
            except _BROKEN as e:
                if attempt or isinstance(e, aiohttp.ClientConnectorError):  # refused: the server is down
                    raise MigrationFailed(f"{server.name} unreachable: {type(e).__name__}") from None
                log.info("%s %s: connection broke before an answer (%r); trying once more", server.name, msg["cmd"], e)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                raise MigrationFailed(f"{server.name} unreachable: {type(e).__name__}") from None
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise MigrationFailed(f"{server.name} answered HTTP {resp.status}: {body[:200]!r}") from None
        if resp.status != 200:
            reason = answer.get("reason") or answer.get("message") or answer.get("error") or f"HTTP {resp.status}"
            raise MigrationFailed(f"{server.name} {msg['cmd']}: HTTP {resp.status} {reason}", resp.status < 500)
        if msg["cmd"] in self.lose_replies:
            raise MigrationFailed(f"{server.name} {msg['cmd']}: reply lost (injected)")
        return answer


async def run_migration(
    cmds: Commands,
    flight: InFlight,
    target: Backend,
    limits: MigrationLimits,
    m: Migration,
    on_commit: Callable[[Migration], None] | None = None,
) -> None:
    """Move `flight` from its decode server to `target`; on return `m.state` is `committed` or `failed`. At B's
    commit (before A is told to end its stream) the request gains its new hop and `on_commit` runs: from then on
    it runs on B, whatever happens to A's stream."""
    source, source_rid = flight.decode, flight.backend_rid
    mid = m.mid
    m.from_hop, m.target_backend = len(flight.hops) - 1, target
    paused = False
    try:
        begin = await cmds(source, {"cmd": "out_begin", "mid": mid, "rid": source_rid, "endpoint": flight.endpoint})
        layout = begin["layout"]
        m.state = "precopy"
        # R's request on B: the client's body under the request's new rid, and the migration id; bootstrap fields
        # name the original prefill with a fresh room, so should B ever not attach it, it fails instead of decoding
        # garbage.
        body = {**flight.body, **bootstrap_fields(flight.prefill, _rng), "rid": m.new_rid}
        if flight.endpoint == GENERATE:
            params = dict(body.get("sampling_params") or {})
            params["custom_params"] = {**(params.get("custom_params") or {}), MID_PARAM: mid}
            body["sampling_params"] = params
        else:  # the OpenAI requests' own `custom_params` end up in the sampling params
            body["custom_params"] = {**(body.get("custom_params") or {}), MID_PARAM: mid}
        m.target_response = asyncio.create_task(
            cmds.session.post(target.url + flight.endpoint, data=orjson.dumps(body), headers=JSON_HEADERS)
        )
        reserve = {
            "cmd": "in_reserve", "mid": mid, "prompt_digest": begin["prompt_digest"],
            "output_ids": begin["output_ids"], "layout": layout,
        }  # fmt: skip
        deadline = time.monotonic() + limits.attach_timeout_s
        while True:
            try:
                await cmds(target, reserve)
                break
            except MigrationFailed as e:
                if "not_attached" not in e.reason or time.monotonic() > deadline:
                    raise
                if m.target_response.done() and (failed := _attach_failure(m.target_response)):
                    # R's request to B broke (e.g. a connection B closed when it resumed after a stop): it will
                    # never attach, so fail now instead of waiting out the attach timeout.
                    raise MigrationFailed(f"{target.name} never got the request: {failed}") from None
                await asyncio.sleep(0.02)
        sent = 0
        ps = int(layout["page_size"])
        for _ in range(limits.max_stages):
            slots = await cmds(source, {"cmd": "out_slots", "mid": mid, "start": sent})
            written = slots["written"]
            end = max(sent, written // ps * ps)  # complete pages only: the page being written goes later
            if end > sent:
                pull = {"cmd": "in_pull", "mid": mid, "start": sent, "end": end, "slots": slots["slots"][: end - sent]}
                m.bytes += (await cmds(target, pull))["bytes"]
                m.stages += 1
                sent = end
            if written - sent <= limits.last_stage_tokens:
                break
            if limits.stage_delay_s:
                await asyncio.sleep(limits.stage_delay_s)
        t_pause = time.monotonic()
        final = await cmds(source, {"cmd": "out_pause", "mid": mid, "start": sent})
        paused = True
        m.state = "paused"
        commit = {
            "cmd": "in_commit", "mid": mid, "output_ids": final["output_ids"], "start": sent,
            "end": final["written"], "slots": final["slots"],
        }  # fmt: skip
        try:
            committed = await cmds(target, commit)
            m.bytes += committed["last_stage"]["bytes"]
        except MigrationFailed as e:
            if e.refused or not await _resolve_commit(cmds, target, m, e.reason):
                raise
        m.stages += 1
        m.kv_tokens, m.n_output = final["written"], len(final["output_ids"])
        # Before A's stream ends (A ends it only when told, below): the relay must find the move committed and the
        # request's new hop in place when it reads A's last event.
        m.state = "committed"
        flight.hops.append(Hop(m.new_rid, target))
        if on_commit is not None:
            on_commit(m)
        m.pause_s = time.monotonic() - t_pause
    except MigrationFailed as e:
        m.state, m.reason = "failed", e.reason
        log.warning("migration %s of %s %s -> %s failed: %s", mid, flight.rid, source.name, target.name, e.reason)
        await _undo(cmds, source, target, m, paused)
    except BaseException:
        if m.state != "committed":
            m.state, m.reason = "failed", "cancelled"
            await asyncio.shield(_undo(cmds, source, target, m, paused))
        raise
    finally:
        m.total_s = time.monotonic() - m.t_start
    if m.state == "committed":
        await _finalize(cmds, source, m)


def _attach_failure(task: asyncio.Task) -> str | None:
    """Why R's request to the target (a finished task) failed, or None if it got a response."""
    if task.cancelled():
        return "cancelled"
    e = task.exception()
    return None if e is None else f"{type(e).__name__}: {e}"[:200]


async def _resolve_commit(cmds: Commands, target: Backend, m: Migration, why: str) -> bool:
    """B's answer to the commit was lost (no reply, or a 5xx): ask B. Its `in_abort` runs in B's tick, after any
    commit still under way there, and is decisive: either B had committed (it says so and keeps the request) or
    it frees what it holds and never commits later (a timed-out command is cancelled, never applied late). B not
    answering counts as not committed: R then drops its connection to B, which makes B's tokenizer abort B's
    copy should B wake up with one. So exactly one server runs the request."""
    try:
        answer = await cmds(target, {"cmd": "in_abort", "mid": m.mid, "reason": f"commit unresolved: {why}"}, 30.0)
    except MigrationFailed as e:
        log.warning("migration %s: commit unresolved (%s); %s did not answer either: %s", m.mid, why, m.target, e)
        return False
    log.warning("migration %s: commit reply lost (%s); %s says %s", m.mid, why, m.target, answer.get("state"))
    return answer.get("state") == "committed"


async def _finalize(cmds: Commands, source: Backend, m: Migration) -> None:
    """After B's commit: A ends its stream (with the migrated finish) and frees the request. The move stays
    committed whatever happens here (B runs the request now); a finalize that keeps failing is logged, and A's
    stream then ends when A does."""
    for attempt in range(FINALIZE_TRIES):
        try:
            await cmds(source, {"cmd": "out_finalize", "mid": m.mid}, timeout_s=30.0)
            return
        except MigrationFailed as e:
            if "unknown_migration" in e.reason:
                return  # already finalized (an earlier try whose answer was lost)
            log.warning("migration %s: out_finalize try %d failed: %s", m.mid, attempt + 1, e.reason)
            m.reason = f"finalize: {e.reason}"
            await asyncio.sleep(0.2 * (attempt + 1))


async def _undo(cmds: Commands, source: Backend, target: Backend, m: Migration, paused: bool) -> None:
    """Before B's commit: B frees what it holds and ends R's request there; the request goes on on A."""
    for server, cmd in ((target, "in_abort"), (source, "out_resume")):
        try:
            await cmds(server, {"cmd": cmd, "mid": m.mid, "reason": m.reason}, timeout_s=30.0)
        except MigrationFailed as e:
            log.warning("migration %s: %s failed too: %s", m.mid, cmd, e.reason)
    if m.target_response is not None:
        m.target_response.cancel()


_rng = random.Random()


def new_mid() -> str:
    """A migration id."""
    return uuid.uuid4().hex
