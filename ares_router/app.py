"""The router's HTTP front (aiohttp): OpenAI-compatible and SGLang endpoints, PD relay, retries, aborts.

One process, one event loop, no thread per request. Every request gets an id (the client's `X-Request-Id` or body
`rid` when it is short and plain, else a fresh 32-hex one) that appears in every log line about the request
and comes back in the `X-Request-Id` response header. The backends get a router-made `rid` of fixed length (the
request id itself when the router made it), because SGLang's abort matches rids by prefix.

Errors: a backend's own error answer (4xx, or the 5xx of the last attempt) reaches the client unchanged; the errors
the router makes itself have SGLang's shape for the endpoint (`protocol.APIError`), unknown paths included.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

import aiohttp
import orjson
from aiohttp import web

from ares_router.backends import (
    BackendAnswer,
    BackendFailure,
    DecodeStart,
    PDClient,
    PrefillRejected,
    bootstrap_fields,
)
from ares_router.config import RouterConfig
from ares_router.link_profile import get_link_profile
from ares_router.metrics import RouterMetrics
from ares_router.migration import InFlight, Migration, MigrationLimits, new_mid, run_migration
from ares_router.policy import Migration as PolicyMigration
from ares_router.policy import MigrationCost, NoHealthyInstance, plan_rebalance
from ares_router.poller import Poller, parse_models
from ares_router.protocol import ENDPOINTS, GENERATE, APIError, ParsedRequest, check_model, parse_request
from ares_router.rebalancer import RebalanceGate
from ares_router.relay import SSE_DONE, HopFailed, StreamRelay, completion_tokens, joined_answer, last_event_tokens
from ares_router.splice import Splicer, not_migratable
from ares_router.state import Backend, RouterState

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


def _json_response(data: object, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


class Router:
    """State, poller, backend client and the HTTP handlers of one router process."""

    def __init__(self, config: RouterConfig):
        self.config = config
        self.state = RouterState.create(
            config.prefill,
            config.decode,
            config.policy,
            load_model=config.load_model,
            estimator=config.estimator,
            admission=config.admission,
            link=(link := get_link_profile(config.migrate_link)),
            migration_cost=link.migration_cost(MigrationCost().kv_bytes_per_token),  # until servers report theirs
            stale_after_s=config.stale_after_s,
            seed=config.seed,
        )
        self.metrics = RouterMetrics(self.state)
        self.poller = Poller(
            self.state,
            config.poll_interval_s,
            config.poll_timeout_s,
            config.ares_state_reprobe_s,
            failure_threshold=config.health_failure_threshold,
        )
        self.poller.on_round = self._on_poll_round
        self.client: PDClient | None = None
        self.inflight: dict[str, InFlight] = {}  # the request's first backend rid -> what migrating it needs
        self.hop_rids: dict[str, str] = {}  # every backend rid of a relayed request (one per hop) -> its first
        self.client_rids: dict[str, str] = {}  # the client's request id -> first backend rid
        self.migration_log: list[dict] = []  # the last records, newest last
        self.gate = RebalanceGate(config.rebalance_limits)
        self._rebalancer: asyncio.Task | None = None
        self._migration_tasks: set[asyncio.Task] = set()
        self.migration_limits = MigrationLimits(
            max_stages=config.migrate_max_stages,
            last_stage_tokens=config.migrate_last_stage_tokens,
            stage_delay_s=config.migrate_stage_delay_s,
        )
        self._models_asked = -MODELS_MISS_REFRESH_S  # monotonic time of the last on-demand model-list refresh

    # -- application ----------------------------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        """The aiohttp application with every route; starts/stops the poller and the backend pool with it."""
        app = web.Application(client_max_size=256 * 1024**2, middlewares=[self._middleware])
        for endpoint in ENDPOINTS:
            app.router.add_post(endpoint, self._generation_handler(endpoint))
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/ares/cluster", self.cluster)
        app.router.add_get("/server_info", self.server_info)
        app.router.add_get("/get_server_info", self.server_info)
        app.router.add_post("/flush_cache", self.flush_cache)
        app.router.add_post("/ares/migrate", self.migrate)
        app.router.add_get("/ares/migrations", self.migrations_list)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self.client = PDClient.create(self.config.connect_timeout_s, self.config.request_timeout_s)
        await self.poller.start()
        if self.config.rebalance:
            self._rebalancer = asyncio.create_task(self._rebalance_loop())
        healthy = sum(d.healthy for d in self.state.decodes), sum(p.healthy for p in self.state.prefills)
        log.info(
            "policy %s; healthy decode %d/%d, prefill %d/%d",
            self.state.policy.name,
            healthy[0],
            len(self.state.decodes),
            healthy[1],
            len(self.state.prefills),
        )

    def _on_poll_round(self) -> None:
        self.metrics.observe_poll_round(self.poller.last_fetch_s, self.poller.last_refresh_s)

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._rebalancer is not None:
            self._rebalancer.cancel()
        await self.poller.stop()
        if self.client is not None:
            await self.client.close()

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        rid = self._request_id(request)
        request[RID] = rid
        request[RID_IS_OURS] = rid != request.headers.get("X-Request-Id")
        try:
            try:
                resp = await handler(request)
            except web.HTTPException as e:  # aiohttp's own: unknown path, wrong method, body too large
                if e.status < 400:
                    raise
                raise _http_error(request, e) from None
        except APIError as e:
            log.info("rid=%s %s %s -> %d %s", rid, request.method, request.path, e.status, e.message)
            # Label by route, not by path: a scanner's random paths must not create a series each.
            route = request.path if request.match_info.route.resource is not None else "unmatched"
            self.metrics.requests.labels(route, str(e.status)).inc()
            resp = web.Response(body=e.body(request.path), status=e.status, content_type="application/json")
        if not resp.prepared:
            resp.headers["X-Request-Id"] = request[RID]
        return resp

    def _request_id(self, request: web.Request) -> str:
        rid = request.headers.get("X-Request-Id", "")
        return rid if self._usable_id(rid) else uuid.uuid4().hex

    @staticmethod
    def _usable_id(rid: str) -> bool:
        """A client-chosen id is kept (headers, logs) when it is short and plain; it never reaches the backends."""
        return bool(_RID_OK.match(rid))

    # -- generation -----------------------------------------------------------------------------------------------
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

    async def _hold_while_full(self, parsed: ParsedRequest, pinned: Backend | None) -> None:
        """Late binding (`Policy.hold_when_full`): while no healthy decode server would admit the request on the
        router's view (SGLang's rule, `RouterState.holds`), it waits here instead of in one server's prealloc queue,
        re-checked every poll interval (the view changes at polls and dispatches). Each waiting request checks
        for itself, so one that fits nowhere does not block smaller ones (first fit, as the simulator places held
        requests). A pinned request (a migration's splice) never waits."""
        if pinned is not None or not self.state.policy.hold_when_full:
            return
        if not self.state.holds(parsed.prompt_tokens, parsed.max_tokens):
            return
        self.metrics.held.inc()
        try:
            while self.state.holds(parsed.prompt_tokens, parsed.max_tokens):
                await asyncio.sleep(self.config.poll_interval_s)
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
                prefill, decode = self._choose(parsed, excluded_d, excluded_p, failure, pinned)
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
            self.inflight[backend_rid] = flight
            self.hop_rids[backend_rid] = backend_rid
            self.client_rids[rid] = backend_rid
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
                self.state.finish(flight.backend_rid)
                self.inflight.pop(backend_rid, None)
                for hop in flight.hops:
                    self.hop_rids.pop(hop.rid, None)
                self.gate.forget([backend_rid])
                if self.client_rids.get(rid) == backend_rid:
                    del self.client_rids[rid]
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

    # -- migration ------------------------------------------------------------------------------------------------
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
        why = not_migratable(flight.endpoint, flight.body)
        if why is not None:
            raise APIError(409, f"request {rid!r} cannot migrate: {why}")
        if target is flight.decode:
            raise APIError(409, f"request {rid!r} already runs on {target.name}")
        current = flight.pending()
        if current is not None:
            raise APIError(409, f"request {rid!r} is already migrating ({current.mid})")
        m = await self._migrate(flight, target)
        return _json_response(m.record(), status=200 if m.state == "committed" else 409)

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

        await run_migration(self.client.session, flight, target, self.migration_limits, m, on_commit=committed)
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
                proposed = plan_rebalance(self.state.snapshot, self.config.rebalance_policy or self.state.policy)
                decodes = self.state.decodes
                eligible = [rid for rid, f in self.inflight.items() if not_migratable(f.endpoint, f.body) is None]
                # The policy names a request by its rid on the server it runs on now; the gate keeps its history
                # (moves, cooldown) under the request's first rid, which does not change with its moves.
                proposed = [
                    replace(pm, request_id=self.hop_rids.get(str(pm.request_id), pm.request_id)) for pm in proposed
                ]
                for pm in self.gate.choose(proposed, eligible, time.monotonic()):
                    flight = self.inflight.get(str(pm.request_id))
                    if flight is None or flight.decode.index != pm.source:
                        self.gate.done(pm, committed=False, now=time.monotonic())
                        continue
                    task = asyncio.create_task(self._rebalance_one(pm, flight, decodes[pm.target]))
                    self._migration_tasks.add(task)  # a reference until it ends (asyncio keeps weak ones)
                    task.add_done_callback(self._migration_tasks.discard)
                self.metrics.rebalance_rounds.inc()
            except Exception:  # noqa: BLE001 - one bad round must not end rebalancing
                log.exception("rebalance round failed")

    async def _rebalance_one(self, pm: PolicyMigration, flight: InFlight, target: Backend) -> None:
        try:
            m = await self._migrate(flight, target)
            committed = m.state == "committed"
        except Exception:  # noqa: BLE001
            log.exception("rebalance migration of %s failed", flight.rid)
            committed = False
        self.gate.done(pm, committed, time.monotonic())

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
        """`GET /ares/migrations`: the last 256 migration records."""
        return _json_response({"migrations": self.migration_log})

    # -- other endpoints ------------------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        """`GET /v1/models` from a healthy server (prefill first: they know the model too)."""
        assert self.client is not None
        candidates = [b for b in (*self.state.prefills, *self.state.decodes) if b.healthy]
        if not candidates:
            raise APIError(503, "no healthy server to ask for the model list")
        for b in candidates:
            try:
                async with self.client.session.get(b.url + "/v1/models") as r:
                    if r.status == 200:
                        raw = await r.read()
                        try:  # the answer doubles as a refresh of that server's model ids
                            b.models, b.models_time = parse_models(orjson.loads(raw)), time.monotonic()
                        except (orjson.JSONDecodeError, ValueError):
                            pass
                        return web.Response(body=raw, content_type="application/json")
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                continue
        raise APIError(503, "no server answered /v1/models")

    async def health(self, request: web.Request) -> web.Response:
        """200 when at least one prefill and one decode server are healthy, else 503 with the reason."""
        d = sum(b.healthy for b in self.state.decodes)
        p = sum(b.healthy for b in self.state.prefills)
        if not (d and p):
            missing = "decode" if not d else "prefill"
            raise APIError(
                503,
                f"no healthy {missing} server (healthy: decode {d}/{len(self.state.decodes)}, "
                f"prefill {p}/{len(self.state.prefills)})",
            )
        return _json_response({"status": "ok", "healthy_decode": d, "healthy_prefill": p})

    async def prometheus(self, request: web.Request) -> web.Response:
        """Prometheus text exposition of the router's metrics."""
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def cluster(self, request: web.Request) -> web.Response:
        """`GET /ares/cluster`: the current snapshot as JSON."""
        return _json_response(self.state.cluster_json())

    async def server_info(self, request: web.Request) -> web.Response:
        """`/server_info` of every server, grouped by role (what SGLang's benchmark reads after a run)."""
        assert self.client is not None

        async def one(b: Backend) -> object:
            try:
                async with self.client.session.get(b.url + "/server_info") as r:
                    return orjson.loads(await r.read()) if r.status == 200 else {"error": f"HTTP {r.status}"}
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, orjson.JSONDecodeError) as e:
                return {"error": repr(e)}

        pre = await asyncio.gather(*(one(b) for b in self.state.prefills))
        dec = await asyncio.gather(*(one(b) for b in self.state.decodes))
        return _json_response({"prefill": pre, "decode": dec})

    async def flush_cache(self, request: web.Request) -> web.Response:
        """Forward `POST /flush_cache` to every healthy server; 200 only if all of them flushed."""
        assert self.client is not None

        async def one(b: Backend) -> int:
            try:
                async with self.client.session.post(b.url + "/flush_cache", params=request.query) as r:
                    await r.read()
                    return r.status
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                return 502

        statuses = await asyncio.gather(*(one(b) for b in (*self.state.prefills, *self.state.decodes) if b.healthy))
        ok = bool(statuses) and all(s == 200 for s in statuses)
        return _json_response({"flushed": ok, "statuses": statuses}, 200 if ok else 502)


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


def _http_error(request: web.Request, e: web.HTTPException) -> APIError:
    """aiohttp's own HTTP errors as `APIError`s, so they have the router's (SGLang's) error shape too."""
    if e.status == 404:
        return APIError(404, f"no such endpoint: {request.method} {request.path}")
    if e.status == 405:
        return APIError(405, f"method {request.method} is not allowed on {request.path}")
    return APIError(e.status, e.text or e.reason)


async def serve(config: RouterConfig, ready: Callable[[int], None] | None = None) -> None:
    """Run the router until cancelled; `ready(port)` is called once it listens."""
    router = Router(config)
    runner = web.AppRunner(
        router.build_app(),
        handler_cancellation=True,  # a client disconnect cancels its handler: that is how aborts are triggered
        access_log=log if config.access_log else None,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1] if site._server else config.port  # noqa: SLF001
    log.info("ARES router listening on http://%s:%d", config.host, port)
    if ready is not None:
        ready(port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
