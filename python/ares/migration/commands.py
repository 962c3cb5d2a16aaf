"""Command plumbing of the migration agent: the local service that takes the router's commands, the queue that
runs their scheduler-side part on the scheduler thread, and the answers kept so that a repeated command (the
router retrying after a lost reply) gets the same answer instead of acting twice.

Threads: commands arrive on the service thread (`migration_service`, ZMQ REP, one at a time); whatever touches
scheduler state is queued (`TickQueue.call`) and runs in the tick, on the scheduler thread between two decode
steps. A queued action that did not start within its timeout is cancelled (it never runs late: a commit the router
already gave up on must not happen behind its back); one that started is waited for (ticks are short).
"""

from __future__ import annotations

import logging
import queue
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import orjson

from ares.engine.state_report import ReplyService

logger = logging.getLogger("ares.migration")

TICK_TIMEOUT_S = 30.0
KEPT_ANSWERS = 1024  # repeated-command answers kept (a few per migration)


class CommandError(Exception):
    """A refused or failed command: `status` (HTTP-like: 404, 409, 410, 502, 504) and a short `reason`."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class TickQueue:
    """Actions for the scheduler thread: `call` (wait for the result, cancel on timeout) and `post` (fire and
    forget, e.g. from the transfer worker); `run_pending` runs them in the tick."""

    def __init__(self) -> None:
        self._tasks: queue.Queue[tuple[Callable[[], Any], Future | None]] = queue.Queue()

    def call(self, fn: Callable[[], Any], timeout_s: float = TICK_TIMEOUT_S) -> Any:
        """Run `fn` at the next tick and return its result (from another thread). Raises `CommandError(504)` if
        the tick did not start it within `timeout_s`: it is then cancelled and will never run."""
        fut: Future = Future()
        self._tasks.put((fn, fut))
        try:
            return fut.result(timeout=timeout_s)
        except FutureTimeout:
            if fut.cancel():
                raise CommandError(504, f"tick_timeout:{timeout_s:.0f}s (cancelled, not applied)") from None
            return fut.result()  # it started meanwhile: a tick action is short, its outcome stands

    def post(self, fn: Callable[[], Any]) -> None:
        """Run `fn` at the next tick; nobody waits for it (its errors are logged)."""
        self._tasks.put((fn, None))

    def empty(self) -> bool:
        """Whether no action waits for the tick."""
        return self._tasks.empty()

    def run_pending(self) -> None:
        """Scheduler thread: run every queued action that was not cancelled."""
        while True:
            try:
                fn, fut = self._tasks.get_nowait()
            except queue.Empty:
                return
            if fut is None:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - a posted action must not stop the scheduler
                    logger.exception("migration tick action failed")
                continue
            if not fut.set_running_or_notify_cancel():
                continue  # its caller gave up on it: never applied late
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - the waiting thread reports it
                fut.set_exception(e)


class Answers:
    """The answers of commands that change state, by (migration id, command): a repeat of one returns the first
    answer and does nothing (idempotence; the router repeats a command whose reply it lost)."""

    def __init__(self, keep: int = KEPT_ANSWERS):
        self.keep = keep
        self._answers: OrderedDict[tuple[str, str], dict] = OrderedDict()

    def get(self, mid: str, cmd: str) -> dict | None:
        """The answer given to `cmd` for `mid`, if it succeeded before."""
        return self._answers.get((mid, cmd))

    def put(self, mid: str, cmd: str, answer: dict) -> None:
        """Remember a successful answer (the oldest go once `keep` are kept)."""
        self._answers[(mid, cmd)] = answer
        while len(self._answers) > self.keep:
            self._answers.popitem(last=False)


# Commands that change state, answered once per migration id: a repeat gets the first answer and does nothing (the
# router repeats a command whose connection broke). `out_pause` too: repeated, it would find the request already
# out of the batch (409) instead of answering its paused state again.
REPEATABLE = frozenset({"out_begin", "in_reserve", "out_pause", "in_commit", "out_finalize", "out_resume", "in_abort"})


def dispatch(handlers: Any, answers: Answers, msg: dict) -> dict:
    """One command: `handlers.cmd_<cmd>(msg)`; a repeat of a state-changing command that succeeded answers the
    same; errors become `{"status", "reason"}`."""
    cmd = msg.get("cmd")
    handler = getattr(handlers, f"cmd_{cmd}", None)
    if handler is None:
        return {"status": 400, "reason": f"unknown command {cmd!r}"}
    mid = str(msg.get("mid", ""))
    if cmd in REPEATABLE and (done := answers.get(mid, cmd)) is not None:
        return {**done, "repeated": True}
    try:
        answer = {"status": 200, **handler(msg)}
    except CommandError as e:
        return {"status": e.status, "reason": e.reason}
    except CancelledError:
        return {"status": 504, "reason": "cancelled"}
    except Exception as e:  # noqa: BLE001 - a failed command must answer, not kill the service
        logger.exception("migration command %s failed", cmd)
        return {"status": 500, "reason": f"{type(e).__name__}: {e}"}
    if cmd in REPEATABLE and mid:
        answers.put(mid, cmd, answer)
    return answer


def migration_service(handle: Callable[[dict], dict], address: str) -> ReplyService:
    """The migration command service: JSON command in, `handle`'s JSON answer out, one command at a time."""

    def answer(raw: bytes) -> bytes:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            return orjson.dumps({"status": 400, "reason": f"bad JSON: {e}"})
        return orjson.dumps(handle(msg))

    return ReplyService("migration", address, answer)
