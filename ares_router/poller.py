"""Keeps the router's snapshot fresh: polls every server at a fixed interval and rebuilds the snapshot from the
latest reports on a timer of its own.

Off the relay's path: every server has its own poll task (started at a phase of its own within the interval, so a
thousand answers do not arrive in one burst), so a slow or dead server delays only its own report, never the others'
(the old design polled in rounds that waited for the slowest answer, up to `timeout_s`). An answer whose bytes equal
the server's previous one is not parsed again. The snapshot rebuild (`rebuild`) is incremental: an instance is
assembled again only when its report or the router's bookkeeping of it changed (`_signature`; an instance with
requests of the router's own also once per interval, for their relayed-token counts), between slices of at most
`ASSEMBLE_SLICE_S` on the event loop; the pure, whole-cluster part (`policy.build_snapshot`, numpy over every row)
runs in a worker thread on immutable inputs, and instances whose bookkeeping changed meanwhile (a dispatch, a
finish) are assembled again and spliced into its result on the loop. Nothing changed: no rebuild at all. A server's
next poll waits until a rebuild has used its last answer (self-clocked), and an idle router (nothing in flight) polls
servers whose answers do not change `IDLE_BACKOFF` times less often.

Decode servers are asked for `GET /ares/state?format=columns` (ARES decode servers) and, when that answers 404,
for SGLang's own `GET /v1/loads`; the 404 is remembered and `/ares/state` re-probed every `reprobe_s`.
Prefill servers are asked for `/v1/loads` as a health check. A refused connection marks the server unhealthy (not
chosen) at once; other failures (timeouts, bad answers) do after `failure_threshold` polls in a row, because a busy
CPU server can miss one poll's deadline while still serving. The next successful poll brings it back.
Independently, the router stops choosing a server whose last good poll is older than its `stale_after_s` (e.g. when
polling itself stalls). Each server's model ids (`GET /v1/models`, else `/server_info`'s `served_model_name`) are
fetched after its first good poll and every `models_refresh_s`; the router answers unknown models with 404.

The readers of the reports are in `ares_router/reports.py`; the `/ares/state` schema is in `ares_router/wire.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import orjson

from ares_router.policy import ClusterSnapshot, InstanceState, build_snapshot
from ares_router.pollclient import BadResponse, ConnectFailed, PollClient
from ares_router.reports import BadPayload, parse_ares_state, parse_models, parse_v1_loads
from ares_router.state import Backend, DecodeLoad, RouterState
from ares_router.wire import STATE_PATH, STATE_QUERY

log = logging.getLogger("ares_router.poller")

LOADS_PATH = "/v1/loads?include=core,disagg,queues"
MODELS_PATH = "/v1/models"
SERVER_INFO_PATH = "/server_info"
ASSEMBLE_SLICE_S = 0.001  # the longest stretch the rebuild assembles instances on the event loop before yielding
THREAD_MIN_INSTANCES = 16  # fewer decode instances: build on the loop (a thread hop costs more than the build)
IDLE_BACKOFF = 4  # a quiet server (answer unchanged, nothing in flight at the router) is polled this many times less


# What a failed poll looks like (ConnectFailed, connection resets and other socket errors are OSErrors).
_POLL_ERRORS = (asyncio.TimeoutError, OSError, BadResponse, BadPayload, orjson.JSONDecodeError)


def splice_snapshot(full: ClusterSnapshot, rows: Sequence[int], part: ClusterSnapshot) -> ClusterSnapshot:
    """`full` with the instances at `rows` replaced by `part`'s (built from those instances alone, in that order).
    Every per-instance aggregate of `build_snapshot` depends on its own instance only, so this equals a full build
    of the merged instance list (`test_router_unit.py` checks that, field by field)."""
    idx = np.asarray(rows, dtype=np.intp)
    arrays = {}
    for f in dataclasses.fields(ClusterSnapshot):
        value = getattr(full, f.name)
        if isinstance(value, np.ndarray) and value.shape[:1] == (len(full.instances),):
            value = value.copy()
            value[idx] = getattr(part, f.name)
            arrays[f.name] = value
    instances = list(full.instances)
    for k, j in enumerate(rows):
        instances[j] = part.instances[k]
    forecasts = full.forecasts
    if full.forecasts or part.forecasts:
        merged = list(full.forecasts or (None,) * len(instances))
        for k, j in enumerate(rows):
            merged[j] = part.forecasts[k] if part.forecasts else None
        forecasts = tuple(merged) if any(f is not None for f in merged) else ()  # as `build_snapshot`: none, ()
    return dataclasses.replace(full, instances=tuple(instances), forecasts=forecasts, **arrays)


@dataclasses.dataclass
class _Assembled:
    """A decode instance as last assembled, and what it was assembled from."""

    state: InstanceState
    signature: tuple
    load: DecodeLoad | None  # kept referenced, so the id() in `signature` cannot be reused by another report
    at: float  # monotonic time of the assembly


def _signature(d: Backend) -> tuple:
    """What an instance's assembly depends on, cheaply: its report (by identity: a new poll is a new object), its
    health, and the router's bookkeeping of it (every dispatch, finish and move changes `dispatched`, `inflight` or
    the tracked set). Relayed-token counts are not in it: `Poller.rebuild` re-assembles instances with requests of
    the router's own at least once per interval instead."""
    return (id(d.load), d.healthy, d.dispatched, d.inflight, len(d.tracked))


class Poller:
    """Per-server poll tasks every `interval_s`, and the snapshot rebuilt from their latest reports every
    `interval_s` (see the module docstring)."""

    def __init__(
        self,
        state: RouterState,
        interval_s: float = 0.1,
        timeout_s: float = 2.0,
        reprobe_s: float = 30.0,
        on_round: Callable[[], None] | None = None,
        failure_threshold: int = 3,
        models_refresh_s: float = 60.0,
        thread_min_instances: int = THREAD_MIN_INSTANCES,
    ):
        self.state = state
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.reprobe_s = reprobe_s
        self.failure_threshold = failure_threshold
        self.models_refresh_s = models_refresh_s
        self.thread_min_instances = thread_min_instances
        self.on_round = on_round  # called after every snapshot rebuild (a "round")
        self._no_ares_state: dict[int, float] = {}  # decode index -> when /ares/state last answered 404
        # decode index -> (url, body) of its last good answer: the same bytes again are not parsed again
        self._raw: dict[int, tuple[str, bytes]] = {}
        self._assembled: dict[int, _Assembled] = {}  # decode index -> its instance as last assembled
        self._client: PollClient | None = None
        self._tasks: list[asyncio.Task] = []  # one poll task per server, and the rebuild task
        self._models_inflight: dict[str, asyncio.Task] = {}  # backend name -> its model-list fetch
        self.ares_state_url_path = STATE_PATH + STATE_QUERY  # what decode servers are asked for
        self.rounds = 0  # snapshot rebuilds (each one a "round" for `on_round` and the metrics)
        # The last round: the longest single poll (HTTP + parse) since the previous rebuild, the rebuild's wall time
        # and the part of it that held the event loop (the rest ran in the worker thread).
        self.last_fetch_s = 0.0
        self.last_refresh_s = 0.0
        self.last_loop_s = 0.0
        self.last_reassembled = 0  # instances assembled again in the last rebuild
        self._longest_poll = 0.0
        self._next_round: asyncio.Future | None = None  # resolved when the next rebuild ends (`_round_done`)
        self._same: dict[str, bool] = {}  # backend name -> its last answer equalled the one before
        self._prefill_raw: dict[int, bytes] = {}  # prefill index -> its last good answer
        self.idle_backoff = IDLE_BACKOFF

    async def start(self) -> None:
        """Poll every server once and build the snapshot (so the first requests see real state), then keep polling
        and rebuilding in the background."""
        # Own keep-alive connections, and a lean client (`pollclient`): polling must not queue behind hundreds of
        # relayed streams, nor cost more of the router's one core than the requests it relays.
        self._client = PollClient(self.timeout_s)
        await self.poll_once()
        servers = [*self.state.decodes, *self.state.prefills]
        self._tasks = [
            asyncio.create_task(self._poll_loop(b, (k + 1) / len(servers)), name=f"ares-poll-{b.name}")
            for k, b in enumerate(servers)
        ]
        self._tasks.append(asyncio.create_task(self._rebuild_loop(), name="ares-snapshot"))

    async def stop(self) -> None:
        """Stop polling and close the connections."""
        for t in [*self._tasks, *self._models_inflight.values()]:
            t.cancel()
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks = []
        if self._client is not None:
            self._client.close()

    async def _poll_loop(self, b: Backend, phase: float) -> None:
        """Poll `b` every `interval_s`, first at `phase` of an interval from now. A slow answer delays only this
        server's next poll (to the next tick after it), nobody else's. Self-clocked: the next poll waits until a
        rebuild has used this answer, so when the router's core is short the polls slow down with the rebuilds
        instead of crowding them out (fetching reports faster than snapshots use them is wasted work)."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self.interval_s * phase
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                await self._poll(b)
            except Exception:  # never let one bad poll kill the server's task
                log.exception("poll of %s failed", b.name)
            await asyncio.shield(self._round_done())
            now = loop.time()
            # Idle: while the server answers the same and the router relays nothing, poll it less often (the idle
            # router's CPU is mostly polls); the first dispatch sees reports at most `idle_backoff` intervals old,
            # of servers whose answers had not changed.
            quiet = self._same.get(b.name) and not self.state.requests
            due += self.interval_s * (self.idle_backoff if quiet else 1)
            if due <= now:  # the answer took longer than the interval: skip the missed ticks
                due += self.interval_s * (int((now - due) / self.interval_s) + 1)

    async def _rebuild_loop(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += self.interval_s
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                await self.rebuild()
            except Exception:  # never let one bad rebuild kill the poller
                log.exception("snapshot rebuild failed")
            finally:
                self._wake_polls()  # even after a failed rebuild: the polls must go on (health checks)
            if due < loop.time():
                due = loop.time()

    async def poll_once(self) -> None:
        """One round by hand: every server once, concurrently, then a snapshot rebuild."""
        t0 = time.perf_counter()
        await asyncio.gather(*(self._poll(b) for b in (*self.state.decodes, *self.state.prefills)))
        self._longest_poll = time.perf_counter() - t0
        await self.rebuild()

    async def _poll(self, b: Backend) -> None:
        t0 = time.perf_counter()
        if b.role == "decode":
            await self._poll_decode(b)
        else:
            await self._poll_prefill(b)
        self._longest_poll = max(self._longest_poll, time.perf_counter() - t0)

    # -- snapshot -------------------------------------------------------------------------------------------------
    async def rebuild(self, now: float | None = None) -> None:
        """Rebuild the snapshot from the latest reports and the router's bookkeeping (incrementally; see the module
        docstring); the result equals `RouterState.refresh()`'s."""
        state = self.state
        t0 = time.perf_counter()
        now = time.monotonic() if now is None else now
        changed = self._mark_stale(now)
        # 1. Assemble the instances whose report or bookkeeping changed, yielding to the relay between slices.
        reassembled = 0
        slice_start = t0
        loop_s = 0.0
        instances = []
        for d in state.decodes:
            a = self._assembled.get(d.index)
            if a is None or a.signature != _signature(d) or (d.tracked and now - a.at >= self.interval_s):
                a = self._assemble(d, now)
                reassembled += 1
            instances.append(a.state)
            if time.perf_counter() - slice_start > ASSEMBLE_SLICE_S:
                loop_s += time.perf_counter() - slice_start
                await asyncio.sleep(0)
                slice_start = time.perf_counter()
        loop_s += time.perf_counter() - slice_start
        if not reassembled and not changed and state.snapshot is not None:
            state.snapshot_time = now  # nothing changed since the last build: the snapshot is current as it is
            self._finish_round(t0, loop_s, 0)
            return
        self._update_link_cost()
        # 2. The whole-cluster aggregates: a pure function of immutable inputs, so a worker thread may compute them.
        args = (instances, state.load_model, state.migration_cost, state.admission)
        if len(instances) >= self.thread_min_instances:
            snap = await asyncio.to_thread(build_snapshot, *args, dispatch_count=state.dispatch_count)
        else:
            snap = build_snapshot(*args, dispatch_count=state.dispatch_count)
        # 3. Back on the loop: instances whose bookkeeping moved meanwhile (dispatches, finishes) are spliced in.
        t1 = time.perf_counter()
        late = [d.index for d in state.decodes if self._assembled[d.index].signature != _signature(d)]
        if late:
            part = [self._assemble(state.decodes[j], now).state for j in late]
            snap = splice_snapshot(snap, late, build_snapshot(part, *args[1:]))
            reassembled += len(late)
        state.snapshot = dataclasses.replace(snap, dispatch_count=state.dispatch_count)
        state.snapshot_time = now
        self._finish_round(t0, loop_s + time.perf_counter() - t1, reassembled)

    def _assemble(self, d: Backend, now: float) -> _Assembled:
        sig = _signature(d)
        a = self._assembled[d.index] = _Assembled(self.state._instance(d), sig, d.load, now)
        return a

    def _round_done(self) -> asyncio.Future:
        """A future resolved when the next rebuild ends."""
        if self._next_round is None or self._next_round.done():
            self._next_round = asyncio.get_running_loop().create_future()
        return self._next_round

    def _wake_polls(self) -> None:
        if self._next_round is not None and not self._next_round.done():
            self._next_round.set_result(None)

    def _finish_round(self, t0: float, loop_s: float, reassembled: int) -> None:
        self.last_fetch_s, self._longest_poll = self._longest_poll, 0.0
        self.last_refresh_s = time.perf_counter() - t0
        self.last_loop_s = loop_s
        self.last_reassembled = reassembled
        self.rounds += 1
        self._wake_polls()
        if self.on_round is not None:
            self.on_round()

    def _mark_stale(self, now: float) -> bool:
        """As `RouterState.refresh` does: a server with no good poll for `stale_after_s` is not chosen. True when
        that took one out."""
        state, changed = self.state, False
        for b in itertools.chain(state.prefills, state.decodes):
            if b.healthy and (b.last_ok is None or now - b.last_ok > state.stale_after_s):
                b.healthy = False
                b.last_error = f"stale: no successful poll for {state.stale_after_s:g}s"
                changed = True
        return changed

    def _update_link_cost(self) -> None:
        """As `RouterState.refresh` does: the link profile prices a migration with the KV bytes per token the servers
        report."""
        state = self.state
        if state.link is None:
            return
        kvb = next((d.load.kv_bytes_per_token for d in state.decodes if d.load and d.load.kv_bytes_per_token), None)
        if kvb is not None and kvb != state.migration_cost.kv_bytes_per_token:
            state.migration_cost = state.link.migration_cost(kvb)

    # -- polls ----------------------------------------------------------------------------------------------------
    async def _get(self, url: str) -> tuple[int, bytes]:
        assert self._client is not None
        return await self._client.get(url)

    async def _get_json(self, url: str) -> tuple[int, Any]:
        status, raw = await self._get(url)
        return (200, orjson.loads(raw)) if status == 200 else (status, None)

    async def _poll_decode(self, d: Backend) -> None:
        try:
            load = None
            since_404 = self._no_ares_state.get(d.index)
            if since_404 is None or time.monotonic() - since_404 > self.reprobe_s:
                url = d.url + self.ares_state_url_path
                status, raw = await self._get(url)
                if status == 200:
                    self._no_ares_state.pop(d.index, None)
                    if self._unchanged(d, url, raw):
                        return
                    load = parse_ares_state(orjson.loads(raw))
                elif status == 404:
                    self._no_ares_state[d.index] = time.monotonic()
                else:
                    raise BadPayload(f"{STATE_PATH} answered {status}")
            if load is None:
                url = d.url + LOADS_PATH
                status, raw = await self._get(url)
                if status != 200:
                    raise BadPayload(f"/v1/loads answered {status}")
                if self._unchanged(d, url, raw):
                    return
                load = parse_v1_loads(orjson.loads(raw))
            self._ok(d, load)
            self._raw[d.index] = (url, raw)
        except _POLL_ERRORS as e:
            self._raw.pop(d.index, None)
            self._same[d.name] = False
            self._failed(d, e)

    def _unchanged(self, d: Backend, url: str, raw: bytes) -> bool:
        """The same answer to the same question as last time: a good poll, nothing new to parse or assemble."""
        same = self._same[d.name] = d.load is not None and self._raw.get(d.index) == (url, raw)
        if same:
            self._ok(d, None)
        return same

    async def _poll_prefill(self, p: Backend) -> None:
        try:
            status, raw = await self._get(p.url + LOADS_PATH)
            if status != 200:
                raise BadPayload(f"/v1/loads answered {status}")
            self._same[p.name] = self._prefill_raw.get(p.index) == raw
            if not self._same[p.name]:
                orjson.loads(raw)  # a health check: the answer must at least be JSON
                self._prefill_raw[p.index] = raw
            self._ok(p, None)
        except _POLL_ERRORS as e:
            self._same[p.name] = False
            self._prefill_raw.pop(p.index, None)
            self._failed(p, e)

    def _ok(self, b: Backend, load: DecodeLoad | None) -> None:
        if not b.healthy and b.consecutive_failures:
            log.warning("%s %s is back", b.name, b.url)
        self.state.poll_ok(b, load)
        if b.models_time is None or time.monotonic() - b.models_time > self.models_refresh_s:
            self._fetch_models_soon(b)

    # -- served models --------------------------------------------------------------------------------------------
    def _fetch_models_soon(self, b: Backend) -> asyncio.Task:
        """Fetch `b`'s model ids in the background (one fetch per server at a time; a poll never waits for it)."""
        task = self._models_inflight.get(b.name)
        if task is None or task.done():
            task = asyncio.create_task(self._fetch_models(b), name=f"ares-models-{b.name}")
            self._models_inflight[b.name] = task
        return task

    async def refresh_models(self) -> frozenset[str] | None:
        """Ask every healthy server for its model ids now, e.g. when a request names a model nobody reported (an
        adapter loaded since the last fetch); returns the union, as `RouterState.served_models`."""
        tasks = [self._fetch_models_soon(b) for b in (*self.state.prefills, *self.state.decodes) if b.healthy]
        if tasks:
            await asyncio.wait(tasks, timeout=self.timeout_s)
        return self.state.served_models()

    async def _fetch_models(self, b: Backend) -> None:
        try:
            status, data = await self._get_json(b.url + MODELS_PATH)
            if status != 200:
                status, data = await self._get_json(b.url + SERVER_INFO_PATH)
            if status != 200:
                raise BadPayload(f"{MODELS_PATH} and {SERVER_INFO_PATH} answered {status}")
            models = parse_models(data)
        except _POLL_ERRORS as e:
            # Not a health signal: the server's state poll decides that. Asked again after `models_refresh_s` (or
            # when a request names an unknown model); until some server lists its models the router forwards.
            log.info("%s %s: no model list: %s", b.name, b.url, f"{type(e).__name__}: {e}")
            b.models_time = time.monotonic()
            return
        if models != b.models:
            log.info("%s %s serves %s", b.name, b.url, ", ".join(sorted(models)))
        b.models, b.models_time = models, time.monotonic()

    def _failed(self, b: Backend, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        # Refused: nothing listens there any more, so there is nothing to wait for.
        threshold = 1 if isinstance(e, ConnectFailed) else self.failure_threshold
        was_healthy = b.healthy
        self.state.poll_failed(b, msg, threshold)
        if not b.healthy and (was_healthy or b.consecutive_failures == 1):  # newly out, or never reachable
            log.warning("%s %s unhealthy: %s", b.name, b.url, msg)
        elif b.healthy:
            log.info("%s %s missed a poll (%d/%d): %s", b.name, b.url, b.consecutive_failures, threshold, msg)
