"""Keeps the router's snapshot fresh: polls every server at a fixed interval, then rebuilds the snapshot.

Decode servers are asked for `GET /ares/state` (ARES decode servers, schema below) and, when that answers 404, for
SGLang's own `GET /v1/loads`; the 404 is remembered and `/ares/state` re-probed every `reprobe_s`. Prefill servers
are asked for `/v1/loads` as a health check. A refused connection marks the server unhealthy (not chosen) at once;
other failures (timeouts, bad answers) do after `failure_threshold` polls in a row, because a busy CPU server can
miss one poll's deadline while still serving. The next successful poll brings it back. Independently, the router
stops choosing a server whose last good poll is older than its `stale_after_s` (e.g. when polling itself stalls).

`/ares/state` schema (version 1), served by decode servers started with `--ares`:

    {"version": 1,
     "capacity_tokens": int,     # KV pool size in tokens
     "used_tokens": int,         # KV tokens in use now
     "queued_reqs": int,         # waiting, preallocating, transferring or retracted requests (optional, default 0)
     "requests": [               # running requests
        {"rid": str,
         "prompt_tokens": int,
         "generated_tokens": int,
         "predicted_remaining": float | null,   # the length head's prediction of tokens still to come
         "predicted_p90": float | null}]}       # optional upper quantile of the same
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np
import orjson

from ares_router.state import Backend, DecodeLoad, RouterState

log = logging.getLogger("ares_router.poller")

LOADS_PATH = "/v1/loads?include=core,disagg,queues"
ARES_STATE_PATH = "/ares/state"


class BadPayload(ValueError):
    """A server answered 200 with JSON the router cannot read."""


def _col(rows: list[dict], key: str, required: bool) -> np.ndarray:
    vals = [r[key] if required else r.get(key) for r in rows]
    return np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)


def parse_ares_state(data: Any) -> DecodeLoad:
    """A `DecodeLoad` from an `/ares/state` body (schema in the module docstring)."""
    try:
        rows = data["requests"]
        if not isinstance(rows, list):
            raise TypeError("'requests' must be a list")
        prompt, generated = _col(rows, "prompt_tokens", True), _col(rows, "generated_tokens", True)
        if np.isnan(prompt).any() or np.isnan(generated).any():
            raise ValueError("prompt_tokens and generated_tokens must be numbers")
        return DecodeLoad(
            capacity_tokens=int(data["capacity_tokens"]),
            used_tokens=int(data["used_tokens"]),
            running_reqs=len(rows),
            queued_reqs=int(data.get("queued_reqs", 0)),
            source="ares_state",
            rids=tuple(str(r["rid"]) for r in rows),
            prompt_tokens=prompt,
            generated_tokens=generated,
            predicted_remaining=_col(rows, "predicted_remaining", False),
            predicted_p90=_col(rows, "predicted_p90", False),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadPayload(f"bad /ares/state payload: {e!r}") from None


def parse_v1_loads(data: Any) -> DecodeLoad:
    """A `DecodeLoad` from SGLang's `/v1/loads` body, summed over its DP ranks."""
    try:
        loads = data["loads"]
        cap = sum(int(x["max_total_num_tokens"]) for x in loads)
        used = sum(int(x["num_used_tokens"]) for x in loads)
        running = sum(int(x["num_running_reqs"]) for x in loads)
        queued = 0
        for x in loads:
            queued += int(x.get("num_waiting_reqs", 0))
            disagg = x.get("disaggregation") or {}
            for key in ("decode_prealloc_queue_reqs", "decode_transfer_queue_reqs", "decode_retracted_queue_reqs"):
                queued += int(disagg.get(key, 0))
        return DecodeLoad(cap, used, running, queued, source="v1_loads")
    except (KeyError, TypeError, ValueError) as e:
        raise BadPayload(f"bad /v1/loads payload: {e!r}") from None


class Poller:
    """Background task polling all servers every `interval_s` and refreshing `state`'s snapshot."""

    def __init__(
        self,
        state: RouterState,
        interval_s: float = 0.1,
        timeout_s: float = 2.0,
        reprobe_s: float = 30.0,
        on_round: Callable[[], None] | None = None,
        failure_threshold: int = 3,
    ):
        self.state = state
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.reprobe_s = reprobe_s
        self.failure_threshold = failure_threshold
        self.on_round = on_round
        self._no_ares_state: dict[int, float] = {}  # decode index -> when /ares/state last answered 404
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self.rounds = 0

    async def start(self) -> None:
        """Poll once (so the first requests see real state), then keep polling in the background."""
        # Own connection pool: polling must not queue behind hundreds of relayed streams.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
        )
        await self.poll_once()
        self._task = asyncio.create_task(self._run(), name="ares-poller")

    async def stop(self) -> None:
        """Stop polling and close the connections."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        t0 = time.monotonic()  # start() has just polled
        while True:
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - t0)))
            t0 = time.monotonic()
            try:
                await self.poll_once()
            except Exception:  # never let one bad round kill the poller
                log.exception("poll round failed")

    async def poll_once(self) -> None:
        """One round: every server concurrently, then a snapshot rebuild."""
        await asyncio.gather(
            *(self._poll_decode(d) for d in self.state.decodes),
            *(self._poll_prefill(p) for p in self.state.prefills),
        )
        self.state.refresh()
        self.rounds += 1
        if self.on_round is not None:
            self.on_round()

    async def _get_json(self, url: str) -> tuple[int, Any]:
        assert self._session is not None
        async with self._session.get(url) as resp:
            raw = await resp.read()
            if resp.status != 200:
                return resp.status, None
            return 200, orjson.loads(raw)

    async def _poll_decode(self, d: Backend) -> None:
        try:
            load = None
            since_404 = self._no_ares_state.get(d.index)
            if since_404 is None or time.monotonic() - since_404 > self.reprobe_s:
                status, data = await self._get_json(d.url + ARES_STATE_PATH)
                if status == 200:
                    self._no_ares_state.pop(d.index, None)
                    load = parse_ares_state(data)
                elif status == 404:
                    self._no_ares_state[d.index] = time.monotonic()
                else:
                    raise BadPayload(f"{ARES_STATE_PATH} answered {status}")
            if load is None:
                status, data = await self._get_json(d.url + LOADS_PATH)
                if status != 200:
                    raise BadPayload(f"/v1/loads answered {status}")
                load = parse_v1_loads(data)
            self._ok(d, load)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, BadPayload, orjson.JSONDecodeError) as e:
            self._failed(d, e)

    async def _poll_prefill(self, p: Backend) -> None:
        try:
            status, data = await self._get_json(p.url + LOADS_PATH)
            if status != 200:
                raise BadPayload(f"/v1/loads answered {status}")
            self._ok(p, None)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, BadPayload, orjson.JSONDecodeError) as e:
            self._failed(p, e)

    def _ok(self, b: Backend, load: DecodeLoad | None) -> None:
        if not b.healthy and b.consecutive_failures:
            log.warning("%s %s is back", b.name, b.url)
        self.state.poll_ok(b, load)

    def _failed(self, b: Backend, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        # Refused: nothing listens there any more, so there is nothing to wait for.
        threshold = 1 if isinstance(e, aiohttp.ClientConnectorError) else self.failure_threshold
        was_healthy = b.healthy
        self.state.poll_failed(b, msg, threshold)
        if not b.healthy and (was_healthy or b.consecutive_failures == 1):  # newly out, or never reachable
            log.warning("%s %s unhealthy: %s", b.name, b.url, msg)
        elif b.healthy:
            log.info("%s %s missed a poll (%d/%d): %s", b.name, b.url, b.consecutive_failures, threshold, msg)
