"""The router process's wiring (aiohttp): state, poller, backend pool, rebalancer, the routes and the middleware
(request ids, keys, error shapes). What each route does lives in its own module: `dispatch` (generation),
`relay` (streams across a request's hops), `migration_control` (moves), `admin` (the rest).

One process, one event loop, no thread per request. Errors: a backend's own error answer (4xx, or the 5xx of the
last attempt) reaches the client unchanged; the errors the router makes itself have SGLang's shape for the endpoint
(`protocol.APIError`), unknown paths included; refused keys answer 401/403 in the OpenAI shape (`auth`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from ares_router import auth
from ares_router.admin import AdminEndpoints
from ares_router.backends import PDClient
from ares_router.config import RouterConfig
from ares_router.dispatch import MODELS_MISS_REFRESH_S, PIN_HEADER, RID, RID_IS_OURS, Dispatch
from ares_router.link_profile import get_link_profile
from ares_router.metrics import RouterMetrics
from ares_router.migration import InFlight, MigrationLimits
from ares_router.migration_control import MigrationControl
from ares_router.policy import MigrationCost
from ares_router.policy.gate import RebalanceGate
from ares_router.poller import Poller
from ares_router.protocol import ENDPOINTS, APIError
from ares_router.state import RouterState

log = logging.getLogger("ares_router")


class Router(Dispatch, MigrationControl, AdminEndpoints):
    """State, poller, backend client and the HTTP handlers of one router process (the handlers live in the
    parts it is made of: `dispatch`, `migration_control`, `admin`)."""

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
                self._authorize(request)
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
            # Refused keys answer in the OpenAI error shape whatever the endpoint (the `/generate` shape has no code).
            body = e.body("" if e.status in (401, 403) else request.path)
            resp = web.Response(body=body, status=e.status, content_type="application/json")
            if e.status == 401:
                resp.headers["WWW-Authenticate"] = "Bearer"
        if not resp.prepared:
            resp.headers["X-Request-Id"] = request[RID]
        return resp

    def _authorize(self, request: web.Request) -> None:
        """Raise the 401/403 `APIError` of a request its keys do not open (`ares_router.auth`)."""
        cfg = self.config
        level = auth.level_of(request.path, PIN_HEADER in request.headers)
        if level is auth.Level.OPEN or not (cfg.api_key or cfg.admin_api_key or level is auth.Level.ADMIN):
            return  # no key set and nothing admin: the common loopback case costs one lookup
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        host = peer[0] if isinstance(peer, tuple) else None
        refused = auth.decide(level, request.headers.get("Authorization"), host, cfg.api_key, cfg.admin_api_key)
        if refused is not None:
            raise refused

    def _request_id(self, request: web.Request) -> str:
        rid = request.headers.get("X-Request-Id", "")
        return rid if self._usable_id(rid) else uuid.uuid4().hex


def _http_error(request: web.Request, e: web.HTTPException) -> APIError:
    """aiohttp's own HTTP errors as `APIError`s, so they have the router's (SGLang's) error shape too."""
    if e.status == 404:
        return APIError(404, f"no such endpoint: {request.method} {request.path}")
    if e.status == 405:
        return APIError(405, f"method {request.method} is not allowed on {request.path}")
    return APIError(e.status, e.text or e.reason)


async def serve(config: RouterConfig, ready: Callable[[int], None] | None = None) -> None:
    """Run the router until cancelled; `ready(port)` is called once it listens."""
    if config.relay_of or config.workers != 1 or config.brain_listen:  # brain and relays in processes of their own
        from ares_router import multiproc

        if config.relay_of:
            return await multiproc.serve_relays(config, ready)
        return await multiproc.serve_brain(config, ready)
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
