"""The target's Mooncake reads, on worker threads of their own with a deadline.

A read of a peer that died or stopped (SIGSTOP) may not return for a long time. The command that asked for it
waits at most the deadline and then fails the move (`transfer_timeout`), so the command service goes on; the read
itself cannot be interrupted, so its migration stays "pulling" until it returns, and the pages it writes into are
freed only then (`when_idle`): never while a read may still write into them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from ares.migration.commands import CommandError

# How long a pull command waits for its reads (seconds). Loopback CPU reads move tens of MB/s; a stage is seconds
# at most. The environment variable lets a fault test shorten it.
TRANSFER_DEADLINE_S = float(os.environ.get("ARES_MIGRATE_TRANSFER_DEADLINE_S", "20"))
TRANSFER_THREADS = 2  # a read stuck on a stopped peer must not hold every other migration's reads


class TransferWorker:
    """Runs batches of Mooncake reads for a migration id and knows which migrations have reads in flight."""

    def __init__(self, threads: int = TRANSFER_THREADS, deadline_s: float = TRANSFER_DEADLINE_S):
        self.deadline_s = deadline_s
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ares-transfer")
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._waiters: dict[str, list[Callable[[], None]]] = {}

    def claim(self, mid: str) -> None:
        """Count a read for `mid` as in flight from now on. Called in the tick that hands the read its pages, so
        an abort (also in the tick) either comes first (no read starts) or sees the migration pulling."""
        with self._lock:
            self._in_flight[mid] = self._in_flight.get(mid, 0) + 1

    def release(self, mid: str) -> None:
        """Give back a `claim` that no read used."""
        self._done(mid)

    def read(self, mid: str, engine: Any, session: str, batches: list[tuple[list, list, list]]) -> None:
        """Read `batches` (local addresses, peer addresses, lengths) from `session` for migration `mid`, using a
        `claim` (released when the reads return). Raises `CommandError` 502 when Mooncake reports a failure, 504
        when the reads did not finish within the deadline (they go on in the background; the migration stays
        pulling until they return)."""
        try:
            fut: Future = self._pool.submit(_read_all, engine, session, batches)
        except BaseException:
            self.release(mid)
            raise
        fut.add_done_callback(lambda _f: self._done(mid))
        try:
            ret = fut.result(timeout=self.deadline_s)
        except FutureTimeout:
            raise CommandError(504, f"transfer_timeout:{self.deadline_s:.0f}s") from None
        if ret < 0:
            raise CommandError(502, f"transfer_failed:{ret}")

    def pulling(self, mid: str) -> bool:
        """Whether reads for `mid` may still write into its pages."""
        with self._lock:
            return self._in_flight.get(mid, 0) > 0

    def any_pulling(self) -> bool:
        """Whether any read is in flight."""
        with self._lock:
            return bool(self._in_flight)

    def when_idle(self, mid: str, fn: Callable[[], None]) -> None:
        """Call `fn` once no read for `mid` is in flight: now (this thread) or when the last one returns (the
        worker's thread: `fn` must only hand work to the scheduler thread)."""
        with self._lock:
            if self._in_flight.get(mid, 0) > 0:
                self._waiters.setdefault(mid, []).append(fn)
                return
        fn()

    def _done(self, mid: str) -> None:
        with self._lock:
            left = self._in_flight.get(mid, 0) - 1
            if left > 0:
                self._in_flight[mid] = left
                return
            self._in_flight.pop(mid, None)
            waiters = self._waiters.pop(mid, [])
        for fn in waiters:
            fn()


def _read_all(engine: Any, session: str, batches: list[tuple[list, list, list]]) -> int:
    """Mooncake's synchronous batch reads, one batch after the other; the first failure's code, or 0."""
    for local, peer, lengths in batches:
        ret = engine.batch_transfer_sync_read(session, local, peer, lengths)
        if ret < 0:
            return ret
    return 0
