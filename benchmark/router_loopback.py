"""Shared pieces of the router benchmarks (`router_overhead.py`, `router_vs_sglang.py`): a loopback PD backend that
answers instantly or streams at a fixed token rate, a lean HTTP/1.1 load client, process and /proc helpers.

Loopback backend (its own process: `python benchmark/router_loopback.py PREFILL_PORT DECODE_PORT [--stream-chunks
N] [--token-interval S]`): SGLang's endpoints on two ports, prefill and decode role. `/v1/chat/completions` answers a
non-streaming request with one fixed chat completion, and a streaming one with `--stream-chunks` SSE events at once
(the prefill port: one event, as a PD prefill server). A streaming request with `max_tokens` (or
`max_completion_tokens`, SGLang's router's name for it) above `INSTANT_MAX_TOKENS` is *paced* instead: that many
events, one per `--token-interval` (0.1 s: 10 tok/s), written on a shared tick the way a decode server's batch step
emits one token to every running request at once. Each paced event's text is `t=<CLOCK_MONOTONIC at write>`, so a
client on the same machine tells the gaps the backend itself made from the gaps added on the way (the stamp is in
the content, which every router relays unchanged).

Load client (`HttpConn`): one keep-alive connection, requests written as preformatted bytes, answers parsed with
the poller's HTTP parser. aiohttp's client costs ~150 us of CPU per request; on a 2-core machine that would make the
client, not the router, the bottleneck of a throughput run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ares.cluster.launcher import stop_groups
from ares_router.pollclient import _parse as parse_http_response  # the poller's parser: chunked, length, eof

HOST = "127.0.0.1"
INSTANT_MAX_TOKENS = 16  # streamed requests asking for more tokens are paced at the backend's token rate
_STAMP = re.compile(rb"t=(\d+\.\d+)\"")  # a paced event's stamp; the closing quote: only whole numbers match


# ---------------------------------------------------------------------------------------------------------------
# Loopback backend
# ---------------------------------------------------------------------------------------------------------------
def completion_chunk(i: int) -> bytes:
    """One SSE event of a streamed chat completion carrying token `i`."""
    delta = {"content": f"tok{i} "}
    chunk = {"id": "x", "object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": delta}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


_PACED_HEAD = b'data: {"id":"x","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"'


class _Ticker:
    """Wakes every paced stream at once every `interval` s (a decode batch step)."""

    def __init__(self, interval: float):
        self.interval = interval
        self._fut: asyncio.Future | None = None

    def next_tick(self) -> asyncio.Future:
        if self._fut is None:
            self._fut = asyncio.get_running_loop().create_future()
        return self._fut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += self.interval
            await asyncio.sleep(max(0.0, due - loop.time()))
            fut, self._fut = self._fut, None
            if fut is not None:
                fut.set_result(None)


async def loopback_backend(prefill_port: int, decode_port: int, chunks: int, token_interval: float = 0.1) -> None:
    """Serve the prefill and decode roles on the two ports forever (see the module docstring)."""
    from aiohttp import web

    usage = {"prompt_tokens": 8, "completion_tokens": chunks, "total_tokens": 8 + chunks}
    message = {"role": "assistant", "content": " ".join(f"tok{i}" for i in range(chunks))}
    whole = json.dumps(
        {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": message}], "usage": usage}
    ).encode()
    streams = {  # a PD prefill server answers with its single token; the decode server streams the rest
        prefill_port: [completion_chunk(0), b"data: [DONE]\n\n"],
        decode_port: [completion_chunk(i) for i in range(chunks)] + [b"data: [DONE]\n\n"],
    }
    loads = json.dumps(
        {"loads": [{"num_running_reqs": 0, "num_used_tokens": 0, "max_total_num_tokens": 100000}]}
    ).encode()
    ticker = _Ticker(token_interval)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=whole, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        port = request.transport.get_extra_info("sockname")[1]
        # SGLang's router forwards OpenAI's newer name for it.
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)
        if port == decode_port and n > INSTANT_MAX_TOKENS:
            for _ in range(n):
                await ticker.next_tick()
                await resp.write(_PACED_HEAD + b"t=%.6f" % time.monotonic() + b'"}}]}\n\n')
            await resp.write(b"data: [DONE]\n\n")
        else:
            for part in streams[port]:
                await resp.write(part)
        await resp.write_eof()
        return resp

    async def ok_json(request: web.Request) -> web.Response:
        return web.Response(body=loads, content_type="application/json")

    async def not_found(request: web.Request) -> web.Response:
        return web.Response(status=404)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    tick_task = asyncio.create_task(ticker.run())  # noqa: F841 (kept referenced: the loop holds tasks weakly)
    for port in (prefill_port, decode_port):
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/v1/loads", ok_json)
        app.router.add_get("/ares/state", not_found)
        app.router.add_get("/health", ok_json)
        app.router.add_get("/v1/models", models)
        app.router.add_post("/abort_request", ok_json)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port, backlog=4096).start()
    await asyncio.Event().wait()


def start_backend(
    prefill_port: int, decode_port: int, chunks: int, token_interval: float, log: Path
) -> subprocess.Popen:
    """The loopback backend in its own process (own session, so `stop` ends it by its PID's group)."""
    return subprocess.Popen(
        [sys.executable, __file__, str(prefill_port), str(decode_port), "--stream-chunks", str(chunks),
         "--token-interval", str(token_interval)],
        start_new_session=True,
        stdout=open(log, "wb"),  # noqa: SIM115 (the child owns it)
        stderr=subprocess.STDOUT,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------
def raise_nofile() -> None:
    """Thousands of client connections (and children inherit the limit: the routers under test too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_http(url: str, timeout_s: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Until `url` answers 200 (raises after `timeout_s`, or at once when `proc` has exited)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited ({proc.returncode}) before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} not healthy after {timeout_s}s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started with `start_new_session=True` by its PID (its group: SIGTERM, then SIGKILL)."""
    stop_groups([(proc.pid, None)], grace_s=10)
    proc.wait()


_TICK = os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """User + system CPU time of `pid` (all its threads) and, with `tree`, of its live descendants, from
    /proc/<pid>/stat: what the process itself burnt, whatever language it runs."""
    pids = [pid]
    if tree:
        kids = _children()
        i = 0
        while i < len(pids):
            pids += kids.get(pids[i], [])
            i += 1
    total = 0
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
    return total / _TICK


# ---------------------------------------------------------------------------------------------------------------
# Load client
# ---------------------------------------------------------------------------------------------------------------
def post_bytes(base: str, path: str, body: dict) -> tuple[str, int, bytes]:
    """(host, port, preformatted HTTP/1.1 POST) for `body` as JSON."""
    from urllib.parse import urlsplit

    u = urlsplit(base)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nContent-Type: application/json\r\n"
        f"Accept: */*\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    return u.hostname or HOST, u.port or 80, head + data


class HttpConn(asyncio.Protocol):
    """One keep-alive client connection, one request at a time. With `stamps` set, the arrival time of every paced
    event (`t=` stamp) of the current response is recorded as (arrival, stamp) pairs."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.eof = False
        self.stamps: list[tuple[float, float]] | None = None
        self._scan = 0  # where the stamp scan of `buf` goes on
        self.first_byte: float | None = None

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConn:
        _, conn = await asyncio.get_running_loop().create_connection(cls, host, port)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if self.first_byte is None:
            self.first_byte = now
        self.buf += data
        if self.stamps is not None:
            for m in _STAMP.finditer(self.buf, self._scan):
                self.stamps.append((now, float(m.group(1))))
                self._scan = m.end()
        self._deliver()

    def eof_received(self) -> bool:
        self.eof = True
        self._deliver()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._deliver(exc or ConnectionResetError("closed"))

    def _deliver(self, lost: Exception | None = None) -> None:
        w = self.waiter
        if w is None or w.done():
            return
        # A stream is parsed only once its end can be in the buffer: the chunked parse is O(buffer).
        if self.stamps is not None and not self.eof and not self.buf.endswith(b"0\r\n\r\n"):
            return
        try:
            parsed = parse_http_response(self.buf, self.eof)
        except ValueError as e:
            w.set_exception(e)
            return
        if parsed is not None:
            status, body, used, _ = parsed
            del self.buf[:used]
            self._scan = 0
            w.set_result((status, body))
        elif lost is not None:
            w.set_exception(lost)

    async def request(self, raw: bytes, stamps: list[tuple[float, float]] | None = None) -> tuple[int, bytes]:
        """Send one preformatted request; (status, body) once the whole answer is in."""
        assert self.transport is not None
        self.stamps, self._scan, self.first_byte = stamps, 0, None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        try:
            return await self.waiter
        finally:
            self.waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def use_uvloop() -> None:
    """Run asyncio on uvloop where it is installed (SGLang depends on it; `python -m ares_router` runs on it): a
    cheaper loop in a benchmark's client or backend leaves more of the 2 cores to the router it measures."""
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def main() -> int:
    p = argparse.ArgumentParser(description="the loopback PD backend (see the module docstring)")
    p.add_argument("prefill_port", type=int)
    p.add_argument("decode_port", type=int)
    p.add_argument("--stream-chunks", type=int, default=16, help="SSE events per instantly streamed response")
    p.add_argument("--token-interval", type=float, default=0.1, help="seconds between a paced stream's events")
    args = p.parse_args()
    raise_nofile()
    use_uvloop()
    asyncio.run(loopback_backend(args.prefill_port, args.decode_port, args.stream_chunks, args.token_interval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
