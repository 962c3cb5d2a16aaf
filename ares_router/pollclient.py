"""A lean HTTP/1.1 GET client for the poller: persistent connections per server, requests written as preformatted
bytes, each response parsed once it is complete (Content-Length, chunked, or read to the end).

Why not aiohttp here: a poll is the same small GET to the same servers ten times a second, and aiohttp's client
spends ~150 us of CPU per request in layers a poll does not use (sessions, cookies, tracing, per-request objects);
this client spends ~25 us. At 256 decode servers every 100 ms that is ~40 ms versus ~6 ms of the router's one core
per round (`benchmark/router_poll_bench.py`). Requests and streams to clients still go through aiohttp.

Errors: `ConnectFailed` (an `OSError`) when the TCP connection cannot be made (nothing listens: the poller marks the
server unhealthy at once), `asyncio.TimeoutError` after `timeout_s`, `BadResponse` for an answer that is not readable
HTTP/1.x, `ConnectionResetError` when the server closes the connection mid-answer.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

_MAX_HEADER_BYTES = 64 * 1024


class ConnectFailed(OSError):
    """The TCP connection to the server could not be made (refused, unreachable)."""


class BadResponse(ValueError):
    """The server's answer is not HTTP/1.x this client can read."""


def _parse(buf: bytearray, eof: bool) -> tuple[int, bytes, int, bool] | None:
    """(status, body, bytes consumed, keep-alive) of the complete response at the start of `buf`, or None while
    it is incomplete. Raises `BadResponse`."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > _MAX_HEADER_BYTES:
            raise BadResponse("response headers larger than 64 KiB")
        return None
    head = bytes(buf[:end]).split(b"\r\n")
    parts = head[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise BadResponse(f"not an HTTP/1.x status line: {head[0][:80]!r}")
    status = int(parts[1])
    length = None
    chunked = False
    keep_alive = parts[0] == b"HTTP/1.1"
    for line in head[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            if not value.isdigit():
                raise BadResponse(f"bad Content-Length {value[:40]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = value.endswith(b"chunked")
        elif name == b"connection":
            keep_alive = value == b"keep-alive" or (keep_alive and value != b"close")
    start = end + 4
    if status in (204, 304) or 100 <= status < 200:
        return status, b"", start, keep_alive
    if chunked:
        return _parse_chunked(buf, start, status, keep_alive)
    if length is not None:
        if len(buf) < start + length:
            return None
        return status, bytes(buf[start : start + length]), start + length, keep_alive
    if not eof:  # no length given: the body ends when the server closes the connection
        return None
    return status, bytes(buf[start:]), len(buf), False


def _parse_chunked(buf: bytearray, pos: int, status: int, keep_alive: bool) -> tuple[int, bytes, int, bool] | None:
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadResponse(f"bad chunk size {size_text[:20]!r}") from None
        pos = eol + 2
        if size == 0:  # the last chunk, then optional trailer lines, then an empty line
            if buf[pos : pos + 2] == b"\r\n":
                return status, bytes(body), pos + 2, keep_alive
            end = buf.find(b"\r\n\r\n", pos)
            return None if end < 0 else (status, bytes(body), end + 4, keep_alive)
        if len(buf) < pos + size + 2:
            return None
        body += buf[pos : pos + size]
        pos += size + 2


class _Connection(asyncio.Protocol):
    """One connection; at most one request on it at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.eof = False
        self.answered = 0  # complete responses read on this connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._deliver()

    def eof_received(self) -> bool:
        self.eof = True
        self._deliver()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.eof = True
        self._deliver(exc or ConnectionResetError("the server closed the connection"))

    def _deliver(self, lost: Exception | None = None) -> None:
        w = self.waiter
        if w is None or w.done():
            return
        try:
            parsed = _parse(self.buf, self.eof)
        except BadResponse as e:
            w.set_exception(e)
            return
        if parsed is not None:
            status, body, used, keep_alive = parsed
            del self.buf[:used]
            self.answered += 1
            if not keep_alive:
                self.close()
            w.set_result((status, body))
        elif lost is not None:
            w.set_exception(lost)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class PollClient:
    """GETs over pooled keep-alive connections, one pool per host:port."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._targets: dict[str, tuple[str, int, bytes]] = {}  # url -> host, port, request bytes

    def _target(self, url: str) -> tuple[str, int, bytes]:
        t = self._targets.get(url)
        if t is None:
            u = urlsplit(url)
            if u.scheme != "http" or not u.hostname:
                raise ValueError(f"the poller speaks plain http:// only, got {url!r}")
            port = u.port or 80
            path = (u.path or "/") + (f"?{u.query}" if u.query else "")
            host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
            request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/json\r\n\r\n".encode()
            t = self._targets[url] = (u.hostname, port, request)
        return t

    async def get(self, url: str) -> tuple[int, bytes]:
        """(status, body) of `GET url`, within `timeout_s` (connecting included)."""
        host, port, request = self._target(url)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        idle = self._idle.setdefault((host, port), [])
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            try:
                return await self._exchange(conn, request, deadline, idle)
            except ConnectionResetError:
                # The server closed this idle connection as we reused it (keep-alive timeout): the GET never
                # reached it, so asking again on a fresh connection is safe.
                if conn.buf or loop.time() >= deadline:
                    raise
        conn = await self._connect(host, port, deadline)
        return await self._exchange(conn, request, deadline, idle)

    async def _connect(self, host: str, port: int, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, host, port), max(0.0, deadline - loop.time())
            )
        except OSError as e:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {e}") from None
        return conn

    async def _exchange(
        self, conn: _Connection, request: bytes, deadline: float, idle: list[_Connection]
    ) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        waiter = conn.waiter = loop.create_future()
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            conn.transport.write(request)
            answer = await waiter
        except BaseException:
            conn.close()  # a late or partial answer must not be read as the next request's
            raise
        finally:
            timer.cancel()
            conn.waiter = None
        if not conn.closed:
            idle.append(conn)
        return answer

    def close(self) -> None:
        """Close every pooled connection."""
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())
