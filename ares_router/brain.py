"""The brain of a multi-process router (`--workers N`, N >= 2): the poller, the snapshot, the policy, the
rebalancer and migration control in one process, and N relay worker processes (`ares_router.workers`) that serve
the clients on the router's port and ask the brain over the local channel (`ares_router.brain_channel`).

The brain is a `Router` (`app.py`) whose requests are relayed elsewhere: its decisions are the single-process
router's own code (`Dispatch._choose`, `_hold_while_full`, `MigrationControl`'s rebalancing loop and
`/ares/migrate` checks), fed with the workers' bookkeeping: each relayed request is a `RemoteFlight` (which worker
relays it, its endpoint, where it runs now), its `Tracked` row in `RouterState` gets the workers' token counts. A
move is decided here and carried out by the worker that relays the request (`_migrate`), because the target's
stream must be read where the client's connection is.

HTTP: the brain's own app (every admin route of `Router`, plus `GET /ares/workers`) listens on a unix socket in a
private run directory; workers forward every non-generation path there, after checking keys. `/metrics` is the
brain's registry with every worker's counters and histograms added in (`merge_metrics`): one scrape of any worker
shows the whole router.
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
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from ares_router.admin import json_response
from ares_router.app import Router
from ares_router.brain_channel import Channel, ChannelClosed, RemoteError, serve
from ares_router.config import RouterConfig
from ares_router.migration import Hop
from ares_router.protocol import ParsedRequest
from ares_router.state import Backend
from ares_router.workers import CHANNEL_SOCKET, CONFIG_FILE, HTTP_SOCKET, reuseport_socket

log = logging.getLogger("ares_router.brain")

WORKER_START_TIMEOUT_S = 120.0
SUPERVISE_INTERVAL_S = 0.5


@dataclass
class _Moving:
    """A move under way in a worker, as `InFlight.pending()` describes one."""

    mid: str
    target: str
    state: str = "starting"


@dataclass
class RemoteFlight:
    """A request a worker relays, as the brain's migration control sees it (the parts of `InFlight` it reads)."""

    rid: str  # the first backend rid
    worker: int
    endpoint: str
    why: str | None  # why it cannot move (`splice.not_migratable`), None if it can
    client_rid: str
    hops: list[Hop]  # where it ran and runs, under which backend rid
    moving: _Moving | None = None  # set while a move is under way

    @property
    def decode(self) -> Backend:
        return self.hops[-1].decode

    @property
    def backend_rid(self) -> str:
        return self.hops[-1].rid

    def pending(self) -> _Moving | None:
        return self.moving


@dataclass
class RemoteMigration:
    """A move a worker carried out: its record (`Migration.record()`), as `MigrationControl` reads it."""

    rec: dict

    @property
    def state(self) -> str:
        return self.rec["state"]

    @property
    def reason(self) -> str | None:
        return self.rec.get("reason")

    def record(self) -> dict:
        return self.rec


@dataclass
class WorkerLink:
    """One worker as the brain knows it."""

    index: int
    proc: subprocess.Popen | None = None
    channel: Channel | None = None
    pid: int | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    dispatched: int = 0
    starts: int = 0  # times this worker was started (restarts after a crash add one)


def merge_metrics(registry: CollectorRegistry, workers: list[list[dict]]) -> bytes:
    """Prometheus text of `registry` with the workers' counters and histograms (`RelayWorker._metrics_cmd`) added
    sample by sample (same name and labels: summed). Gauges are the brain's own; `_created` samples are dropped
    (a sum of creation times means nothing)."""
    sums: dict[str, dict[tuple, float]] = {}
    meta: dict[str, tuple[str, str]] = {}
    for families in workers:
        for f in families:
            if f["t"] not in ("counter", "histogram"):
                continue
            meta.setdefault(f["n"], (f["d"], f["t"]))
            into = sums.setdefault(f["n"], {})
            for name, labels, value in f["s"]:
                key = (name, tuple(sorted(labels.items())))
                into[key] = into.get(key, 0.0) + value
    families: list[Metric] = []
    for fam in registry.collect():
        extra = sums.pop(fam.name, None)
        if extra is None:
            families.append(fam)
            continue
        values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}
        for key, v in extra.items():
            values[key] = values.get(key, 0.0) + v
        families.append(_family(fam.name, fam.documentation, fam.type, values))
    for name, extra in sums.items():
        families.append(_family(name, *meta[name], extra))

    class _All:
        def collect(self) -> list[Metric]:
            return families

    out = CollectorRegistry(auto_describe=False)
    out.register(_All())
    return generate_latest(out)


def _family(name: str, doc: str, kind: str, values: dict[tuple, float]) -> Metric:
    m = Metric(name, doc, kind)
    for (sample, labels), v in values.items():
        if not sample.endswith("_created"):
            m.add_sample(sample, dict(labels), v)
    return m


class Brain(Router):
    """The router's decisions for N relay workers (module docstring)."""

    def __init__(self, config: RouterConfig, n_workers: int):
        super().__init__(config)
        self.links = {i: WorkerLink(i) for i in range(n_workers)}
        self.stopping = False
        self.handlers = {
            "ready": self._on_ready, "choose": self._on_choose, "models": self._on_models, "start": self._on_start,
            "end": self._on_end, "tokens": self._on_tokens, "moved": self._on_moved, "failed": self._on_failed,
            "head": self._on_head,
        }  # fmt: skip

    # -- HTTP ----------------------------------------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        app = super().build_app()
        app.router.add_get("/ares/workers", self.workers_list)
        return app

    def _authorize(self, request: web.Request) -> None:
        """Keys were checked by the worker that forwarded the request; the brain's socket is in a private
        directory."""

    async def prometheus(self, request: web.Request) -> web.Response:
        """The brain's metrics with every connected worker's counters and histograms added in."""
        links = [k for k in self.links.values() if k.channel is not None and not k.channel.closed]
        answers = await asyncio.gather(*(k.channel.call("metrics", timeout=5.0) for k in links), return_exceptions=True)
        parts = [a for a in answers if isinstance(a, list)]
        return web.Response(
            body=merge_metrics(self.metrics.registry, parts), headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    async def workers_list(self, request: web.Request) -> web.Response:
        """`GET /ares/workers`: each relay worker, its process, whether it is connected, requests it sent."""
        inflight: dict[int, int] = {}
        for f in self.inflight.values():
            inflight[f.worker] = inflight.get(f.worker, 0) + 1
        rows = [
            {"worker": k.index, "pid": k.pid, "connected": k.channel is not None and not k.channel.closed,
             "dispatched": k.dispatched, "inflight": inflight.get(k.index, 0), "starts": k.starts}
            for k in self.links.values()
        ]  # fmt: skip
        return json_response({"workers": rows})

    # -- migration control: the move runs in the worker that relays the request ----------------------------------------
    @staticmethod
    def _why_not_migratable(flight) -> str | None:  # noqa: ANN001 - a RemoteFlight
        return flight.why

    async def _migrate(self, flight, target: Backend) -> RemoteMigration:  # noqa: ANN001 - a RemoteFlight
        link = self.links.get(flight.worker)
        flight.moving = _Moving(f"(in worker {flight.worker})", target.name)
        try:
            if link is None or link.channel is None:
                raise ChannelClosed("worker gone")
            rec = await link.channel.call("migrate", {"rid": flight.rid, "to": target.index})
        except (ChannelClosed, RemoteError) as e:
            rec = {"mid": None, "rid": flight.rid, "source": flight.decode.name, "target": target.name,
                   "state": "failed", "reason": f"worker {flight.worker}: {e}"}  # fmt: skip
        finally:
            flight.moving = None
        rec = {**rec, "worker": flight.worker}
        self.migration_log = [*self.migration_log[-255:], rec]  # the worker logged it and counted it in metrics
        return RemoteMigration(rec)

    # -- the channel --------------------------------------------------------------------------------------------------
    def _on_ready(self, msg: dict) -> None:
        link = self.links[int(msg["x"])]
        link.pid = msg.get("pid")
        link.ready.set()

    def _link_of(self, channel: Channel) -> WorkerLink | None:
        return next((k for k in self.links.values() if k.channel is channel), None)

    def _on_choose(self, msg: dict):  # noqa: ANN202 - a dict, or an awaitable of one when the request is held
        parsed = ParsedRequest("", {}, False, int(msg["pt"]), msg["mt"])
        pinned = None if msg["pin"] is None else self.state.decodes[int(msg["pin"])]
        if msg["hold"] and self.state.policy.hold_when_full:
            return self._held_choice(parsed, msg)
        return self._choice(parsed, msg, pinned)

    async def _held_choice(self, parsed: ParsedRequest, msg: dict) -> dict:
        await self._hold_while_full(parsed, None)
        return self._choice(parsed, msg, None)  # no await in between: placed as soon as it may be

    def _choice(self, parsed: ParsedRequest, msg: dict, pinned: Backend | None) -> dict:
        failure = msg["f"]  # `_unavailable` only words its message with it
        p, d = self._choose(parsed, list(msg["xd"]), list(msg["xp"]), failure, pinned)
        return {"p": p.index, "d": d.index, "h": d.load is not None and d.load.source == "ares_state"}

    async def _on_models(self, msg: dict) -> list[str] | None:
        served = await self.poller.refresh_models()
        return None if served is None else sorted(served)

    def _on_start(self, msg: dict) -> None:
        rid, worker = msg["r"], self._worker_of(msg)
        self.state.start(rid, int(msg["d"]), int(msg["p"]), int(msg["pt"]), msg["mt"])
        flight = RemoteFlight(rid, worker, msg["e"], msg["w"], msg["c"], [Hop(rid, self.state.decodes[int(msg["d"])])])
        self.inflight[rid] = flight  # type: ignore[assignment]
        self.hop_rids[rid] = rid
        self.client_rids[msg["c"]] = rid
        self.links[worker].dispatched += 1

    def _worker_of(self, msg: dict) -> int:
        return int(msg["_w"])

    def _on_end(self, msg: dict) -> None:
        self._forget(msg["r"], msg["b"])

    def _forget(self, rid: str, current: str) -> None:
        self.state.finish(current)
        flight = self.inflight.pop(rid, None)
        self.gate.forget([rid])
        if flight is None:
            return
        for hop in flight.hops:
            self.hop_rids.pop(hop.rid, None)
        if self.client_rids.get(flight.client_rid) == rid:  # type: ignore[attr-defined]
            del self.client_rids[flight.client_rid]  # type: ignore[attr-defined]

    def _on_tokens(self, msg: dict) -> None:
        requests = self.state.requests
        for rid, n in msg["g"].items():
            t = requests.get(rid)
            if t is not None:
                t.generated = n
                t.started = True

    def _on_moved(self, msg: dict) -> None:
        old, new, d = msg["old"], msg["new"], int(msg["d"])
        first = self.hop_rids.get(old, old)
        self.state.move(old, d, new_rid=new)
        self.hop_rids[new] = first
        flight = self.inflight.get(first)
        if flight is not None:
            flight.hops.append(Hop(new, self.state.decodes[d]))

    def _on_failed(self, msg: dict) -> None:
        backends = self.state.decodes if msg["role"] == "decode" else self.state.prefills
        self.state.mark_failed(backends[int(msg["x"])], msg["err"])

    def _on_head(self, msg: dict) -> None:
        d = self.state.decodes[int(msg["d"])]
        Router._record_head_error(self, msg["b"], d, lambda: (int(msg["t"]), str(msg["s"])))

    def _on_lost(self, channel: Channel) -> None:
        """A worker's connection ended (it stopped or crashed): its requests are gone with it."""
        link = self._link_of(channel)
        if link is None:
            return
        link.channel = None
        link.ready.clear()
        for rid, f in list(self.inflight.items()):
            if f.worker == link.index:  # type: ignore[attr-defined]
                self._forget(rid, f.backend_rid)
        if not self.stopping:
            log.warning("worker %d disconnected", link.index)


class _Tagging(Channel):
    """The brain's end of one worker's channel: tags each message with the worker's index (from its `ready`), so
    handlers know who sent it, and links the channel to that worker."""

    def __init__(self, brain: Brain):
        super().__init__(brain.handlers, brain._on_lost, "brain")
        self.brain = brain
        self.worker: int | None = None

    def _dispatch(self, msg: dict) -> None:
        if msg.get("k") == "ready":
            self.worker = int(msg["x"])
            self.brain.links[self.worker].channel = self
            self.name = f"brain-w{self.worker}"
        msg["_w"] = self.worker
        super()._dispatch(msg)


def _spawn(rundir: Path, index: int) -> subprocess.Popen:
    """Start worker `index` (same process group as the brain: stopping the router's group stops it too)."""
    return subprocess.Popen([sys.executable, "-m", "ares_router.workers", str(rundir), str(index)])


async def _supervise(brain: Brain, rundir: Path) -> None:
    """Restart a worker that exited while the router runs (its requests ended with it; the brain forgot them)."""
    while True:
        await asyncio.sleep(SUPERVISE_INTERVAL_S)
        for link in brain.links.values():
            # A worker ends cleanly (0) only when told to (SIGTERM, from the brain or from whoever stops the router's
            # process group): only a crash (an error, a signal it does not handle) is restarted.
            if link.proc is None or link.proc.poll() is None or link.proc.returncode in (0, -signal.SIGTERM):
                continue
            if not brain.stopping:
                log.error("worker %d (pid %s) exited with %s; starting it again", link.index, link.proc.pid,
                          link.proc.returncode)  # fmt: skip
                link.proc = _spawn(rundir, link.index)
                link.starts += 1


async def _stop_workers(brain: Brain) -> None:
    brain.stopping = True
    procs = [k.proc for k in brain.links.values() if k.proc is not None and k.proc.poll() is None]
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + 10.0
    for p in procs:
        try:
            await asyncio.to_thread(p.wait, max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            await asyncio.to_thread(p.wait)


async def serve_workers(config: RouterConfig, ready: Callable[[int], None] | None = None) -> None:
    """Run the brain and `config.workers` relay workers until cancelled; `ready(port)` once all of them listen."""
    rundir = Path(tempfile.mkdtemp(prefix="ares-router-"))  # mode 0700: only this user reaches the brain
    brain = Brain(config, config.workers)
    runner = web.AppRunner(brain.build_app(), handler_cancellation=True, access_log=log if config.access_log else None)
    reserve = reuseport_socket(config.host, config.port)  # the port, before any worker: 0 picks a free one
    port = reserve.getsockname()[1]
    server = None
    supervisor = None
    try:
        await runner.setup()
        await web.UnixSite(runner, str(rundir / HTTP_SOCKET)).start()
        server = await serve(str(rundir / CHANNEL_SOCKET), lambda: _Tagging(brain))
        (rundir / CONFIG_FILE).write_bytes(pickle.dumps(replace(config, port=port)))
        for link in brain.links.values():
            link.proc = _spawn(rundir, link.index)
            link.starts = 1
        supervisor = asyncio.create_task(_supervise(brain, rundir))
        try:
            await asyncio.wait_for(
                asyncio.gather(*(k.ready.wait() for k in brain.links.values())), WORKER_START_TIMEOUT_S
            )
        except asyncio.TimeoutError:
            raise RuntimeError(f"relay workers not listening after {WORKER_START_TIMEOUT_S:.0f} s") from None
        reserve.close()  # the workers hold the port now
        log.info("ARES router listening on http://%s:%d (%d relay workers, brain pid in this process)",
                 config.host, port, config.workers)  # fmt: skip
        if ready is not None:
            ready(port)
        await asyncio.Event().wait()
    finally:
        if supervisor is not None:
            supervisor.cancel()
        await _stop_workers(brain)
        reserve.close()
        if server is not None:
            server.close()
        await runner.cleanup()
        shutil.rmtree(rundir, ignore_errors=True)


__all__ = ["Brain", "RemoteFlight", "merge_metrics", "serve_workers"]
