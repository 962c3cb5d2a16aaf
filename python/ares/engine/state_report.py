"""The `/ares/state` load report, built from what the scheduler already holds: schema version 1 (rows) or 2
(`?format=columns`, base64 binary columns), both documented in `ares_router/poller.py`; and the service that answers
it from the scheduler process without waiting for the scheduler's event loop (a decode step on a CPU server takes up
to a second; a poll must not).

The service is a daemon thread with a ZMQ REP socket on a local IPC path: it copies the running batch's request list
(one atomic list copy under the GIL) and reads each request's lengths and prediction record. Values written by the
scheduler between two reads are at most one step apart, which is what a poll can promise anyway.
"""

from __future__ import annotations

import base64
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from ares.engine.request_state import ATTR

logger = logging.getLogger("ares.engine")

COLUMNS = b"columns"  # the request message asking for schema version 2


def _used_tokens(scheduler: Any) -> int:
    try:  # the figure `/v1/loads` reports
        used, _usage = scheduler.pool_stats_observer.get_pool_stats().get_kv_token_stats()
        return int(used)
    except Exception:  # noqa: BLE001 - fall back to the allocator's own count
        return int(scheduler.max_total_num_tokens - scheduler.token_to_kv_pool_allocator.available_size())


def _queued(scheduler: Any) -> int:
    n = len(scheduler.waiting_queue)
    prealloc = getattr(scheduler, "disagg_decode_prealloc_queue", None)
    transfer = getattr(scheduler, "disagg_decode_transfer_queue", None)
    if prealloc is not None:
        n += len(prealloc.queue) + len(getattr(prealloc, "retracted_queue", ()))
    if transfer is not None:
        n += len(transfer.queue)
    return n


def request_rows(reqs: list[Any]) -> list[dict[str, Any]]:
    """Per running request: rid, prompt and generated tokens, the head's remaining-length predictions (or None)."""
    rows = []
    for req in reqs:
        if req.finished():
            continue
        generated = len(req.output_ids)
        rec = getattr(req, ATTR, None)
        rows.append(
            {
                "rid": req.rid,
                "prompt_tokens": len(req.origin_input_ids),
                "generated_tokens": generated,
                "predicted_remaining": None if rec is None else rec.remaining(generated),
                "predicted_p90": None if rec is None else rec.p90_remaining(generated),
                # Not in the router's schema (it ignores them): for inspection and the head's live evaluation.
                "smoothed_remaining": None if rec is None else rec.smoothed_remaining(generated),
                "predicted_at_generated": None if rec is None else rec.generated_at,
                "prediction_step": None if rec is None else rec.step,
            }
        )
    return rows


def request_columns(reqs: list[Any]) -> dict[str, Any]:
    """The same per-request numbers as columns (schema version 2): token counts as little-endian int32, predictions
    as float32 with NaN for "no prediction yet", each base64-encoded, so the router reads them with one
    `numpy.frombuffer` per column."""
    rids: list[str] = []
    prompt: list[int] = []
    generated: list[int] = []
    pred: list[float] = []
    p90: list[float] = []
    nan = float("nan")
    for req in reqs:
        if req.finished():
            continue
        g = len(req.output_ids)
        rec = getattr(req, ATTR, None)
        rids.append(req.rid)
        prompt.append(len(req.origin_input_ids))
        generated.append(g)
        pred.append(nan if rec is None else rec.remaining(g))
        up = None if rec is None else rec.p90_remaining(g)
        p90.append(nan if up is None else up)

    def b64(values: list, dtype: str) -> str:
        return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode("ascii")

    return {
        "rids": rids,
        "prompt_tokens": b64(prompt, "<i4"),
        "generated_tokens": b64(generated, "<i4"),
        "predicted_remaining": b64(pred, "<f4"),
        "predicted_p90": b64(p90, "<f4"),
    }


def build_report(
    scheduler: Any, columns: bool = False, extra: Callable[[], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The `/ares/state` body for one scheduler (its running batch, KV pool and queues): version 1 (rows) or, with
    `columns`, version 2; `extra()` adds blocks (the migration agent's)."""
    reqs = list(scheduler.running_batch.reqs)
    head = {
        "version": 2 if columns else 1,
        "capacity_tokens": int(scheduler.max_total_num_tokens),
        "used_tokens": _used_tokens(scheduler),
        "queued_reqs": _queued(scheduler),
        **(extra() if extra is not None else {}),
    }
    return {**head, **request_columns(reqs)} if columns else {**head, "requests": request_rows(reqs)}


class ReplyService:
    """A thread answering every message on `address` (ZMQ REP) with `answer(message)`; an exception in `answer`
    is logged and answered as `{"error": ...}`, so the service outlives a bad request."""

    def __init__(self, name: str, address: str, answer: Callable[[bytes], bytes]):
        self.name = name
        self.address = address
        self.answer = answer
        self._thread = threading.Thread(target=self._serve, name=f"ares-{name}", daemon=True)

    def start(self, switch_interval_s: float = 0.0005) -> ReplyService:
        """Start serving. A request needs the GIL for well under a millisecond, but while the scheduler thread runs
        Python it waits up to CPython's switch interval (5 ms) for it; a shorter interval costs the scheduler only
        when another thread is actually waiting."""
        sys.setswitchinterval(min(sys.getswitchinterval(), switch_interval_s))
        self._thread.start()
        return self

    def _serve(self) -> None:
        import zmq

        sock = zmq.Context.instance().socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.address)
        except zmq.ZMQError as e:  # another scheduler of this server (DP > 1) serves already
            logger.warning(
                "ARES %s service not started on %s: %s (only one scheduler serves)", self.name, self.address, e
            )
            sock.close()
            return
        logger.info("ARES %s service on %s", self.name, self.address)
        while True:
            msg = sock.recv()
            try:
                body = self.answer(msg)
            except Exception as e:  # noqa: BLE001 - a bad request must answer, not kill the service
                logger.exception("ARES %s service failed", self.name)
                body = orjson.dumps({"error": f"{type(e).__name__}: {e}"})
            sock.send(body)


def state_service(scheduler: Any, address: str, extra: Callable[[], dict[str, Any]] | None = None) -> ReplyService:
    """The `/ares/state` service: the current report as JSON bytes, version 2 (columns) when the message is
    `COLUMNS`, else version 1."""
    return ReplyService(
        "state", address, lambda msg: orjson.dumps(build_report(scheduler, columns=msg == COLUMNS, extra=extra))
    )
