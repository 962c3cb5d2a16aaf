"""The router's HTTP front (aiohttp): OpenAI-compatible and SGLang endpoints, PD relay, retries, aborts.

One process, one event loop, no thread per request. Every request gets an id (the client's `X-Request-Id` or body
`rid` when it is short and plain, else a fresh 32-hex one) that appears in every log line about the request
and comes back in the `X-Request-Id` response header. The backends get a router-made `rid` of fixed length (the
request id itself when the router made it), because SGLang's abort matches rids by prefix.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web

from ares_router.backends import BackendFailure, DecodeStart, PDClient, PrefillRejected, bootstrap_fields
from ares_router.config import RouterConfig
from ares_router.metrics import RouterMetrics
from ares_router.policy import NoHealthyInstance
from ares_router.poller import Poller
from ares_router.protocol import ENDPOINTS, APIError, ParsedRequest, parse_request
from ares_router.state import Backend, RouterState

log = logging.getLogger("ares_router")

_RID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_SSE = b"data:"
_SSE_DONE = b"data: [DONE]"
# What a client going away looks like while the router waits on a backend or writes to the client.
_CLIENT_GONE = (asyncio.CancelledError, ConnectionResetError, aiohttp.ClientConnectionResetError)


def _count_events(chunk: bytes) -> int:
    """Server-sent events in `chunk` that carry output (one per decode step with SGLang's stream_interval=1)."""
    return chunk.count(_SSE) - chunk.count(_SSE_DONE)


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
        self.client: PDClient | None = None

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
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self.client = PDClient.create(self.config.connect_timeout_s, self.config.request_timeout_s)
        await self.poller.start()
        healthy = sum(d.healthy for d in self.state.decodes), sum(p.healthy for p in self.state.prefills)
        log.info(
            "policy %s; healthy decode %d/%d, prefill %d/%d",
            self.state.policy.name,
            healthy[0],
            len(self.state.decodes),
            healthy[1],
            len(self.state.prefills),
        )

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.poller.stop()
        if self.client is not None:
            await self.client.close()

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        rid = self._request_id(request)
        request["rid"] = rid
        request["rid_is_ours"] = rid != request.headers.get("X-Request-Id")
        try:
            resp = await handler(request)
        except APIError as e:
            log.info("rid=%s %s %s -> %d %s", rid, request.method, request.path, e.status, e.message)
            self.metrics.requests.labels(request.path, str(e.status)).inc()
            resp = web.Response(body=e.body(), status=e.status, content_type="application/json")
        if not resp.prepared:
            resp.headers["X-Request-Id"] = request["rid"]
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
                request["rid"] = body_rid  # SGLang clients name their requests in the body
                request["rid_is_ours"] = False
            resp = await self._serve(request, parsed, request["rid"], t0)
            self.metrics.requests.labels(endpoint, str(resp.status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            return resp

        return handler

    def _choose(
        self, parsed: ParsedRequest, excluded_d: list[int], excluded_p: list[int], failure: BackendFailure | None
    ) -> tuple[Backend, Backend]:
        """The (prefill, decode) pair for one attempt; 503 when none is healthy (502 after a failed attempt)."""
        t = time.perf_counter()
        try:
            p = self.state.choose_prefill(excluded_p)
        except NoHealthyInstance:
            raise self._unavailable("prefill", failure) from None
        try:
            d = self.state.choose_decode(parsed.prompt_tokens, parsed.max_tokens, excluded_d)
        except NoHealthyInstance:
            raise self._unavailable("decode", failure) from None
        self.metrics.decision.observe(time.perf_counter() - t)
        return self.state.prefills[p], self.state.decodes[d]

    @staticmethod
    def _unavailable(role: str, failure: BackendFailure | None) -> APIError:
        if failure is None:
            return APIError(503, f"no healthy {role} server is available; retry later")
        return APIError(
            502,
            f"backend failed before the first token ({failure}); no other healthy {role} server to retry on",
            err_type="backend_error",
        )

    async def _serve(self, request: web.Request, parsed: ParsedRequest, rid: str, t0: float) -> web.StreamResponse:
        assert self.client is not None
        excluded_d: list[int] = []
        excluded_p: list[int] = []
        failure: BackendFailure | None = None
        for attempt in range(self.config.retries + 1):
            prefill, decode = self._choose(parsed, excluded_d, excluded_p, failure)
            # SGLang aborts every request whose rid *starts with* the aborted one, so the backends only ever see
            # router-made ids of one fixed length (prefix-free): a client's id stays in headers and logs.
            backend_rid = rid if attempt == 0 and request["rid_is_ours"] else uuid.uuid4().hex
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
                    raise APIError(
                        502, f"backend failed before the first token: {e}", err_type="backend_error"
                    ) from None
                except PrefillRejected as e:
                    self.client.abort(backend_rid, [decode])
                    return web.Response(body=e.body, status=e.status, content_type="application/json")
                if start.status >= 400:  # the decode rejected it: the prefill must not wait for it to pull the KV
                    self.client.abort(backend_rid, [prefill])
                headers = {"X-Request-Id": rid, "X-Ares-Decode": decode.name, "X-Ares-Prefill": prefill.name}
                if not parsed.stream or start.response is None:
                    return web.Response(body=start.first, status=start.status, headers=_ctype(start, headers))
                return await self._relay_stream(request, parsed, start, backend_rid, [prefill, decode], headers, t0)
            except _CLIENT_GONE:
                log.info("rid=%s client disconnected; aborting on %s, %s", rid, prefill.name, decode.name)
                self.metrics.aborts.labels("client_disconnect").inc()
                self.client.abort(backend_rid, [prefill, decode])
                raise
            finally:
                self.state.finish(backend_rid)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _relay_stream(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        start: DecodeStart,
        backend_rid: str,
        backends: list[Backend],
        headers: dict,
        t0: float,
    ) -> web.StreamResponse:
        """Relay the decode stream unchanged, counting output events for the snapshot."""
        assert start.response is not None and self.client is not None
        tracked = self.state.requests[backend_rid]
        tracked.started = True
        resp = web.StreamResponse(status=start.status, headers=_ctype(start, {**headers, "Cache-Control": "no-cache"}))
        try:
            await resp.prepare(request)
            self.metrics.ttft.labels(parsed.endpoint).observe(time.perf_counter() - t0)
            tracked.generated += _count_events(start.first)
            await resp.write(start.first)
            try:
                async for chunk in start.response.content.iter_any():
                    tracked.generated += _count_events(chunk)
                    await resp.write(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, asyncio.TimeoutError) as e:
                # Tokens already went out: no retry possible. Say so in-band, and clean up both servers.
                log.warning("rid=%s decode stream broke: %r", request["rid"], e)
                self.client.abort(backend_rid, backends)
                self.metrics.aborts.labels("backend_stream_error").inc()
                err = APIError(502, f"decode server stream failed: {type(e).__name__}", err_type="backend_error")
                await resp.write(b"data: " + err.body() + b"\n\n")
        finally:
            start.response.close()
        await resp.write_eof()
        return resp

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
                        return web.Response(body=await r.read(), content_type="application/json")
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                continue
        raise APIError(503, "no server answered /v1/models")

    async def health(self, request: web.Request) -> web.Response:
        """200 when at least one prefill and one decode server are healthy, else 503 with the reason."""
        d = sum(b.healthy for b in self.state.decodes)
        p = sum(b.healthy for b in self.state.prefills)
        body = {"status": "ok" if d and p else "unavailable", "healthy_decode": d, "healthy_prefill": p}
        if not (d and p):
            missing = "decode" if not d else "prefill"
            body["error"] = {"message": f"no healthy {missing} server", "type": "service_unavailable", "code": 503}
        return _json_response(body, 200 if d and p else 503)

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
