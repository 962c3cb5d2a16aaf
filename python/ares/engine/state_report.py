"""The `/ares/state` load report (schema version 1, documented in `ares_router/poller.py`), built from what the
scheduler already holds, and the service that answers it from the scheduler process without waiting for the
scheduler's event loop (a decode step on a CPU server takes up to a second; a poll must not).

The service is a daemon thread with a ZMQ REP socket on a local IPC path: it copies the running batch's request list
(one atomic list copy under the GIL) and reads each request's lengths and prediction record. Values written by the
scheduler between two reads are at most one step apart, which is what a poll can promise anyway.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import orjson

from ares.engine.request_state import ATTR

logger = logging.getLogger("ares.engine")

VERSION = 1


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


def build_report(scheduler: Any) -> dict[str, Any]:
    """The `/ares/state` body for one scheduler (its running batch, KV pool and queues)."""
    reqs = list(scheduler.running_batch.reqs)
    return {
        "version": VERSION,
        "capacity_tokens": int(scheduler.max_total_num_tokens),
        "used_tokens": _used_tokens(scheduler),
        "queued_reqs": _queued(scheduler),
        "requests": request_rows(reqs),
    }


class StateService:
    """Answers every message on `address` (ZMQ REP) with the current report as JSON bytes."""

    def __init__(self, scheduler: Any, address: str):
        self.scheduler = scheduler
        self.address = address
        self._thread = threading.Thread(target=self._serve, name="ares-state", daemon=True)

    def start(self) -> StateService:
        self._thread.start()
        return self

    def _serve(self) -> None:
        import zmq

        sock = zmq.Context.instance().socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.address)
        logger.info("ARES state service on %s", self.address)
        while True:
            sock.recv()
            try:
                body = orjson.dumps(build_report(self.scheduler))
            except Exception as e:  # noqa: BLE001 - a bad read must answer, not kill the service
                logger.exception("ARES state report failed")
                body = orjson.dumps({"error": f"{type(e).__name__}: {e}"})
            sock.send(body)
