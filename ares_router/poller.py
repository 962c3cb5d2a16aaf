"""Keeps the router's snapshot fresh: polls every server at a fixed interval, then rebuilds the snapshot.

Decode servers are asked for `GET /ares/state?format=columns` (ARES decode servers, schemas below) and, when that
answers 404, for SGLang's own `GET /v1/loads`; the 404 is remembered and `/ares/state` re-probed every `reprobe_s`.
Prefill servers are asked for `/v1/loads` as a health check. A refused connection marks the server unhealthy (not
chosen) at once; other failures (timeouts, bad answers) do after `failure_threshold` polls in a row, because a busy
CPU server can miss one poll's deadline while still serving. The next successful poll brings it back.
Independently, the router stops choosing a server whose last good poll is older than its `stale_after_s` (e.g. when
polling itself stalls). Each server's model ids (`GET /v1/models`, else `/server_info`'s `served_model_name`) are
fetched after its first good poll and every `models_refresh_s`; the router answers unknown models with 404.

`/ares/state` is served by decode servers started with `--ares`. The router always asks with `?format=columns` and
reads whichever version the body declares, so a server that only knows version 1 (and ignores the query) keeps
working. Unknown keys are ignored in both versions.

Version 1 (rows; what `GET /ares/state` without the query returns):

    {"version": 1,
     "capacity_tokens": int,     # KV pool size in tokens
     "used_tokens": int,         # KV tokens in use now
     "queued_reqs": int,         # waiting, preallocating, transferring or retracted requests (optional, default 0)
     "migration": {"version": 1, "reserved_tokens": int, "in": int, "out": int,   # optional: servers that
                   "kv_bytes_per_token": float},                                # migrate (the router reads the last)
     "requests": [               # running requests
        {"rid": str,
         "prompt_tokens": int,
         "generated_tokens": int,
         "predicted_remaining": float | null,   # the length head's prediction of tokens still to come
         "predicted_p90": float | null}]}       # optional upper quantile of the same

Version 2 (columns; the answer to `GET /ares/state?format=columns`): the same numbers, one entry per field, so the
router turns each field into a numpy array in one call instead of building a Python dict per request (at 256
instances x 256 running requests, version 1 costs more than a 100 ms poll interval allows on one core):

    {"version": 2,
     "capacity_tokens": int,
     "used_tokens": int,
     "queued_reqs": int,              # optional, default 0
     "migration": {...},              # optional, as in version 1
     "rids": [str, ...],              # the n running requests, any order; row k of every column is rids[k]
     "prompt_tokens": COLUMN,         # n token counts (int32)
     "generated_tokens": COLUMN,      # n token counts (int32)
     "predicted_remaining": COLUMN,   # n predictions (float32); NaN/null: no prediction yet for that request.
                                      #   The key may also be null or absent: no predictions at all (no head)
     "predicted_p90": COLUMN}         # optional, as predicted_remaining

    COLUMN = a base64 string (RFC 4648, with padding) of the n values as little-endian binary: int32 (`<i4`) for
             the two token counts, float32 (`<f4`) for the predictions, NaN for "no prediction"; this is the fast
             form: numpy.frombuffer, no Python object per value. Server side, e.g.
             base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")
           | a JSON array of n numbers (null for "no prediction"): the readable form, same meaning, ~5x slower to
             read (one Python object per value).

Every column has exactly n values (n = 0: "" or []); token counts must be finite and >= 0; a body that breaks this
is a bad poll (`BadPayload`), like a missing key.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from ares_router.pollclient import BadResponse, ConnectFailed, PollClient
from ares_router.state import Backend, DecodeLoad, RouterState

log = logging.getLogger("ares_router.poller")

LOADS_PATH = "/v1/loads?include=core,disagg,queues"
ARES_STATE_PATH = "/ares/state"
ARES_STATE_QUERY = "?format=columns"  # ask for version 2; a version-1 server ignores it
MODELS_PATH = "/v1/models"
SERVER_INFO_PATH = "/server_info"


class BadPayload(ValueError):
    """A server answered 200 with JSON the router cannot read."""


# What a failed poll looks like (ConnectFailed, connection resets and other socket errors are OSErrors).
_POLL_ERRORS = (asyncio.TimeoutError, OSError, BadResponse, BadPayload, orjson.JSONDecodeError)


def _col(rows: list[dict], key: str, required: bool) -> np.ndarray:
    vals = [r[key] if required else r.get(key) for r in rows]
    return np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)


def parse_ares_state(data: Any) -> DecodeLoad:
    """A `DecodeLoad` from an `/ares/state` body of either version (schemas in the module docstring)."""
    version = data.get("version", 1) if isinstance(data, dict) else None
    if version == 2:
        return _parse_columns(data)
    if version == 1:
        return _parse_rows(data)
    raise BadPayload(f"bad /ares/state payload: unsupported version {version!r} (this router reads 1 and 2)")


def _parse_rows(data: dict) -> DecodeLoad:
    try:
        rows = data["requests"]
        if not isinstance(rows, list):
            raise TypeError("'requests' must be a list")
        prompt, generated = _col(rows, "prompt_tokens", True), _col(rows, "generated_tokens", True)
        _check_counts(prompt, generated)
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
            kv_bytes_per_token=_kv_bytes_per_token(data),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadPayload(f"bad /ares/state payload: {e!r}") from None


def _kv_bytes_per_token(data: dict) -> float | None:
    """KV bytes per token from the optional migration block (servers that migrate report it)."""
    value = (data.get("migration") or {}).get("kv_bytes_per_token")
    return None if value is None else float(value)


def _check_counts(*cols: np.ndarray) -> None:
    for c in cols:
        if c.size and not (np.isfinite(c).all() and (c >= 0).all()):
            raise ValueError("prompt_tokens and generated_tokens must be non-negative numbers")


# The binary form's element types (little-endian): token counts int32, predictions float32.
_COLUMN_DTYPE = {
    "prompt_tokens": np.dtype("<i4"),
    "generated_tokens": np.dtype("<i4"),
    "predicted_remaining": np.dtype("<f4"),
    "predicted_p90": np.dtype("<f4"),
}


def _array(data: dict, key: str, n: int, required: bool) -> np.ndarray:
    """Column `key` (schema version 2: base64 little-endian binary, or a JSON array) as float64 with exactly `n`
    values; null -> NaN. An optional column may be null or absent (all NaN)."""
    v = data[key] if required else data.get(key)
    if v is None and not required:
        return np.full(n, np.nan)
    if isinstance(v, str):
        dtype = _COLUMN_DTYPE[key]
        try:
            raw = binascii.a2b_base64(v)
        except binascii.Error as e:
            raise ValueError(f"'{key}' is not valid base64: {e}") from None
        if len(raw) != n * dtype.itemsize:
            raise ValueError(f"'{key}' must hold {n} {dtype.name} values ({n * dtype.itemsize} bytes), got {len(raw)}")
        return np.frombuffer(raw, dtype=dtype).astype(np.float64)
    if not isinstance(v, list) or len(v) != n:
        raise ValueError(f"'{key}' must be a base64 string or a list of {n} numbers (one per rid)")
    # numpy converts the whole list in C; null becomes NaN, a string or a nested list raises.
    return np.array(v, dtype=np.float64)


def _parse_columns(data: dict) -> DecodeLoad:
    try:
        rids = data["rids"]
        if not isinstance(rids, list):
            raise TypeError("'rids' must be a list of strings")
        "".join(rids)  # a TypeError unless every rid is a string: checked in C, not per row in Python
        n = len(rids)
        prompt = _array(data, "prompt_tokens", n, True)
        generated = _array(data, "generated_tokens", n, True)
        _check_counts(prompt, generated)
        return DecodeLoad(
            capacity_tokens=int(data["capacity_tokens"]),
            used_tokens=int(data["used_tokens"]),
            running_reqs=n,
            queued_reqs=int(data.get("queued_reqs") or 0),
            source="ares_state",
            rids=tuple(rids),
            prompt_tokens=prompt,
            generated_tokens=generated,
            predicted_remaining=_array(data, "predicted_remaining", n, False),
            predicted_p90=_array(data, "predicted_p90", n, False),
            kv_bytes_per_token=_kv_bytes_per_token(data),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadPayload(f"bad /ares/state payload (version 2): {e!r}") from None


def parse_models(data: Any) -> frozenset[str]:
    """Model ids from a `/v1/models` body (`{"data": [{"id": ...}, ...]}`) or `/server_info`
    (`{"served_model_name": ...}`)."""
    try:
        if "data" in data:
            return frozenset(str(m["id"]) for m in data["data"])
        return frozenset([str(data["served_model_name"])])
    except (KeyError, TypeError) as e:
        raise BadPayload(f"bad model list: {e!r}") from None


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
        models_refresh_s: float = 60.0,
    ):
        self.state = state
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.reprobe_s = reprobe_s
        self.failure_threshold = failure_threshold
        self.models_refresh_s = models_refresh_s
        self.on_round = on_round
        self._no_ares_state: dict[int, float] = {}  # decode index -> when /ares/state last answered 404
        self._client: PollClient | None = None
        self._task: asyncio.Task | None = None
        self._models_inflight: dict[str, asyncio.Task] = {}  # backend name -> its model-list fetch
        self.ares_state_url_path = ARES_STATE_PATH + ARES_STATE_QUERY  # what decode servers are asked for
        self.rounds = 0
        # Time of the last round's two phases: every server's HTTP answer parsed (concurrently), snapshot rebuild.
        self.last_fetch_s = 0.0
        self.last_refresh_s = 0.0

    async def start(self) -> None:
        """Poll once (so the first requests see real state), then keep polling in the background."""
        # Own keep-alive connections, and a lean client (`pollclient`): polling must not queue behind hundreds of
        # relayed streams, nor cost more of the router's one core than the requests it relays.
        self._client = PollClient(self.timeout_s)
        await self.poll_once()
        self._task = asyncio.create_task(self._run(), name="ares-poller")

    async def stop(self) -> None:
        """Stop polling and close the connections."""
        for t in [self._task, *self._models_inflight.values()]:
            if t is None:
                continue
            t.cancel()
            try:
                await t
            except asyncio.CancelledError:
                pass
        if self._client is not None:
            self._client.close()

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
        t0 = time.perf_counter()
        await asyncio.gather(
            *(self._poll_decode(d) for d in self.state.decodes),
            *(self._poll_prefill(p) for p in self.state.prefills),
        )
        t1 = time.perf_counter()
        self.state.refresh()
        self.last_fetch_s, self.last_refresh_s = t1 - t0, time.perf_counter() - t1
        self.rounds += 1
        if self.on_round is not None:
            self.on_round()

    async def _get_json(self, url: str) -> tuple[int, Any]:
        assert self._client is not None
        status, raw = await self._client.get(url)
        return (200, orjson.loads(raw)) if status == 200 else (status, None)

    async def _poll_decode(self, d: Backend) -> None:
        try:
            load = None
            since_404 = self._no_ares_state.get(d.index)
            if since_404 is None or time.monotonic() - since_404 > self.reprobe_s:
                status, data = await self._get_json(d.url + self.ares_state_url_path)
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
        except _POLL_ERRORS as e:
            self._failed(d, e)

    async def _poll_prefill(self, p: Backend) -> None:
        try:
            status, data = await self._get_json(p.url + LOADS_PATH)
            if status != 200:
                raise BadPayload(f"/v1/loads answered {status}")
            self._ok(p, None)
        except _POLL_ERRORS as e:
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
