"""Requests held at the router (late binding, `Policy.hold_when_full`) and their release, live.

The decision is the policy's (`ares_router.policy.HoldRelease`, the rule the simulator uses): held requests wait in
arrival order; once per poll interval (the simulator re-checks after every poll) a release pass goes through them
oldest first and lets go every one some healthy decode server admits on the router's view (first fit: one that fits
nowhere does not block the smaller ones behind it), up to the first *aged* one (held `max_wait_s` or longer) that
fits nowhere: nothing behind it goes, and new arrivals queue behind it too (`must_wait`), so no request starves.

This module is the mechanism: an asyncio future per held request. A released request books its placement on the
router's view (`RouterState.choose_decode`) as soon as it wakes, so the pass yields to it before judging the next
one, and the next one is judged on a view that counts it (as the simulator places held requests one after another).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ares_router.policy import HoldRelease


@dataclass(eq=False)
class Held:
    """One held request: when it was held, its size, and the future its handler waits on."""

    since: float
    prompt_tokens: int
    max_tokens: int | None
    released: asyncio.Future = field(repr=False)


class HeldQueue:
    """The router's held requests, oldest first, and the task that releases them.

    `fits(prompt_tokens, max_tokens)`: whether some healthy decode server admits such a request now on the router's
    view; `interval_s`: how often held requests are re-checked; `clock`: monotonic seconds (a test's clock)."""

    def __init__(
        self,
        rule: HoldRelease,
        fits: Callable[[int, int | None], bool],
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rule = rule
        self.fits = fits
        self.interval_s = interval_s
        self.clock = clock
        self.queue: deque[Held] = deque()
        self._task: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self.queue)

    def must_wait(self, prompt_tokens: int, max_tokens: int | None) -> bool:
        """Whether a new arrival is held: an aged request is waiting (nothing passes it), or nothing admits it."""
        if self.queue and self.rule.blocks(np.array([self.clock() - self.queue[0].since])):
            return True
        return not self.fits(prompt_tokens, max_tokens)

    async def wait(self, prompt_tokens: int, max_tokens: int | None) -> None:
        """Hold a request until the release pass lets it go (returns then; the caller places it at once, before
        its next await). Cancelled (the client went away): it leaves the queue."""
        entry = Held(self.clock(), prompt_tokens, max_tokens, asyncio.get_running_loop().create_future())
        self.queue.append(entry)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._release_loop(), name="ares-held-release")
        try:
            await entry.released
        finally:
            if entry in self.queue:  # cancelled while held
                self.queue.remove(entry)

    async def _release_loop(self) -> None:
        """Every `interval_s` while anything is held: one release pass."""
        while self.queue:
            await asyncio.sleep(self.interval_s)
            await self.release_pass()

    async def release_pass(self) -> int:
        """Release the held requests the rule lets go now, oldest first; returns how many went."""
        entries = list(self.queue)
        if not entries:
            return 0
        now = self.clock()
        aged = self.rule.aged(np.array([now - e.since for e in entries]))
        released = 0
        for entry, is_aged in zip(entries, aged, strict=True):
            if entry.released.done():  # cancelled meanwhile
                continue
            if self.fits(entry.prompt_tokens, entry.max_tokens):
                self.queue.remove(entry)
                entry.released.set_result(None)
                released += 1
                # Its handler wakes before this pass resumes (asyncio runs ready callbacks in order) and books its
                # placement on the view without awaiting anything: the next request is judged on that view.
                await asyncio.sleep(0)
            elif is_aged:
                break  # an aged request that fits nowhere: nothing behind it goes
        return released
