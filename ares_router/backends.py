"""The PD protocol on the wire: one request sent to a prefill and a decode server at once, the decode response
handed back for relaying, and aborts.

As SGLang's own routers do it: the body gets `bootstrap_host`/`bootstrap_port` (the prefill's KV bootstrap server)
and a random 63-bit `bootstrap_room` that pairs the two halves; both servers get the same body concurrently; the
prefill's answer is drained and dropped, the decode's is what the client sees. The router also sets `rid`, so one
`POST /abort_request {"rid": ...}` reaches the request on both servers.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import orjson

from ares_router.state import Backend

log = logging.getLogger("ares_router.backends")
BACKEND_KEEPALIVE_S = 4.0  # below uvicorn's 5 s keep-alive (SGLang's HTTP server)

JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class BackendAnswer:
    """An HTTP answer of a backend, kept so it can reach the client unchanged."""

    status: int
    content_type: str
    body: bytes


class PrefillRejected(Exception):
    """The prefill server rejected the request (4xx): the client gets that answer unchanged; nothing is retried."""

    def __init__(self, answer: BackendAnswer):
        super().__init__(f"prefill answered {answer.status}")
        self.answer = answer


class BackendFailure(Exception):
    """A server failed before the response was committed to the client (connection error, 5xx, empty stream):
    the request may be retried elsewhere. `answer` is the server's own error answer when it sent one (a 5xx), so
    the client gets exactly that if no retry succeeds."""

    def __init__(self, backend: Backend, message: str, answer: BackendAnswer | None = None):
        super().__init__(f"{backend.name} {backend.url}: {message}")
        self.backend = backend
        self.answer = answer


@dataclass
class DecodeStart:
    """The decode server's answer up to the point the router commits to it."""

    status: int
    content_type: str
    response: aiohttp.ClientResponse | None  # streaming: the open response, positioned after `first`
    first: bytes  # streaming: the first chunk; non-streaming: the whole body


def bootstrap_fields(prefill: Backend, rng: random.Random) -> dict:
    """What the decode server needs to find the prefill's KV: host, bootstrap port, a fresh room."""
    host = urlsplit(prefill.url).hostname or "127.0.0.1"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return {"bootstrap_host": host, "bootstrap_port": prefill.bootstrap_port, "bootstrap_room": rng.getrandbits(63)}


@dataclass
class PDClient:
    """Sends PD pairs and aborts over one shared connection pool."""

    session: aiohttp.ClientSession
    abort_timeout_s: float = 5.0
    rng: random.Random = field(default_factory=random.Random)
    _background: set[asyncio.Task] = field(default_factory=set)

    @classmethod
    def create(cls, connect_timeout_s: float = 5.0, request_timeout_s: float | None = None) -> PDClient:
        """A client with an unlimited pool (200 concurrent streams need 400 connections) and no read timeout by
        default: a long generation is not an error."""
        timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=connect_timeout_s)
        # Idle pooled connections are dropped before SGLang's server (uvicorn, keep-alive 5 s) drops them: a request
        # sent on a connection the server is closing fails with a reset, and the router would take the server for
        # dead until its next poll (the chaos benchmark lost 22 requests so with aiohttp's default of 15 s).
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, keepalive_timeout=BACKEND_KEEPALIVE_S)
        session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)
        return cls(session)

    async def close(self) -> None:
        """Wait for pending aborts, then close the pool."""
        if self._background:
            await asyncio.wait(self._background, timeout=self.abort_timeout_s)
        await self.session.close()

    async def start(self, prefill: Backend, decode: Backend, endpoint: str, body: dict, stream: bool) -> DecodeStart:
        """Send `body` to both servers; return once the decode answer can be committed to the client: its first
        chunk (streaming) or its whole body. Raises `BackendFailure` naming the server at fault."""
        data = orjson.dumps(body)
        prefill_task = asyncio.create_task(self._run_prefill(prefill, endpoint, data))
        decode_task = asyncio.create_task(self._open_decode(decode, endpoint, data, stream))
        try:
            done, _ = await asyncio.wait({prefill_task, decode_task}, return_when=asyncio.FIRST_COMPLETED)
            if decode_task not in done:
                # The prefill answered first. A failed prefill means the decode would wait for KV that never
                # comes, so give up on the pair now.
                _check_prefill(prefill, prefill_task.result())
                await asyncio.wait({decode_task})
            start = decode_task.result()
        except BaseException:
            for t in (prefill_task, decode_task):
                t.cancel()
            raise
        # The prefill's answer is not needed: let it drain in the background.
        self._keep(prefill_task)
        return start

    def _keep(self, task: asyncio.Task) -> None:
        self._background.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:  # e.g. a prefill that broke after the decode began
            log.debug("background task failed: %r", task.exception())

    async def _run_prefill(self, prefill: Backend, endpoint: str, data: bytes) -> BackendAnswer:
        try:
            async with self.session.post(prefill.url + endpoint, data=data, headers=JSON_HEADERS) as resp:
                body = await resp.read()  # drained so the connection returns to the pool
                return BackendAnswer(resp.status, resp.headers.get("Content-Type", "application/json"), body)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise BackendFailure(prefill, _describe(e)) from None

    async def _open_decode(self, decode: Backend, endpoint: str, data: bytes, stream: bool) -> DecodeStart:
        try:
            resp = await self.session.post(decode.url + endpoint, data=data, headers=JSON_HEADERS)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise BackendFailure(decode, _describe(e)) from None
        ctype = resp.headers.get("Content-Type", "application/json")
        try:
            if resp.status >= 500:
                body = await resp.read()
                text = body[:300].decode(errors="replace")
                raise BackendFailure(decode, f"HTTP {resp.status}: {text}", BackendAnswer(resp.status, ctype, body))
            if not stream or resp.status != 200:
                return DecodeStart(resp.status, ctype, None, await resp.read())
            first = await resp.content.readany()
            if not first:
                raise BackendFailure(decode, "stream closed before the first token")
            return DecodeStart(resp.status, ctype, resp, first)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            resp.close()
            raise BackendFailure(decode, _describe(e)) from None
        except BaseException:
            resp.close()
            raise

    def abort(self, rid: str, backends: list[Backend]) -> asyncio.Task:
        """Abort `rid` on `backends` in the background (survives the cancellation of the caller)."""
        task = asyncio.create_task(self._abort(rid, backends))
        self._keep(task)
        return task

    async def _abort(self, rid: str, backends: list[Backend]) -> None:
        payload = orjson.dumps({"rid": rid})
        timeout = aiohttp.ClientTimeout(total=self.abort_timeout_s)

        async def one(b: Backend) -> None:
            try:
                async with self.session.post(
                    b.url + "/abort_request", data=payload, headers=JSON_HEADERS, timeout=timeout
                ) as resp:
                    await resp.read()
                    if resp.status != 200:
                        log.warning("abort %s on %s answered %s", rid, b.name, resp.status)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                log.warning("abort %s on %s failed: %s", rid, b.name, _describe(e))

        await asyncio.gather(*(one(b) for b in backends))


def _check_prefill(prefill: Backend, answer: BackendAnswer) -> None:
    if answer.status >= 500:
        raise BackendFailure(prefill, f"HTTP {answer.status}: {answer.body[:300].decode(errors='replace')}", answer)
    if answer.status >= 400:
        raise PrefillRejected(answer)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
