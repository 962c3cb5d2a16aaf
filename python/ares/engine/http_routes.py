"""ARES routes on SGLang's own HTTP app (launcher process), each one request to a service thread of the scheduler
(TP rank 0) over a local ZMQ socket, its JSON bytes returned as they are:
- `GET /ares/state`: the load report (`ares.engine.state_report`);
- `POST /ares/migrate/cmd`: one migration command (`ares.migration.agent`), used by the ARES router. An admin
  endpoint as SGLang marks its own (`AuthLevel.ADMIN_OPTIONAL`: with `--admin-api-key` SGLang's middleware wants
  that key, and only that key, as a bearer token); a server started without an admin key takes commands from
  loopback clients only, where SGLang's ADMIN_FORCE would refuse them all."""

from __future__ import annotations

import asyncio
import logging

import orjson
from fastapi import Request, Response

from ares.config import AresServerConfig
from ares.engine.state_report import COLUMNS
from ares_router.wire import MIGRATE_CMD_PATH, STATE_PATH

logger = logging.getLogger("ares.engine")


class IpcClient:
    """A REQ socket to a service thread; one request at a time, a fresh socket after a timeout (a REQ socket that
    missed its reply cannot send again)."""

    def __init__(self, address: str, timeout_s: float = 5.0):
        self.address = address
        self.timeout_s = timeout_s
        self._sock = None
        self._lock: asyncio.Lock | None = None

    def _socket(self):
        import zmq
        import zmq.asyncio

        if self._sock is None:
            self._sock = zmq.asyncio.Context.instance().socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.address)
        return self._sock

    async def request(self, msg: bytes) -> bytes:
        """Send `msg`, return the answer. Raises TimeoutError when the scheduler does not answer in time."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            sock = self._socket()
            try:
                await asyncio.wait_for(sock.send(msg), self.timeout_s)
                return await asyncio.wait_for(sock.recv(), self.timeout_s)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                sock.close()
                self._sock = None
                raise


def _error(status: int, message: str, kind: str) -> Response:
    from fastapi.responses import ORJSONResponse

    body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return ORJSONResponse(body, status_code=status)


def _admin_key_set() -> bool:
    from sglang.srt.runtime_context import get_serving

    return bool(get_serving().admin_api_key)


def _is_loopback(host: str | None) -> bool:
    import ipaddress

    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_routes(config: AresServerConfig) -> None:
    """Register `/ares/state` on `sglang.srt.entrypoints.http_server.app` (before the server starts)."""
    from sglang.srt.entrypoints.http_server import app

    if config.state_ipc is None or config.migrate_ipc is None:
        raise ValueError("ARES service addresses missing from the server config")
    client = IpcClient(config.state_ipc)
    migrate = IpcClient(config.migrate_ipc, timeout_s=120.0)

    async def ares_state(format: str = "rows") -> Response:  # noqa: A002 - the query parameter's name
        if format not in ("rows", "columns"):
            return _error(400, f"format must be 'rows' or 'columns', got {format!r}", "BadRequestError")
        try:
            body = await client.request(COLUMNS if format == "columns" else b"rows")
        except asyncio.TimeoutError:
            return _error(503, "ARES state service did not answer", "ServiceUnavailable")
        return Response(content=body, media_type="application/json")

    async def migrate_cmd(request: Request) -> Response:
        if not _admin_key_set() and not _is_loopback(request.client.host if request.client else None):
            return _error(403, "migration commands need the server's --admin-api-key from other hosts", "Forbidden")
        raw = await request.body()
        try:
            orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            return _error(400, f"body is not JSON: {e}", "BadRequestError")
        try:
            body = await migrate.request(raw)
        except asyncio.TimeoutError:
            return _error(503, "ARES migration agent did not answer", "ServiceUnavailable")
        status = orjson.loads(body).get("status", 500)
        return Response(content=body, status_code=status, media_type="application/json")

    from sglang.srt.utils.auth import AuthLevel, auth_level

    auth_level(AuthLevel.ADMIN_OPTIONAL)(migrate_cmd)  # SGLang's middleware reads the mark off the endpoint
    app.add_api_route(STATE_PATH, ares_state, methods=["GET"])
    app.add_api_route(MIGRATE_CMD_PATH, migrate_cmd, methods=["POST"])
    logger.info("ARES: %s and %s served from %s", STATE_PATH, MIGRATE_CMD_PATH, config.state_ipc)
