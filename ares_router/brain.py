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
import hmac
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from ares_router.admin import json_response
from ares_router.app import Router
from ares_router.brain_channel import Channel, ChannelClosed, RemoteError
from ares_router.config import RouterConfig
from ares_router.migration import Hop, OnHops
from ares_router.protocol import ParsedRequest
from ares_router.state import Backend
from ares_router.workers import HTTP_SOCKET

log = logging.getLogger("ares_router.brain")


@dataclass
class _Moving:
    """A move under way in a worker, as `InFlight.pending()` describes one."""

    mid: str
    target: str
    state: str = "starting"


@dataclass
class RemoteFlight(OnHops):
    """A request a worker relays, as the brain's migration control sees it (the parts of `InFlight` it reads)."""

    rid: str  # the first backend rid
    worker: int
    endpoint: str
    why: str | None  # why it cannot move (`wire.not_migratable`), None if it can
    client_rid: str
    hops: list[Hop]  # where it ran and runs, under which backend rid
    moving: _Moving | None = None  # set while a move is under way

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
    remote: bool = False  # a relay of another host (`--relay-of`)
    proc: subprocess.Popen | None = None  # this host's workers: the process the brain started
    channel: Channel | None = None
    pid: int | None = None
    host: str | None = None
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

    def __init__(self, config: RouterConfig, n_workers: int, rundir: Path | None = None):
        super().__init__(config)
        self.links = {i: WorkerLink(i) for i in range(n_workers)}  # this host's; relays of other hosts join later
        self.rundir = rundir
        self.stopping = False
        self.handlers = {
            "hello": self._on_hello, "listening": self._on_listening, "choose": self._on_choose,
            "models": self._on_models, "start": self._on_start, "end": self._on_end, "tokens": self._on_tokens,
            "moved": self._on_moved, "failed": self._on_failed, "head": self._on_head, "http": self._on_http,
        }  # fmt: skip
        self._self_http: aiohttp.ClientSession | None = None  # to the brain's own HTTP socket (forwarded calls)

    def link_for(self, channel: Channel, msg: dict, remote: bool) -> int:
        """The index of the worker that says `hello` on `channel`: its own for this host's workers, the next free
        one for a relay of another host."""
        if remote:
            index = max(self.links, default=-1) + 1
            self.links[index] = WorkerLink(index, remote=True)
        else:
            index = int(msg["x"])
        link = self.links[index]
        link.channel, link.pid, link.host = channel, msg.get("pid"), msg.get("host")
        return index

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

    async def _on_startup(self, app: web.Application) -> None:
        await super()._on_startup(app)
        if self.rundir is not None:
            self._self_http = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.rundir / HTTP_SOCKET)),
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,
            )

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._self_http is not None:
            await self._self_http.close()
        await super()._on_cleanup(app)

    async def _on_http(self, msg: dict) -> dict:
        """A worker's forwarded request (any path but generation), through the brain's own HTTP app."""
        assert self._self_http is not None
        headers = {"X-Request-Id": msg["rid"]}
        if msg["ct"]:
            headers["Content-Type"] = msg["ct"]
        async with self._self_http.request(
            msg["m"], "http://brain" + msg["p"], data=msg["b"].encode("latin-1"), headers=headers
        ) as r:
            body = await r.read()
            return {"s": r.status, "ct": r.headers.get("Content-Type", "application/json"), "b": body.decode("latin-1")}

    async def workers_list(self, request: web.Request) -> web.Response:
        """`GET /ares/workers`: each relay worker, its process, whether it is connected, requests it sent."""
        inflight: dict[int, int] = {}
        for f in self.inflight.values():
            inflight[f.worker] = inflight.get(f.worker, 0) + 1
        rows = [
            {"worker": k.index, "host": k.host, "pid": k.pid, "remote": k.remote,
             "connected": k.channel is not None and not k.channel.closed, "dispatched": k.dispatched,
             "inflight": inflight.get(k.index, 0), "starts": k.starts}
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
    def _on_hello(self, msg: dict) -> dict:
        return {"index": msg["_w"]}  # `_Tagging` checked the key and numbered the worker

    def _on_listening(self, msg: dict) -> None:
        self.links[int(msg["_w"])].ready.set()

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
        if link.remote:
            del self.links[link.index]  # a relay of another host that comes back says hello again
        if not self.stopping:
            log.warning("worker %d (%s pid %s) disconnected", link.index, link.host, link.pid)


# What a peer may send before its hello is accepted (a hello is a few hundred bytes; a worker sends nothing else
# until it is answered): a connection that has not said who it is cannot make the brain buffer up to `MAX_FRAME`.
PRE_HELLO_BYTES = 64 * 1024


class _Tagging(Channel):
    """The brain's end of one worker's channel. Its first message must be `hello` (with the shared key over TCP);
    then each message is tagged with the worker's index (`_w`), so handlers know who sent it."""

    def __init__(self, brain: Brain, tcp: bool):
        super().__init__(brain.handlers, brain._on_lost, "brain")
        self.brain = brain
        self.tcp = tcp
        self.worker: int | None = None

    def data_received(self, data: bytes) -> None:
        if self.worker is None and len(self._buf) + len(data) > PRE_HELLO_BYTES:
            log.warning("channel: %d bytes before a hello; dropped", len(self._buf) + len(data))
            self._buf.clear()
            self.close()
            return
        super().data_received(data)

    def _dispatch(self, msg: dict) -> None:
        if self.worker is None:
            key = self.brain.config.brain_key or ""
            if msg.get("k") != "hello" or (self.tcp and not hmac.compare_digest(str(msg.get("key") or ""), key)):
                log.warning("channel: a connection's first message was not a hello with the key; dropped")
                self.close()
                return
            # Over TCP always a relay of another host (a new number): a peer's own word must not let it take over
            # one of this host's workers' links.
            self.worker = self.brain.link_for(self, msg, remote=self.tcp or bool(msg.get("remote")))
            self.name = f"brain-w{self.worker}"
        msg["_w"] = self.worker
        super()._dispatch(msg)
