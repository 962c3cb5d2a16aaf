"""`GET /ares/state` on SGLang's own HTTP app (launcher process): one request to the scheduler's state service
(TP rank 0) over a local ZMQ socket, its JSON bytes returned as they are."""

from __future__ import annotations

import asyncio
import logging

from ares.config import AresServerConfig
from ares.engine.state_report import COLUMNS

logger = logging.getLogger("ares.engine")

STATE_PATH = "/ares/state"


class StateClient:
    """A REQ socket to the state service; one request at a time, a fresh socket after a timeout (a REQ socket that
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

    async def fetch(self, columns: bool = False) -> bytes:
        """The current report (JSON bytes; schema version 2 with `columns`, else 1). Raises TimeoutError when the
        scheduler does not answer in time."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            sock = self._socket()
            try:
                await asyncio.wait_for(sock.send(COLUMNS if columns else b"rows"), self.timeout_s)
                return await asyncio.wait_for(sock.recv(), self.timeout_s)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                sock.close()
                self._sock = None
                raise


def add_routes(config: AresServerConfig) -> None:
    """Register `/ares/state` on `sglang.srt.entrypoints.http_server.app` (before the server starts)."""
    from fastapi import Response
    from fastapi.responses import ORJSONResponse
    from sglang.srt.entrypoints.http_server import app

    if config.state_ipc is None:
        raise ValueError("ARES state service address missing from the server config")
    client = StateClient(config.state_ipc)

    async def ares_state(format: str = "rows") -> Response:  # noqa: A002 - the query parameter's name
        if format not in ("rows", "columns"):
            return ORJSONResponse(
                {"object": "error", "message": f"format must be 'rows' or 'columns', got {format!r}",
                 "type": "BadRequestError", "param": "format", "code": 400},
                status_code=400,
            )  # fmt: skip
        try:
            body = await client.fetch(columns=format == "columns")
        except asyncio.TimeoutError:
            return ORJSONResponse(
                {"object": "error", "message": "ARES state service did not answer", "type": "ServiceUnavailable",
                 "param": None, "code": 503},
                status_code=503,
            )  # fmt: skip
        return Response(content=body, media_type="application/json")

    app.add_api_route(STATE_PATH, ares_state, methods=["GET"])
    logger.info("ARES: %s served from %s", STATE_PATH, config.state_ipc)
