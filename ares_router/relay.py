"""Relaying one request's answer to its client across every server the request runs on.

A request may move any number of times (A -> B -> C -> A ...). The relay is one loop over the request's hops
(`InFlight.hops`): it reads the current hop's stream until the hop ends, either for good (the answer is complete)
or gracefully because the request moved on (`ares_router.splice` recognises that end, the committed move from
that hop confirms it and names the next hop's response), then goes on with the next hop's stream.

Fast path: while no move of the request from the hop being relayed is pending (nor the internal end message in
sight), the first hop's bytes go to the client as they come, cut only at event boundaries (`rfind` on the bytes),
never parsed: a request that never moves costs what a plain byte relay costs. Once a move is pending, events are
parsed one by one, so that the hop can end at a token boundary.
"""

from __future__ import annotations

import aiohttp
import orjson
from aiohttp import web

from ares_router.migration import InFlight, Migration
from ares_router.protocol import GENERATE, APIError
from ares_router.splice import Splicer
from ares_router.state import Tracked
from ares_router.wire import MIGRATED_PREFIX

SSE = b"data:"
SSE_DONE = b"data: [DONE]"
_EVENT_END = b"\n\n"
_INTERNAL = MIGRATED_PREFIX.encode()


class HopFailed(Exception):
    """The next hop of a moved request cannot be relayed (its server refused or lost the request), or a hop ended
    with the internal finish without a committed move behind it."""


def count_events(chunk: bytes) -> int:
    """Server-sent events in `chunk` that carry output (one per decode step with SGLang's stream_interval=1)."""
    return chunk.count(SSE) - chunk.count(SSE_DONE)


def completion_tokens(obj: object) -> int | None:
    """Output tokens an SGLang answer (or one stream event) states: OpenAI `usage.completion_tokens`, or
    `/generate`'s `meta_info.completion_tokens`."""
    if not isinstance(obj, dict):
        return None
    for key in ("usage", "meta_info"):
        part = obj.get(key)
        if isinstance(part, dict) and isinstance(part.get("completion_tokens"), int):
            return part["completion_tokens"]
    return None


def last_event_tokens(tail: bytes) -> int | None:
    """`completion_tokens` of the last JSON event in the end of a stream (`[DONE]` skipped)."""
    for event in reversed(tail.split(_EVENT_END)):
        event = event.strip()
        if not event.startswith(SSE) or event == SSE_DONE:
            continue
        try:
            return completion_tokens(orjson.loads(event[len(SSE) :]))
        except orjson.JSONDecodeError:
            return None  # cut off at a chunk boundary: no exact count
    return None


def _event_json(event: bytes) -> tuple[dict, bytes] | None:
    """The JSON object of a `data:` event and its raw JSON bytes; None for `[DONE]` and anything else."""
    if not event.startswith(SSE) or event.startswith(SSE_DONE):
        return None
    raw = event[len(SSE) :].strip()
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return (obj, raw) if isinstance(obj, dict) else None


class StreamRelay:
    """Relays one streaming request to its client (`resp`, already prepared) across all of its hops."""

    def __init__(self, flight: InFlight, resp: web.StreamResponse, tracked: Tracked, splicer: Splicer | None):
        self.flight = flight
        self.resp = resp
        self.tracked = tracked
        self.splicer = splicer  # None: the request cannot move, its bytes pass through
        self._may_carry_internal = flight.endpoint == GENERATE
        self.prev = b""  # the last two pieces written: the stream's end, for its final usage/meta_info
        self.last = b""
        self.responses: list[aiohttp.ClientResponse] = []  # every hop's response, closed at the end

    async def run(self, first: bytes, response: aiohttp.ClientResponse) -> None:
        """Relay hop after hop until the request's answer is complete. Raises aiohttp's errors when a server's
        stream breaks and `HopFailed` when a next hop cannot be relayed: bytes have reached the client by then."""
        hop = 0
        self.responses.append(response)
        while True:
            moved = await self._hop(first, response, hop)
            if moved is None:
                return
            assert moved.target_response is not None  # a committed move has its target's response
            try:
                response = await moved.target_response
            except (aiohttp.ClientError, OSError) as e:
                raise HopFailed(f"the request moved to {moved.target} but its stream there failed: {e!r}") from None
            self.responses.append(response)
            if response.status != 200:
                body = (await response.read())[:300].decode(errors="replace")
                raise HopFailed(f"the request moved to {moved.target}, which answered {response.status}: {body}")
            first, hop = b"", hop + 1

    def close(self) -> None:
        """Close every hop's response (also when the client went away)."""
        for r in self.responses:
            r.close()

    async def _write(self, piece: bytes) -> None:
        self.tracked.generated += count_events(piece)
        self.prev, self.last = self.last, piece
        await self.resp.write(piece)

    def _parse(self, buf: bytes, hop: int) -> bool:
        """Whether events of `hop` must be parsed now: a later hop (rewritten), a pending move, or the internal end
        message in the bytes (it must never pass through; only `/generate` events can carry it)."""
        if hop or (self.flight.moves and self.flight.pending(hop) is not None):
            return True
        return self._may_carry_internal and _INTERNAL in buf

    async def _hop(self, buf: bytes, response: aiohttp.ClientResponse, hop: int) -> Migration | None:
        """Relay one hop's stream; the committed move that ended it, or None when the answer is complete."""
        parse = False
        read = response.content.readany
        while True:
            if self.splicer is None:
                if buf:
                    await self._write(buf)
                    buf = b""
            else:
                # Both modes leave only a partial event in `buf`, so the mode may change at every chunk (back to
                # bytes once a pending move failed).
                parse = self._parse(buf, hop)
                if parse:
                    while (i := buf.find(_EVENT_END)) >= 0:
                        event, buf = buf[: i + 2], buf[i + 2 :]
                        moved = await self._event(event, hop)
                        if moved is not None:
                            return moved  # the rest of this hop (usage, [DONE]): the last hop's end the stream
                elif buf.endswith(_EVENT_END):  # the usual chunk: whole events, passed on without a copy
                    await self._write(buf)
                    buf = b""
                elif (i := buf.rfind(_EVENT_END)) >= 0:
                    await self._write(buf[: i + 2])
                    buf = buf[i + 2 :]
            chunk = await read()
            if not chunk:
                if buf.strip():
                    if parse and self.splicer is not None:
                        return await self._event(buf, hop)
                    await self._write(buf)
                return None
            buf = buf + chunk if buf else chunk

    async def _event(self, event: bytes, hop: int) -> Migration | None:
        """One complete event of `hop`, through the splicer; the move that ends the hop if this event ends it."""
        assert self.splicer is not None
        parsed = _event_json(event)
        if parsed is None:  # `[DONE]` of the last hop, comments, anything that is not a JSON event
            await self._write(event)
            return None
        obj, raw = parsed
        splicer = self.splicer
        if splicer.ends_hop(obj):
            m = self.flight.committed_from(hop, splicer.migration_id(obj))
            if m is not None:
                out = splicer.end_hop(obj)
                if out is not None:
                    await self._write(b"data: " + out + b"\n\n")
                return m
            if splicer.is_internal(obj):
                raise HopFailed("a server ended the request for a move the router does not know as committed")
        out = splicer.event(obj, raw)
        if out is not None:
            await self._write(event if out is raw else b"data: " + out + b"\n\n")
        return None


async def joined_answer(flight: InFlight, splicer: Splicer, first: bytes) -> tuple[int, bytes]:
    """A non-streaming answer of a request that moved: every hop's answer joined (status and body). A hop's answer
    that is not a moved request's end is the last one; a next hop that fails gives its own answer (or a 502)."""
    body = first
    parts: list[dict] = []
    hop = 0
    while True:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            if not parts:
                return 200, body
            return 502, _error_body(flight.endpoint, f"hop {hop} of the moved request answered no JSON: {body[:200]!r}")
        parts.append(obj)
        m = flight.committed_from(hop, splicer.migration_id(obj)) if splicer.ends_hop(obj) else None
        if m is None:
            if splicer.is_internal(obj):
                return 502, _error_body(
                    flight.endpoint, "a server ended the request for a move the router does not know as committed"
                )
            break
        assert m.target_response is not None
        try:
            async with await m.target_response as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError) as e:
            return 502, _error_body(
                flight.endpoint, f"the request moved to {m.target} but its answer there failed: {e!r}"
            )
        if status != 200:
            return status, body
        hop += 1
    if len(parts) == 1:
        return 200, first  # never moved: the server's bytes, unchanged
    return 200, orjson.dumps(splicer.answer(parts))


def _error_body(endpoint: str, message: str) -> bytes:
    return APIError(502, message).body(endpoint)
