"""The processes of a multi-process router: the brain's host (`serve_brain`: the brain here, `--workers N` relay
workers started and restarted by it, and with `--brain-listen` relays of other hosts over TCP) and a relay host
(`serve_relays`, `--relay-of HOST:PORT`: only relay workers, for a brain elsewhere). `docs/router-workers.md`.

Workers are `python -m ares_router.workers RUNDIR INDEX` processes in the starting process's process group (so
whoever stops the router's group stops them too), configured by RUNDIR/config.pkl; RUNDIR is a private temporary
directory (mode 0700) that also holds the brain's unix sockets, removed at exit.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from aiohttp import web

from ares_router.brain import Brain, _Tagging
from ares_router.brain_channel import serve
from ares_router.config import RouterConfig
from ares_router.workers import CHANNEL_SOCKET, CONFIG_FILE, HTTP_SOCKET, reuseport_socket

log = logging.getLogger("ares_router.multiproc")

WORKER_START_TIMEOUT_S = 120.0
SUPERVISE_INTERVAL_S = 0.5
RESTART_RESET_S = 60.0  # a worker that ran this long since its restart is restarted at once again
RESTART_BACKOFF_MAX_S = 30.0


class _Proc(Protocol):
    index: int
    proc: subprocess.Popen | None
    starts: int


class _Local:
    """One of a relay host's workers (the brain's host keeps its own in `Brain.links`)."""

    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.starts = 0


def spawn(rundir: Path, index: int) -> subprocess.Popen:
    """Start worker `index` of this host (in this process's group)."""
    return subprocess.Popen([sys.executable, "-m", "ares_router.workers", str(rundir), str(index)])


async def supervise(procs: Callable[[], list[_Proc]], rundir: Path, stopping: Callable[[], bool]) -> None:
    """Restart a worker that crashed. A worker ends cleanly (0) only when told to (SIGTERM, from its parent or from
    whoever stops the router's process group), so only other ends (an error, a signal it does not handle) count.
    The first restart is at once; a worker that crashes again within `RESTART_RESET_S` of its restart waits twice as
    long each time, up to `RESTART_BACKOFF_MAX_S` (one that cannot start is not spawned twice a second forever)."""
    delay: dict[int, float] = {}  # worker -> the wait before its next restart
    due: dict[int, float] = {}  # worker -> when its pending restart may happen
    restarted: dict[int, float] = {}  # worker -> when it was last restarted
    while True:
        await asyncio.sleep(SUPERVISE_INTERVAL_S)
        for w in procs():
            if w.proc is None or w.proc.poll() is None or w.proc.returncode in (0, -signal.SIGTERM) or stopping():
                continue
            now = time.monotonic()
            if w.index not in due:
                if now - restarted.get(w.index, -float("inf")) > RESTART_RESET_S:
                    delay[w.index] = 0.0  # ran a good while (or never restarted): restart at once
                due[w.index] = now + delay.get(w.index, 0.0)
                delay[w.index] = min(max(2 * delay.get(w.index, 0.0), SUPERVISE_INTERVAL_S), RESTART_BACKOFF_MAX_S)
                log.error("worker %d (pid %d) exited with %s; starting it again in %.1f s", w.index, w.proc.pid,
                          w.proc.returncode, due[w.index] - now)  # fmt: skip
            if now < due[w.index]:
                continue
            del due[w.index]
            restarted[w.index] = now
            w.proc = spawn(rundir, w.index)
            w.starts += 1


async def stop_all(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM every live one, then SIGKILL what is left after `grace_s`."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            await asyncio.to_thread(p.wait, max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            await asyncio.to_thread(p.wait)


def _rundir(config: RouterConfig, port: int) -> Path:
    rundir = Path(tempfile.mkdtemp(prefix="ares-router-"))  # mode 0700: only this user reaches the brain
    (rundir / CONFIG_FILE).write_bytes(pickle.dumps(replace(config, port=port)))
    return rundir


async def serve_brain(config: RouterConfig, ready: Callable[[int], None] | None = None) -> None:
    """The brain and this host's `config.workers` relay workers (and, with `config.brain_listen`, relays of other
    hosts), until cancelled; `ready(port)` once this host's workers listen."""
    reserve = reuseport_socket(config.host, config.port) if config.workers else None  # 0 picks a free port
    port = reserve.getsockname()[1] if reserve is not None else config.port
    rundir = _rundir(config, port)
    brain = Brain(config, config.workers, rundir)
    runner = web.AppRunner(brain.build_app(), handler_cancellation=True, access_log=log if config.access_log else None)
    servers: list[asyncio.AbstractServer] = []
    supervisor = None
    try:
        await runner.setup()
        await web.UnixSite(runner, str(rundir / HTTP_SOCKET)).start()
        servers.append(await serve(str(rundir / CHANNEL_SOCKET), lambda: _Tagging(brain, tcp=False)))
        if config.brain_listen:
            servers.append(await serve(config.brain_listen, lambda: _Tagging(brain, tcp=True)))
            log.info("brain takes relay workers of other hosts on %s", config.brain_listen)
        for link in list(brain.links.values()):
            link.proc, link.starts = spawn(rundir, link.index), 1
        supervisor = asyncio.create_task(
            supervise(lambda: [k for k in brain.links.values() if not k.remote], rundir, lambda: brain.stopping)  # type: ignore[misc]
        )
        local = [k.ready.wait() for k in brain.links.values() if not k.remote]  # a relay of another host may be here
        try:
            await asyncio.wait_for(asyncio.gather(*local), WORKER_START_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RuntimeError(f"relay workers not listening after {WORKER_START_TIMEOUT_S:.0f} s") from None
        if reserve is not None:
            reserve.close()  # the workers hold the port now
        log.info(
            "ARES router listening on http://%s:%d (%d relay workers, one brain)", config.host, port, config.workers
        )
        if ready is not None:
            ready(port)
        await asyncio.Event().wait()
    finally:
        brain.stopping = True
        if supervisor is not None:
            supervisor.cancel()
        await stop_all([k.proc for k in brain.links.values() if k.proc is not None])
        if reserve is not None:
            reserve.close()
        for server in servers:
            server.close()  # stops listening; the connections it accepted are closed here:
        for k in list(brain.links.values()):
            if k.channel is not None:
                k.channel.close()  # relays of other hosts see the brain go away (and stop) now
        await runner.cleanup()
        shutil.rmtree(rundir, ignore_errors=True)


async def serve_relays(config: RouterConfig, ready: Callable[[int], None] | None = None) -> None:
    """`config.workers` relay workers on this host's `config.port` for the brain at `config.relay_of`, until
    cancelled; `ready(port)` once all listen. They stop when the brain goes away (and are then restarted here
    only if they crashed)."""
    reserve = reuseport_socket(config.host, config.port)
    port = reserve.getsockname()[1]
    rundir = _rundir(config, port)
    workers = [_Local(i) for i in range(config.workers)]
    stopping = False
    supervisor = None
    try:
        for w in workers:
            w.proc, w.starts = spawn(rundir, w.index), 1
        supervisor = asyncio.create_task(supervise(lambda: workers, rundir, lambda: stopping))  # type: ignore[arg-type]
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while not all((rundir / f"listening.{w.index}").exists() for w in workers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"relay workers not listening after {WORKER_START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.1)
        reserve.close()
        log.info("ARES relay workers (%d) listening on http://%s:%d for the brain at %s", config.workers, config.host,
                 port, config.relay_of)  # fmt: skip
        if ready is not None:
            ready(port)
        while any(w.proc is not None and w.proc.poll() is None for w in workers):
            await asyncio.sleep(SUPERVISE_INTERVAL_S)  # all ended cleanly: the brain went away
        log.warning("every relay worker ended (the brain at %s went away)", config.relay_of)
    finally:
        stopping = True
        if supervisor is not None:
            supervisor.cancel()
        await stop_all([w.proc for w in workers if w.proc is not None])
        reserve.close()
        shutil.rmtree(rundir, ignore_errors=True)
