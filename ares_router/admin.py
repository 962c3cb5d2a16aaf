"""The router's own endpoints besides generation and migration: the model list, health, Prometheus metrics, the
cluster snapshot, the servers' `/server_info`, and `/flush_cache` forwarded to every server.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
from aiohttp import web

from ares_router.backends import PDClient
from ares_router.config import RouterConfig
from ares_router.metrics import RouterMetrics
from ares_router.protocol import APIError
from ares_router.reports import parse_models
from ares_router.state import Backend, RouterState


def json_response(data: object, status: int = 200, headers: dict | None = None) -> web.Response:
    """`data` as a JSON response."""
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


class AdminEndpoints:
    """The other endpoints of `app.Router` (a part of it: the attributes below are the router's)."""

    config: RouterConfig
    state: RouterState
    metrics: RouterMetrics
    client: PDClient | None

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
        return json_response({"status": "ok", "healthy_decode": d, "healthy_prefill": p})

    async def prometheus(self, request: web.Request) -> web.Response:
        """Prometheus text exposition of the router's metrics."""
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def cluster(self, request: web.Request) -> web.Response:
        """`GET /ares/cluster`: the current snapshot as JSON."""
        return json_response(self.state.cluster_json())

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
        return json_response({"prefill": pre, "decode": dec})

    async def flush_cache(self, request: web.Request) -> web.Response:
        """Forward `POST /flush_cache` to every healthy server; 200 only if all of them flushed."""
        assert self.client is not None

        async def one(b: Backend) -> int:
            try:
                async with self.client.session.post(
                    b.url + "/flush_cache", params=request.query, headers=self.config.backend_headers
                ) as r:
                    await r.read()
                    return r.status
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                return 502

        statuses = await asyncio.gather(*(one(b) for b in (*self.state.prefills, *self.state.decodes) if b.healthy))
        ok = bool(statuses) and all(s == 200 for s in statuses)
        return json_response({"flushed": ok, "statuses": statuses}, 200 if ok else 502)
