"""The channel between a multi-process router's brain and its relay workers (`ares_router.brain`,
`ares_router.workers`): one connection per worker (a unix socket on the brain's host, TCP from a relay host),
messages both ways.

Wire: each message is a 4-byte big-endian length and an orjson object. `"k"` names the message kind; a message
with an id `"i"` is a call and gets exactly one reply (`"k": "~"`, the same `"i"`, and `"v"`: the handler's value,
or `"e"`: the error's message and `"s"`: its HTTP status when it had one); a message without an id is a
notification (no reply). A caller that gives up (cancelled, timed out) sends `"k": "!"` with the call's id, and the
other side cancels the handler if it still runs. Either side may call the other: workers ask the brain to choose
servers, the brain asks a worker to migrate a request it relays.

Cheap on the request path: frames are parsed in `data_received` and a handler that returns a plain value (not an
awaitable) runs right there, so a worker's "choose" costs the brain no task and no extra loop turn; messages sent in
one loop iteration leave in one write (`_flush` is scheduled once per iteration).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import struct
from collections.abc import Callable
from typing import Any

import orjson

log = logging.getLogger("ares_router.channel")

_LEN = struct.Struct("!I")
MAX_FRAME = 64 * 1024**2  # a larger length means a broken peer: the connection is dropped
REPLY, CANCEL = "~", "!"

# A handler gets the whole message (its kind, id and fields) and returns a JSON-able value or an awaitable of one.
Handler = Callable[[dict], Any]


class ChannelClosed(ConnectionError):
    """The other side of the channel is gone (or this side closed it)."""


class RemoteError(Exception):
    """A call's handler failed on the other side; `status` is the HTTP status it carried (an `APIError`), if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status


def frame(msg: dict) -> bytes:
    """One message as it goes on the wire."""
    data = orjson.dumps(msg)
    return _LEN.pack(len(data)) + data


class Channel(asyncio.Protocol):
    """One end of a channel (an asyncio protocol on a unix-socket connection). `handlers` maps message kinds to
    `Handler`s; `on_lost(channel)` runs once when the connection ends."""

    def __init__(self, handlers: dict[str, Handler], on_lost: Callable[[Channel], None] | None = None, name: str = ""):
        self.handlers = handlers
        self.on_lost = on_lost
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.lost: asyncio.Future | None = None  # done when the connection ends
        self.peer: dict = {}  # what the other side said about itself (set by the owner's handlers)
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._calls: dict[int, asyncio.Future] = {}
        self._serving: dict[int, asyncio.Task] = {}  # calls from the other side whose handler is awaiting
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        self.lost = self._loop.create_future()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        at, n = 0, len(buf)
        while n - at >= 4:
            (size,) = _LEN.unpack_from(buf, at)
            if size > MAX_FRAME:
                log.error("channel %s: a %d-byte frame; dropping the connection", self.name, size)
                self.close()
                return
            if n - at - 4 < size:
                break
            msg = orjson.loads(memoryview(buf)[at + 4 : at + 4 + size])
            at += 4 + size
            self._dispatch(msg)
        if at:
            del buf[:at]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and self.lost is not None and self.lost.done():
            return
        self.closed = True
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(f"channel {self.name} closed"))
        self._calls.clear()
        for task in self._serving.values():
            task.cancel()
        self._serving.clear()
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)
        if self.on_lost is not None:
            self.on_lost(self)

    # -- sending ----------------------------------------------------------------------------------------------------
    def send(self, kind: str, fields: dict | None = None) -> None:
        """A notification (no reply). Dropped silently once the channel is closed: the other side is gone."""
        self._send({"k": kind, **(fields or {})})

    async def call(self, kind: str, fields: dict | None = None, timeout: float | None = None) -> Any:
        """Call the other side's handler for `kind`; its value. Raises `RemoteError` when the handler failed,
        `ChannelClosed` when the channel ends first, `asyncio.TimeoutError` after `timeout` seconds."""
        if self.closed or self._loop is None:
            raise ChannelClosed(f"channel {self.name} closed")
        i = next(self._ids)
        fut = self._loop.create_future()
        self._calls[i] = fut
        self._send({"k": kind, "i": i, **(fields or {})})
        try:
            if timeout is None:
                return await fut
            return await asyncio.wait_for(fut, timeout)
        except (asyncio.CancelledError, asyncio.TimeoutError):
            if not self.closed:
                self._send({"k": CANCEL, "i": i})  # the other side stops working on it
            raise
        finally:
            self._calls.pop(i, None)

    def close(self) -> None:
        """Flush what is queued and close the connection."""
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _send(self, msg: dict) -> None:
        if self.closed or self.transport is None:
            return
        self._out.append(frame(msg))
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._out and self.transport is not None and not self.closed:
            out, self._out = self._out, []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    # -- receiving --------------------------------------------------------------------------------------------------
    def _dispatch(self, msg: dict) -> None:
        kind = msg.get("k")
        i = msg.get("i")
        if kind == REPLY:
            fut = self._calls.get(i)
            if fut is not None and not fut.done():
                if "e" in msg:
                    fut.set_exception(RemoteError(msg["e"], msg.get("s")))
                else:
                    fut.set_result(msg.get("v"))
            return
        if kind == CANCEL:
            task = self._serving.pop(i, None)
            if task is not None:
                task.cancel()
            return
        handler = self.handlers.get(kind)
        if handler is None:
            log.warning("channel %s: no handler for %r", self.name, kind)
            if i is not None:
                self._send({"k": REPLY, "i": i, "e": f"no handler for {kind!r}"})
            return
        try:
            value = handler(msg)
        except Exception as e:  # noqa: BLE001 - the caller gets the error, the channel goes on
            if i is None:
                log.exception("channel %s: notification %r failed", self.name, kind)
            else:
                self._reply_error(i, e)
            return
        if inspect.isawaitable(value):
            task = asyncio.ensure_future(value)
            if i is not None:
                self._serving[i] = task
            task.add_done_callback(lambda t, i=i, kind=kind: self._served(t, i, kind))
        elif i is not None:
            self._send({"k": REPLY, "i": i, "v": value})

    def _served(self, task: asyncio.Task, i: int | None, kind: str) -> None:
        if i is not None:
            self._serving.pop(i, None)
        if task.cancelled():
            return  # the caller gave up (or the channel ended): nobody waits for a reply
        e = task.exception()
        if i is None:
            if e is not None:
                log.error("channel %s: notification %r failed: %r", self.name, kind, e)
        elif e is not None:
            self._reply_error(i, e)
        else:
            self._send({"k": REPLY, "i": i, "v": task.result()})

    def _reply_error(self, i: int, e: BaseException) -> None:
        status = getattr(e, "status", None)
        message = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
        self._send({"k": REPLY, "i": i, "e": str(message), "s": status if isinstance(status, int) else None})


def host_port(address: str) -> tuple[str, int]:
    """`HOST:PORT` (an IPv6 host in brackets) as (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


async def serve(address: str, factory: Callable[[], Channel]) -> asyncio.AbstractServer:
    """Listen on `address` (a unix socket path, or `HOST:PORT` for TCP); `factory()` makes each connection's
    `Channel`."""
    loop = asyncio.get_running_loop()
    if address.startswith("/"):
        return await loop.create_unix_server(factory, address)
    host, port = host_port(address)
    return await loop.create_server(factory, host, port, reuse_address=True)


async def connect(address: str, channel: Channel, timeout_s: float = 30.0) -> Channel:
    """Connect `channel` to `address` (a unix socket path, or `HOST:PORT`), retrying until it listens (at most
    `timeout_s`). TCP connections have TCP_NODELAY (asyncio's default): a call is one small frame each way."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            if address.startswith("/"):
                await loop.create_unix_connection(lambda: channel, address)
            else:
                host, port = host_port(address)
                await loop.create_connection(lambda: channel, host, port)
            return channel
        except (FileNotFoundError, ConnectionRefusedError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)
