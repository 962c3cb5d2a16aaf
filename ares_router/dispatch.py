"""Serving one generation request: model check, late binding (hold), choosing the (prefill, decode) pair,
retries before the first token, handing the answer to the relay, and cleaning up (aborts on client disconnect).

Every request gets an id (the client's `X-Request-Id` or body `rid` when it is short and plain, else a fresh
32-hex one) that appears in every log line about the request and comes back in the `X-Request-Id` response
header. The backends get a router-made `rid` of fixed length (the request id itself when the router made it),
because SGLang's abort matches rids by prefix; a request that moves gets a fresh one on each server it moves to.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web

from ares_router.backends import BackendAnswer, BackendFailure, DecodeStart, PDClient, PrefillRejected, bootstrap_fields
from ares_router.config import RouterConfig
from ares_router.held import HeldQueue
from ares_router.metrics import RouterMetrics
from ares_router.migration import InFlight
from ares_router.policy import HoldRelease, NewRequest, NoHealthyInstance, new_request
from ares_router.policy.gate import RebalanceGate
from ares_router.poller import Poller
from ares_router.protocol import GENERATE, APIError, ParsedRequest, check_model, parse_request
from ares_router.relay import SSE_DONE, HopFailed, StreamRelay, completion_tokens, joined_answer, last_event_tokens
from ares_router.splice import Splicer
from ares_router.state import Backend, RouterState
from ares_router.wire import not_migratable

log = logging.getLogger("ares_router")

_RID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# What a client going away looks like while the router waits on a backend or writes to the client.
_CLIENT_GONE = (asyncio.CancelledError, ConnectionResetError, aiohttp.ClientConnectionResetError)
# Events of an OpenAI stream that carry no token: SGLang's chat stream opens with a role-only delta and closes with
# a finish_reason-only chunk (serving_chat.py); completions put the finish reason on the last token's event.
_NON_TOKEN_EVENTS = {"/v1/chat/completions": 2, "/v1/completions": 0, GENERATE: 0}
# A request header naming a decode server (name, index or URL) places the request there, whatever the policy says:
# for operators and for tests that need one instance overloaded. Responses name where it went in the same header.
PIN_HEADER = "X-Ares-Decode"
MODELS_MISS_REFRESH_S = 1.0  # at most one model-list refresh per second for requests naming an unknown model
# Per-request values the middleware sets: the request's id, and whether the router made it (typed keys where aiohttp
# has them, >= 3.12; plain strings before).
_KEY = getattr(web, "RequestKey", None)
RID = _KEY("rid", str) if _KEY else "rid"
RID_IS_OURS = _KEY("rid_is_ours", bool) if _KEY else "rid_is_ours"


class Dispatch:
    """The generation endpoints of `app.Router` (a part of it: the attributes below are the router's)."""

    config: RouterConfig
    state: RouterState
    metrics: RouterMetrics
    poller: Poller
    client: PDClient | None
    inflight: dict[str, InFlight]
    hop_rids: dict[str, str]
    client_rids: dict[str, str]
    gate: RebalanceGate
    _models_asked: float
    _decode_named: Callable[[object], Backend]
    _abort_everywhere: Callable[[InFlight], None]

    @staticmethod
    def _usable_id(rid: str) -> bool:
        """A client-chosen id is kept (headers, logs) when it is short and plain; it never reaches the backends."""
        return bool(_RID_OK.match(rid))

    def _generation_handler(self, endpoint: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            t0 = time.perf_counter()
            parsed = parse_request(endpoint, await request.read())
            body_rid = parsed.body.get("rid")
            if "X-Request-Id" not in request.headers and body_rid and self._usable_id(body_rid):
                request[RID] = body_rid  # SGLang clients name their requests in the body
                request[RID_IS_OURS] = False
            if parsed.body.get("model") is not None:
                await self._check_model(parsed)
            pin = request.headers.get(PIN_HEADER)
            pinned = self._decode_named(pin) if pin else None
            resp = await self._serve(request, parsed, request[RID], t0, pinned)
            self.metrics.requests.labels(endpoint, str(resp.status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            return resp

        return handler

    async def _check_model(self, parsed: ParsedRequest) -> None:
        """404 `model_not_found` unless a server serves the requested model (`protocol.model_accepted`)."""
        served = self.state.served_models()
        if served is not None:
            try:
                return check_model(parsed, served)
            except APIError:
                pass
        # Not known (yet): ask the servers again, since an adapter may have been loaded since the last fetch, but
        # at most once a second, so a client looping on a bad name does not turn into a model-list flood.
        now = time.monotonic()
        if now - self._models_asked >= MODELS_MISS_REFRESH_S:
            self._models_asked = now
            served = await self.poller.refresh_models()
        if served is None:
            return  # no server has listed its models: forward, and let the server judge as SGLang would
        check_model(parsed, served)

    def _choose(
        self,
        parsed: ParsedRequest,
        excluded_d: list[int],
        excluded_p: list[int],
        failure: BackendFailure | None,
        pinned: Backend | None,
    ) -> tuple[Backend, Backend]:
        """The (prefill, decode) pair for one attempt; 503 when none is healthy (502 after a failed attempt).
        A `pinned` decode server is the only candidate (the policy still books the request there)."""
        t = time.perf_counter()
        try:
            p = self.state.choose_prefill(excluded_p)
        except NoHealthyInstance:
            raise self._unavailable("prefill", failure) from None
        if pinned is not None:
            excluded_d = [*excluded_d, *(d.index for d in self.state.decodes if d is not pinned)]
        try:
            d = self.state.choose_decode(parsed.prompt_tokens, parsed.max_tokens, excluded_d)
        except NoHealthyInstance:
            raise self._unavailable("decode", failure) from None
        self.metrics.decision.observe(time.perf_counter() - t)
        return self.state.prefills[p], self.state.decodes[d]

    async def _choose_pair(
        self,
        parsed: ParsedRequest,
        excluded_d: list[int],
        excluded_p: list[int],
        failure: BackendFailure | None,
        pinned: Backend | None,
    ) -> tuple[Backend, Backend]:
        """`_choose`, awaited: a relay worker of a multi-process router asks its brain (`ares_router.workers`)."""
        return self._choose(parsed, excluded_d, excluded_p, failure, pinned)

    def _flight_started(self, rid: str, flight: InFlight) -> None:
        """Register a request just sent to its servers where migration control finds it (by any of its ids)."""
        self.inflight[flight.rid] = flight
        self.hop_rids[flight.rid] = flight.rid
        self.client_rids[rid] = flight.rid

    def _flight_ended(self, rid: str, flight: InFlight) -> None:
        """Forget a request that finished, failed or was aborted (every id it had, its bookkeeping, the gate's
        history of it)."""
        self._drop_flight(rid, flight)
        self.gate.forget([flight.rid])

    def _drop_flight(self, rid: str, flight: InFlight) -> None:
        """Forget every id of a request that ended, and its row in the state (a relay worker's `_flight_ended` too)."""
        self.state.finish(flight.backend_rid)
        self.inflight.pop(flight.rid, None)
        for hop in flight.hops:
            self.hop_rids.pop(hop.rid, None)
        if self.client_rids.get(rid) == flight.rid:
            del self.client_rids[rid]

    @property
    def held_requests(self) -> HeldQueue:
        """The requests held at the router (made on first use)."""
        queue = self.__dict__.get("_held_queue")
        if queue is None:
            queue = self.__dict__["_held_queue"] = HeldQueue(
                HoldRelease(self.config.hold_max_wait_s),
                lambda prompt, max_tokens: not self.state.holds(prompt, max_tokens),
                self.config.poll_interval_s,
            )
        return queue

    def held_longest(self) -> NewRequest | None:
        """The request held at the router longest, as the policy sees a new request (for defragmenting moves)."""
        queue = self.__dict__.get("_held_queue")
        if queue is None or not queue.queue:
            return None
        head = queue.queue[0]
        return new_request("", head.prompt_tokens, head.max_tokens, self.state.estimator)

    async def _hold_while_full(self, parsed: ParsedRequest, pinned: Backend | None) -> None:
        """Late binding (`Policy.hold_when_full`): while no healthy decode server would admit the request on the
        router's view (SGLang's rule or a predictive server's forecast, `RouterState.holds`), or an aged held
        request waits ahead of it, it waits here instead of in one server's prealloc queue. Held requests are
        released by the policy's rule (`policy.HoldRelease`, as in the simulator: oldest first, first fit, aging
        after `--ares-hold-max-wait-s`), re-checked every poll interval (`held.HeldQueue`). Returns when the request
        may be placed; the caller places it before its next await. A pinned request (a migration's splice) never
        waits."""
        if pinned is not None or not self.state.policy.hold_when_full:
            return
        held = self.held_requests
        if not held.must_wait(parsed.prompt_tokens, parsed.max_tokens):
            return
        self.metrics.held.inc()
        try:
            await held.wait(parsed.prompt_tokens, parsed.max_tokens)
        finally:
            self.metrics.held.dec()

    @staticmethod
    def _unavailable(role: str, failure: BackendFailure | None) -> APIError:
        if failure is None:
            return APIError(503, f"no healthy {role} server is available; retry later")
        return APIError(
            502, f"backend failed before the first token ({failure}); no other healthy {role} server to retry on"
        )

    async def _serve(
        self, request: web.Request, parsed: ParsedRequest, rid: str, t0: float, pinned: Backend | None
    ) -> web.StreamResponse:
        assert self.client is not None
        excluded_d: list[int] = []
        excluded_p: list[int] = []
        failure: BackendFailure | None = None
        await self._hold_while_full(parsed, pinned)
        for attempt in range(self.config.retries + 1):
            try:
                prefill, decode = await self._choose_pair(parsed, excluded_d, excluded_p, failure, pinned)
            except APIError:
                if failure is not None and failure.answer is not None:
                    return _relay_answer(failure.answer, {"X-Request-Id": rid})  # the server's own error
                raise
            # SGLang aborts every request whose rid *starts with* the aborted one, so the backends only ever see
            # router-made ids of one fixed length (prefix-free): a client's id stays in headers and logs.
            backend_rid = rid if attempt == 0 and request[RID_IS_OURS] else uuid.uuid4().hex
            body = {**parsed.body, **bootstrap_fields(prefill, self.client.rng), "rid": backend_rid}
            self.state.start(backend_rid, decode.index, prefill.index, parsed.prompt_tokens, parsed.max_tokens)
            self.metrics.dispatches.labels(decode.name, self.state.policy.name).inc()
            log.info(
                "rid=%s %s attempt %d -> %s, %s (backend rid %s)",
                rid,
                parsed.endpoint,
                attempt + 1,
                prefill.name,
                decode.name,
                backend_rid,
            )
            headers = {"X-Request-Id": rid, PIN_HEADER: decode.name, "X-Ares-Prefill": prefill.name}
            flight = InFlight.create(backend_rid, parsed.endpoint, body, parsed.stream, prefill, decode)
            self._flight_started(rid, flight)
            try:
                try:
                    start = await self.client.start(prefill, decode, parsed.endpoint, body, parsed.stream)
                except BackendFailure as e:
                    log.warning("rid=%s failed before the first token: %s", rid, e)
                    self.state.mark_failed(e.backend, str(e))
                    self.client.abort(backend_rid, [prefill, decode])
                    (excluded_d if e.backend.role == "decode" else excluded_p).append(e.backend.index)
                    failure = e
                    if attempt < self.config.retries:
                        self.metrics.retries.labels(e.backend.role).inc()
                        continue
                    if e.answer is not None:  # the server answered with its own error: that is what the client gets
                        return _relay_answer(e.answer, headers)
                    raise APIError(502, f"backend failed before the first token: {e}") from None
                except PrefillRejected as e:
                    self.client.abort(backend_rid, [decode])
                    return _relay_answer(e.answer, headers)
                if start.status >= 400:  # the decode rejected it: the prefill must not wait for it to pull the KV
                    self.client.abort(backend_rid, [prefill])
                if not parsed.stream or start.response is None:
                    if start.status == 200 and flight.moves:
                        status, answer = await joined_answer(flight, Splicer.for_endpoint(parsed.endpoint), start.first)
                        return web.Response(body=answer, status=status, headers=_ctype(start, headers))
                    if start.status == 200:
                        self._record_head_error(backend_rid, decode, functools.partial(_answer_tokens, start.first))
                    return web.Response(body=start.first, status=start.status, headers=_ctype(start, headers))
                return await self._relay_stream(request, parsed, start, flight, headers, t0)
            except _CLIENT_GONE:
                # Wherever it runs now: a move may have taken it elsewhere (or be moving it: then both servers).
                log.info("rid=%s client disconnected; aborting it everywhere", rid)
                self.metrics.aborts.labels("client_disconnect").inc()
                self._abort_everywhere(flight)
                raise
            finally:
                self._flight_ended(rid, flight)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _record_head_error(
        self, backend_rid: str, decode: Backend, final_tokens: Callable[[], tuple[int, str] | None]
    ) -> None:
        """Compare the last prediction `decode` reported for a request that just completed with what came after
        it. `final_tokens` (the request's output tokens and where that count came from) is only evaluated when
        there is a prediction to compare with: a server without a head costs nothing here."""
        reported = self.state.last_prediction(backend_rid)
        if reported is None:
            return
        final = final_tokens()
        if final is None:
            return
        tokens, source = final
        generated_at_report, predicted = reported
        actual = tokens - generated_at_report
        if actual < 0:  # fewer tokens than the server had already reported: a count we cannot trust
            log.debug(
                "backend rid %s: %d output tokens < %d at the last report", backend_rid, tokens, generated_at_report
            )
            return
        self.metrics.observe_head_error(decode.name, predicted, actual, source)

    async def _relay_stream(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        start: DecodeStart,
        flight: InFlight,
        headers: dict,
        t0: float,
    ) -> web.StreamResponse:
        """Relay the request's stream to the client across every server it runs on (`relay.StreamRelay`),
        counting output events for the snapshot."""
        assert start.response is not None and self.client is not None
        tracked = self.state.requests[flight.rid]
        tracked.started = True
        resp = web.StreamResponse(status=start.status, headers=_ctype(start, {**headers, "Cache-Control": "no-cache"}))
        migratable = not_migratable(parsed.endpoint, parsed.body) is None
        relay = StreamRelay(flight, resp, tracked, Splicer.for_endpoint(parsed.endpoint) if migratable else None)
        try:
            await resp.prepare(request)
            self.metrics.ttft.labels(parsed.endpoint).observe(time.perf_counter() - t0)
            try:
                await relay.run(start.first, start.response)
            except (
                aiohttp.ClientPayloadError,
                aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError,  # the decode server's connection reset (it died)
                asyncio.TimeoutError,
                HopFailed,
            ) as e:
                # Tokens already went out: no retry possible. Say so in-band (SGLang's shape), clean up everywhere.
                log.warning("rid=%s decode stream broke: %r", request[RID], e)
                self._abort_everywhere(flight)
                self.metrics.aborts.labels("backend_stream_error").inc()
                if SSE_DONE not in relay.last:  # unless the stream had in fact ended
                    message = str(e) if isinstance(e, HopFailed) else f"decode server stream failed: {type(e).__name__}"
                    await resp.write(APIError(502, message).stream_event(parsed.endpoint))
            else:
                tail, events = relay.prev + relay.last, tracked.generated
                self._record_head_error(
                    flight.backend_rid,
                    flight.decode,
                    lambda: _stream_tokens(tail, events, parsed.endpoint),
                )
        finally:
            relay.close()
        await resp.write_eof()
        return resp


def _ctype(start: DecodeStart, headers: dict) -> dict:
    return {**headers, "Content-Type": start.content_type}


def _relay_answer(answer: BackendAnswer, headers: dict) -> web.Response:
    """A backend's HTTP answer, status and body unchanged."""
    return web.Response(
        body=answer.body, status=answer.status, headers={**headers, "Content-Type": answer.content_type}
    )


def _answer_tokens(body: bytes) -> tuple[int, str] | None:
    """Output tokens of a whole (non-streamed) answer."""
    try:
        tokens = completion_tokens(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None
    return None if tokens is None else (tokens, "usage")


def _stream_tokens(tail: bytes, events: int, endpoint: str) -> tuple[int, str] | None:
    """Output tokens of a finished stream: stated in its last event when it carries usage/meta_info, else counted
    from the relayed events (minus the events that carry no token)."""
    tokens = last_event_tokens(tail)
    if tokens is not None:
        return tokens, "usage"
    return max(0, events - _NON_TOKEN_EVENTS.get(endpoint, 0)), "events"
