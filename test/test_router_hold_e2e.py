"""Late binding with aging, live: the router's release rule (`policy.HoldRelease`, `--ares-hold-max-wait-s`) on the
suite's tiny SGLang servers (one decode server of 4,096 KV tokens, SGLang's reserve of 512) behind an `ares_hold`
router.

A long request L (prompt 400, max_tokens 3000) running there leaves 4096 - (400 + g) - max(512, 3400 - (400 + g))
= 696 tokens a new request may take on the router's view (SGLang's rule), whatever L has generated (g). So a large
request X (prompt 400: needs 912) is held, and a small one Y (prompt 40: needs 552) fits. Without aging, Y passes X
and is answered while X waits; with `--ares-hold-max-wait-s 1`, once X has waited 1 s it is aged: Y is held behind
it, and both go, X first, when L ends.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import aiohttp
from conftest import routed
from http_helpers import get_json, request, wait_for

LONG = {"input_ids": list(range(1000, 1400)), "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
BIG = {"input_ids": list(range(2000, 2400)), "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}
SMALL = {"input_ids": list(range(3000, 3040)), "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}


def _held(router: str) -> float:
    metrics = request(router + "/metrics")[2].decode()
    return float(next(ln.split()[1] for ln in metrics.splitlines() if ln.startswith("ares_held_requests ")))


@contextmanager
def _long_request_running(router: str) -> Iterator[None]:
    """L streams through the router until the block ends; then its client hangs up (the router aborts it)."""
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()

    async def stream() -> None:
        async with aiohttp.ClientSession() as s, s.post(router + "/generate", json={**LONG, "stream": True}) as resp:
            async for _ in resp.content.iter_any():
                if stop.is_set():
                    break

    thread = threading.Thread(target=loop.run_until_complete, args=(stream(),))
    thread.start()
    try:
        wait_for(
            lambda: (
                [(len(d["requests"]), len(d["pending"])) for d in get_json(router + "/ares/cluster")["decode"]]
                == [(1, 0)]
            ),
            120,
            "the long request to run on the decode server",
        )
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=120)
        loop.close()


def _send(pool: ThreadPoolExecutor, router: str, body: dict) -> Future:
    return pool.submit(request, router + "/generate", body, None, 300)


def _ok(answer: Future) -> None:
    status, _, raw = answer.result(timeout=300)
    assert status == 200, raw


def test_without_aging_a_small_request_passes_a_held_large_one(tiny_servers, tmp_path):
    with routed(tiny_servers, tmp_path, "ares_hold", "--ares-hold-max-wait-s", "none", n_decode=1) as cl:
        r = cl.router_url
        with ThreadPoolExecutor(2) as pool:
            with _long_request_running(r):
                big = _send(pool, r, BIG)
                wait_for(lambda: _held(r) == 1, 60, "the large request to be held")
                small = _send(pool, r, SMALL)
                _ok(small)  # answered while the large one still waits
                assert not big.done() and _held(r) == 1
            _ok(big)  # L's client hung up: room, and the next release pass places it
        assert _held(r) == 0


def test_an_aged_held_request_holds_new_arrivals_back(tiny_servers, tmp_path):
    with routed(tiny_servers, tmp_path, "ares_hold", "--ares-hold-max-wait-s", "1", n_decode=1) as cl:
        r = cl.router_url
        with ThreadPoolExecutor(2) as pool:
            with _long_request_running(r):
                big = _send(pool, r, BIG)
                wait_for(lambda: _held(r) == 1, 60, "the large request to be held")
                aged_at = time.monotonic() + 1.2  # held at most 0.25 s before we saw it: aged by then
                time.sleep(max(0.0, aged_at - time.monotonic()))
                small = _send(pool, r, SMALL)
                wait_for(lambda: _held(r) == 2, 60, "the small request to be held behind the aged one")
                assert get_json(r + "/ares/cluster")["inflight"] == 1  # only L was dispatched
                assert not big.done() and not small.done()
            _ok(big)
            _ok(small)
        assert _held(r) == 0
