"""Late binding live: the router's held requests (`ares_router.held.HeldQueue`, `Dispatch._hold_while_full`) released
by the policy's rule (`policy.HoldRelease`: oldest first, first fit, aging), on a fake view of the decode servers
(one pool of free KV tokens; a released request books its prompt there as `RouterState.choose_decode` would).
The same decisions as the simulator's on the same state: `test_one_brain.py`."""

from __future__ import annotations

import argparse
import asyncio
import time
from types import SimpleNamespace

import pytest

from ares.sim.engine import SimConfig
from ares_router.cli import config_from_args, configure_parser
from ares_router.dispatch import Dispatch
from ares_router.held import HeldQueue
from ares_router.policy import DEFAULT_HOLD_MAX_WAIT_S, HoldRelease


class View:
    """Free KV tokens on the router's view: a request fits when its prompt does; placing it takes them."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.placed: list[str] = []

    def fits(self, prompt: int, max_tokens: int | None) -> bool:
        return prompt <= self.free

    def place(self, name: str, prompt: int) -> None:
        self.free -= prompt
        self.placed.append(name)


async def _hold(queue: HeldQueue, view: View, name: str, prompt: int) -> None:
    """A handler: held, then placed before any other await (as `Dispatch._serve` places a released request)."""
    await queue.wait(prompt, None)
    view.place(name, prompt)


async def _held_in_order(queue: HeldQueue, view: View, clock: list[float], requests) -> list[asyncio.Task]:
    tasks = []
    for name, prompt, since in requests:
        clock[0] = since
        tasks.append(asyncio.create_task(_hold(queue, view, name, prompt)))
        await asyncio.sleep(0)
    assert len(queue) == len(requests)
    return tasks


def test_release_is_first_fit_in_arrival_order_on_a_view_updated_after_each_release():
    async def main() -> None:
        view, clock = View(250), [0.0]
        queue = HeldQueue(HoldRelease(None), view.fits, interval_s=1e6, clock=lambda: clock[0])
        await _held_in_order(queue, view, clock, [("a", 400, 0.0), ("b", 100, 1.0), ("c", 100, 2.0), ("d", 100, 3.0)])
        clock[0] = 10.0
        assert await queue.release_pass() == 2
        # "a" fits nowhere and does not block (not aged); "d" fit the view before "b" and "c" were placed, not after
        assert view.placed == ["b", "c"] and view.free == 50
        assert [e.prompt_tokens for e in queue.queue] == [400, 100]
        view.free += 500
        assert await queue.release_pass() == 2 and view.placed == ["b", "c", "a", "d"] and len(queue) == 0

    asyncio.run(main())


def test_an_aged_request_that_fits_nowhere_blocks_the_ones_behind_it_and_new_arrivals():
    async def main() -> None:
        view, clock = View(250), [0.0]
        queue = HeldQueue(HoldRelease(max_wait_s=5.0), view.fits, interval_s=1e6, clock=lambda: clock[0])
        await _held_in_order(queue, view, clock, [("big", 400, 0.0), ("s1", 100, 1.0), ("s2", 100, 2.0)])
        clock[0] = 4.0  # nobody aged: first fit passes the big one
        assert not queue.must_wait(100, None)  # a new small arrival fits and goes straight
        view.free += 100  # (it took its 100 tokens elsewhere; the view gives them back for this test)
        clock[0] = 5.0  # "big" aged (held 5 s), fits nowhere: nothing behind it goes, new arrivals wait
        assert await queue.release_pass() == 0 and view.placed == []
        assert queue.must_wait(100, None)
        view.free = 450  # room for it: it goes first, then the others as they fit
        assert await queue.release_pass() == 1 and view.placed == ["big"]
        view.free = 200
        assert await queue.release_pass() == 2 and view.placed == ["big", "s1", "s2"]
        view.free = 100
        assert not queue.must_wait(100, None)  # nothing aged waits: an arrival that fits goes

    asyncio.run(main())


def test_a_cancelled_held_request_leaves_the_queue():
    async def main() -> None:
        view, clock = View(0), [0.0]
        queue = HeldQueue(HoldRelease(1.0), view.fits, interval_s=1e6, clock=lambda: clock[0])
        (a, b) = await _held_in_order(queue, view, clock, [("a", 100, 0.0), ("b", 100, 0.5)])
        a.cancel()  # the client went away
        await asyncio.gather(a, return_exceptions=True)
        assert len(queue) == 1
        clock[0] = 2.0
        view.free = 100
        assert await queue.release_pass() == 1
        await b
        assert view.placed == ["b"]

    asyncio.run(main())


def test_the_release_loop_lets_held_requests_go_once_there_is_room():
    # No pass by hand: the queue's own task re-checks every interval and ends when nothing is held.
    async def main() -> None:
        view = View(0)
        queue = HeldQueue(HoldRelease(DEFAULT_HOLD_MAX_WAIT_S), view.fits, interval_s=0.01)
        tasks = [asyncio.create_task(_hold(queue, view, n, 100)) for n in ("a", "b")]
        await asyncio.sleep(0.05)
        assert view.placed == [] and len(queue) == 2  # nothing fits: still held
        view.free = 200
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30.0)
        assert view.placed == ["a", "b"]
        deadline = time.monotonic() + 30.0
        while not queue._task.done():  # the loop ends with the queue
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    asyncio.run(main())


class _Gauge:
    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


def _dispatch(hold_when_full: bool, view: View) -> Dispatch:
    """The router's dispatch part over a fake state whose view is `view` (what `_hold_while_full` reads)."""
    d = Dispatch()
    d.config = SimpleNamespace(hold_max_wait_s=5.0, poll_interval_s=0.01)
    d.state = SimpleNamespace(
        policy=SimpleNamespace(hold_when_full=hold_when_full),
        holds=lambda prompt, max_tokens: hold_when_full and not view.fits(prompt, max_tokens),
    )
    d.metrics = SimpleNamespace(held=_Gauge())
    return d


def test_hold_while_full_waits_by_the_rule_and_counts_the_held():
    async def main() -> None:
        view = View(0)
        d = _dispatch(True, view)
        parsed = SimpleNamespace(prompt_tokens=100, max_tokens=None)
        await asyncio.wait_for(d._hold_while_full(parsed, pinned=object()), 1.0)  # a pinned request never waits
        task = asyncio.create_task(d._hold_while_full(parsed, None))
        await asyncio.sleep(0.03)
        assert not task.done() and d.metrics.held.value == 1 and len(d.held_requests) == 1
        assert d.held_requests.rule == HoldRelease(5.0) and d.held_requests.interval_s == 0.01
        view.free = 100
        await asyncio.wait_for(task, timeout=30.0)
        assert d.metrics.held.value == 0
        # a policy that does not hold when full never waits
        await asyncio.wait_for(_dispatch(False, View(0))._hold_while_full(parsed, None), 1.0)

    asyncio.run(main())


def _args(*flags: str) -> argparse.Namespace:
    return configure_parser(argparse.ArgumentParser()).parse_args(
        ["--prefill", "http://p", "--decode", "http://d", *flags]
    )


FLAG = "--ares-hold-max-wait-s"


@pytest.mark.parametrize(
    ("flags", "expected"), [((), DEFAULT_HOLD_MAX_WAIT_S), ((FLAG, "7.5"), 7.5), ((FLAG, "none"), None)]
)
def test_the_router_flag_and_its_default_are_the_simulators(flags, expected):
    assert config_from_args(_args(*flags)).hold_max_wait_s == expected
    assert SimConfig().hold_max_wait_s == DEFAULT_HOLD_MAX_WAIT_S == HoldRelease().max_wait_s
