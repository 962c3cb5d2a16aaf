"""A relay worker of a multi-process router (`--workers N`): one of N processes that accept clients on the router's
port (each its own listening socket with SO_REUSEPORT: the kernel spreads connections over them) and relay
requests, while one brain process (`ares_router.brain`) keeps the poller, the snapshot, the policy, the rebalancer
and migration control.

Per request a worker does what the single-process router does (`dispatch.Dispatch`: parse, send the pair, relay,
retry before the first token, abort on disconnect) and asks the brain only what needs the cluster view, over the
local channel (`ares_router.brain_channel`):
- `choose` (a call): the (prefill, decode) pair; for a `*_hold` policy the brain holds the request first (late
  binding) and answers once it may be placed, so holding and placing stay one step there;
- `start`, `end` (notifications): the request's bookkeeping (the snapshot's own rows, the rebalancer's eligible
  requests, every id `/ares/migrate` may name it by);
- `tokens` (every poll interval): relayed output events of running streams, as the relay counts them;
- `moved`, `failed`, `head`: a committed move, a server that failed a request, the final token count for the
  head's error metric (only for decode servers that report predictions).
The brain calls a worker with `migrate` (move a request this worker relays: the migration protocol runs here,
where the stream is, so the relay splices exactly as in one process) and `metrics` (this worker's counters and
histograms, which the brain adds to its own for `/metrics`). Every other path (admin, `/metrics`, `/health`,
`/ares/*`, `/v1/models`) is forwarded to the brain over the channel (`http`); keys are checked here first.

`python -m ares_router.workers RUNDIR INDEX`: started by `ares_router.multiproc` (the brain's host, or a relay host
with `--relay-of`: then the channel is TCP and the first message carries the shared key); the configuration is in
RUNDIR/config.pkl. `docs/router-workers.md` has the whole picture.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web
from prometheus_client import Counter, Histogram

from ares_router.app import Router
from ares_router.backends import BackendFailure, PDClient
from ares_router.brain_channel import Channel, ChannelClosed, RemoteError, connect
from ares_router.config import RouterConfig
from ares_router.dispatch import MODELS_MISS_REFRESH_S, RID
from ares_router.metrics import RouterMetrics
from ares_router.migration import InFlight, MigrationLimits
from ares_router.policy import get_policy
from ares_router.protocol import ENDPOINTS, APIError, ParsedRequest
from ares_router.state import Backend, Tracked

log = logging.getLogger("ares_router.worker")

CHANNEL_SOCKET = "brain.sock"  # in the run directory: the channel
HTTP_SOCKET = "brain.http"  # the brain's HTTP (admin) app, which the brain forwards the workers' admin calls to
CONFIG_FILE = "config.pkl"
WORKER_HEADER = "X-Ares-Worker"  # every answer names the worker that served it


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, so that every worker (and the brain, which reserves the
    port first) binds the same port; the kernel spreads incoming connections over the listening ones."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class WorkerState:
    """What a worker keeps of `RouterState`: the server lists (names, URLs, bootstrap ports), the policy's name,
    and its own requests' bookkeeping, which it reports to the brain. No snapshot: the brain decides."""

    def __init__(self, config: RouterConfig):
        self.prefills = [Backend("prefill", i, url.rstrip("/"), port) for i, (url, port) in enumerate(config.prefill)]
        self.decodes = [Backend("decode", i, url.rstrip("/")) for i, url in enumerate(config.decode)]
        self.policy = get_policy(config.policy)
        self.requests: dict[str, Tracked] = {}
        self.served: frozenset[str] | None = None  # model ids, as the brain last answered
        self.heads: set[int] = set()  # decode servers that report the head's predictions (the brain says so)
        self.channel: Channel | None = None
        self.reported: dict[str, int] = {}  # rid -> output events last reported to the brain
        self._seq = itertools.count()

    def notify(self, kind: str, fields: dict) -> None:
        """A notification to the brain (dropped when the brain is gone: the worker is ending then)."""
        if self.channel is not None:
            self.channel.send(kind, fields)

    def start(self, rid: str, decode: int, prefill: int, prompt_tokens: int, max_tokens: int | None) -> Tracked:
        """Track a request just sent (the brain hears of it with the flight, `RelayWorker._flight_started`)."""
        t = Tracked(rid, decode, prefill, prompt_tokens, max_tokens, seq=next(self._seq))
        self.requests[rid] = t
        return t

    def finish(self, rid: str) -> None:
        self.requests.pop(rid, None)
        self.reported.pop(rid, None)

    def move(self, rid: str, decode: int, new_rid: str | None = None) -> None:
        """A move of a request this worker relays committed: tell the brain (its snapshot and policy follow)."""
        t = self.requests.pop(rid, None)
        self.reported.pop(rid, None)
        if t is not None:
            t.decode = decode
            t.rid = new_rid or rid
            self.requests[t.rid] = t
        self.notify("moved", {"old": rid, "new": new_rid or rid, "d": decode})

    def mark_failed(self, backend: Backend, error: str) -> None:
        """A server failed a request: the brain takes it out of rotation now, not at its next poll."""
        self.notify("failed", {"role": backend.role, "x": backend.index, "err": error})

    def served_models(self) -> frozenset[str] | None:
        return self.served


class _Models:
    """The worker's stand-in for the poller in `Dispatch._check_model`: the brain's poller refreshes the list."""

    def __init__(self, state: WorkerState):
        self.state = state

    async def refresh_models(self) -> frozenset[str] | None:
        assert self.state.channel is not None
        try:
            models = await self.state.channel.call("models", timeout=30.0)
        except (ChannelClosed, RemoteError, asyncio.TimeoutError):
            return self.state.served
        self.state.served = None if models is None else frozenset(models)
        return self.state.served


class RelayWorker(Router):
    """The generation endpoints and the relay of `app.Router`, with the brain's decisions asked over the channel.
    (A `Router` without its poller and snapshot: `__init__` sets only what the relay and migrations use.)"""

    def __init__(self, config: RouterConfig, index: int, rundir: Path):  # noqa: D107 - see the class
        self.config = config
        self.index = index
        self.rundir = rundir
        self.state = WorkerState(config)  # type: ignore[assignment]
        self.metrics = RouterMetrics(self.state)  # type: ignore[arg-type] - only its counters/histograms are read
        self.poller = _Models(self.state)  # type: ignore[assignment]
        self.client: PDClient | None = None
        self.inflight: dict[str, InFlight] = {}
        self.hop_rids: dict[str, str] = {}
        self.client_rids: dict[str, str] = {}
        self.migration_log: list[dict] = []
        self.migration_limits = MigrationLimits(
            max_stages=config.migrate_max_stages,
            last_stage_tokens=config.migrate_last_stage_tokens,
            stage_delay_s=config.migrate_stage_delay_s,
        )
        self._models_asked = -MODELS_MISS_REFRESH_S
        self._reporter: asyncio.Task | None = None
        self.handlers = {"migrate": self._migrate_cmd, "metrics": self._metrics_cmd}

    # -- application ------------------------------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        """Generation endpoints here; every other path is forwarded to the brain."""
        app = web.Application(client_max_size=256 * 1024**2, middlewares=[self._middleware])
        for endpoint in ENDPOINTS:
            app.router.add_post(endpoint, self._generation_handler(endpoint))
        app.router.add_route("*", "/{tail:.*}", self._forward)
        app.on_response_prepare.append(self._name_worker)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _name_worker(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[WORKER_HEADER] = str(self.index)

    async def _on_startup(self, app: web.Application) -> None:
        self.client = PDClient.create(self.config.connect_timeout_s, self.config.request_timeout_s)
        self._reporter = asyncio.create_task(self._report_tokens())

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
        if self.client is not None:
            await self.client.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        """Any path but generation, answered by the brain (over the channel: the same from another host): its
        status, type and body unchanged."""
        assert self.state.channel is not None
        fields = {"m": request.method, "p": request.path_qs, "rid": request[RID], "ct": request.content_type,
                  "b": (await request.read()).decode("latin-1")}  # fmt: skip
        try:
            got = await self.state.channel.call("http", fields)
        except (ChannelClosed, RemoteError) as e:
            raise APIError(503, f"the router's brain is unavailable: {e}") from None
        return web.Response(body=got["b"].encode("latin-1"), status=got["s"], headers={"Content-Type": got["ct"]})

    # -- what the brain decides ---------------------------------------------------------------------------------------
    async def _hold_while_full(self, parsed: ParsedRequest, pinned: Backend | None) -> None:
        """Holding happens in the brain, in the first `choose` (`_choose_pair`)."""

    async def _choose_pair(
        self,
        parsed: ParsedRequest,
        excluded_d: list[int],
        excluded_p: list[int],
        failure: BackendFailure | None,
        pinned: Backend | None,
    ) -> tuple[Backend, Backend]:
        """The brain's choice (`Dispatch._choose` there); the first attempt of an unpinned request may be held."""
        assert self.state.channel is not None
        first = failure is None and not excluded_d and not excluded_p
        fields = {
            "pt": parsed.prompt_tokens,
            "mt": parsed.max_tokens,
            "xd": excluded_d,
            "xp": excluded_p,
            "f": None if failure is None else str(failure),
            "pin": None if pinned is None else pinned.index,
            "hold": first and pinned is None and self.state.policy.hold_when_full,
        }
        try:
            got = await self.state.channel.call("choose", fields)
        except RemoteError as e:
            raise APIError(e.status or 502, e.message) from None
        except ChannelClosed:
            raise APIError(503, "the router's brain is unavailable; retry later") from None
        d = self.state.decodes[got["d"]]
        if got["h"]:
            self.state.heads.add(d.index)
        else:
            self.state.heads.discard(d.index)
        return self.state.prefills[got["p"]], d

    def _flight_started(self, rid: str, flight: InFlight) -> None:
        super()._flight_started(rid, flight)
        t = self.state.requests[flight.rid]
        self.state.notify(
            "start",
            {"r": flight.rid, "c": rid, "e": flight.endpoint, "w": self._why_not_migratable(flight),
             "d": t.decode, "p": t.prefill, "pt": t.prompt_tokens, "mt": t.max_tokens},
        )  # fmt: skip

    def _flight_ended(self, rid: str, flight: InFlight) -> None:
        """Forget the request here (no gate in a worker: the brain's forgets it on `end`) and tell the brain."""
        self._drop_flight(rid, flight)
        self.state.notify("end", {"r": flight.rid, "b": flight.backend_rid})

    def _record_head_error(self, backend_rid: str, decode: Backend, final_tokens) -> None:  # noqa: ANN001
        """The brain has the predictions; it gets the final count, only for servers that report predictions."""
        if decode.index not in self.state.heads:
            return
        final = final_tokens()
        if final is not None:
            self.state.notify("head", {"b": backend_rid, "d": decode.index, "t": final[0], "s": final[1]})

    async def _report_tokens(self) -> None:
        """Every poll interval: the relayed output events of the streams that advanced since the last report (and
        that a stream started: the brain plans it as running from then on)."""
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            reported = self.state.reported
            changed = {
                rid: t.generated for rid, t in self.state.requests.items()
                if t.started and reported.get(rid) != t.generated
            }  # fmt: skip
            if changed:
                reported.update(changed)
                self.state.notify("tokens", {"g": changed})

    # -- what the brain asks ----------------------------------------------------------------------------------------
    async def _migrate_cmd(self, msg: dict) -> dict:
        """Move a request this worker relays (by its first backend rid) to decode server `to`; the move's record."""
        flight = self.inflight.get(msg["rid"])
        target = self.state.decodes[int(msg["to"])]
        if flight is None or flight.pending() is not None:
            reason = "not_running" if flight is None else "already migrating"
            source = "" if flight is None else flight.decode.name
            return {"mid": None, "rid": msg["rid"], "source": source, "target": target.name, "state": "failed",
                    "reason": reason}  # fmt: skip
        m = await self._migrate(flight, target)
        return m.record()

    def _metrics_cmd(self, msg: dict) -> list[dict]:
        """This worker's counters and histograms (the brain sums them over the workers)."""
        out = []
        for metric in vars(self.metrics).values():
            if isinstance(metric, Counter | Histogram):
                for fam in metric.collect():
                    samples = [[s.name, s.labels, s.value] for s in fam.samples if not s.name.endswith("_created")]
                    out.append({"n": fam.name, "d": fam.documentation, "t": fam.type, "s": samples})
        return out


async def serve_worker(config: RouterConfig, index: int, rundir: Path) -> None:
    """Run worker `index` (this host's) until cancelled or until its brain goes away: the brain in this host's run
    directory, or the one at `config.relay_of` (TCP, with the shared key), which numbers its workers itself."""
    worker = RelayWorker(config, index, rundir)
    channel = Channel(worker.handlers, name=f"worker{index}")
    await connect(config.relay_of or str(rundir / CHANNEL_SOCKET), channel)
    worker.state.channel = channel
    hello = {"x": index, "pid": os.getpid(), "host": socket.gethostname(), "remote": bool(config.relay_of),
             "key": config.brain_key}  # fmt: skip
    worker.index = (await channel.call("hello", hello, timeout=30.0))["index"]
    runner = web.AppRunner(worker.build_app(), handler_cancellation=True, access_log=log if config.access_log else None)
    await runner.setup()
    try:
        site = web.SockSite(runner, reuseport_socket(config.host, config.port), backlog=1024)
        await site.start()
        channel.send("listening")
        (rundir / f"listening.{index}").touch()  # for a relay host's parent, which has no channel
        assert channel.lost is not None
        await channel.lost  # the brain is gone: so is this worker
        log.warning("worker %d: the brain went away; stopping", worker.index)
    finally:
        await runner.cleanup()
        channel.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m ares_router.workers RUNDIR INDEX` (started by the brain)."""
    rundir, index = Path((argv or sys.argv[1:])[0]), int((argv or sys.argv[1:])[1])
    config: RouterConfig = pickle.loads((rundir / CONFIG_FILE).read_bytes())
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[w{index}]: %(message)s",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the brain, which stops the workers
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await serve_worker(config, index, rundir)
        except asyncio.CancelledError:
            pass

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
