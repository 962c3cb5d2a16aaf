"""The migration agent inside a decode server's scheduler process (TP rank 0, `--ares`): the source (A) and
destination (B) halves of `docs/migration.md`, as records and their commands.

Three helpers do the rest: `commands` (the service thread, the tick queue, repeated commands answered once),
`transfer` (B's Mooncake reads on worker threads with a deadline) and `surgery` (everything done to SGLang's
objects). Anything that touches scheduler state runs in the tick, on the scheduler thread between two decode
steps (an AFTER hook on `process_decode_queue`). B's reads run outside the tick: the pages they write belong to
B's reservation and the pages they read are ones A keeps until B's commit, so the scheduler goes on decoding.

Pages are never freed while a read may still write into them: an incoming migration whose reads are in flight
("pulling") that is aborted (command, TTL, client abort) ends its request's stream at once and frees its pages
when the last read returns.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ares.migration import surgery
from ares.migration.commands import Answers, CommandError, TickQueue, dispatch
from ares.migration.commands import migration_service as _service
from ares.migration.pages import page_pairs, page_runs, read_batch, split_batches
from ares.migration.transfer import TransferWorker
from ares_router.wire import MID_PARAM, MIGRATED_PREFIX

logger = logging.getLogger("ares.migration")

__all__ = ["ARRIVED_ATTR", "MID_PARAM", "CommandError", "MigrationAgent", "migration_service", "prompt_digest"]

# B frees an incoming migration no command touched for this long (A or the router gone silent, e.g. a router that
# died mid-migration). The environment variable sets it for a server (tests shorten it).
IDLE_TTL_S = float(os.environ.get("ARES_MIGRATE_IDLE_TTL_S", "60"))
KEPT_RECORDS = 256  # ended records kept per direction for `status`

# Set on a request once its migration committed here (see `MigrationAgent.attach`).
ARRIVED_ATTR = "_ares_migration_arrived"
prompt_digest = surgery.prompt_digest


@dataclass
class Outgoing:
    """A's record of a request leaving."""

    mid: str
    req: Any
    paused: bool = False
    done: str | None = None  # "finalized" | "resumed" | "aborted"


@dataclass
class Incoming:
    """B's record of a request arriving: the attached `Req` (R's request for it) and its growing KV allocation."""

    mid: str
    req: Any
    touched: float = field(default_factory=time.monotonic)  # the last command for it (or the attach)
    source: dict | None = None  # A's KV layout (session, buffer pointers, item lengths, page size)
    allocated: int = 0  # positions of KV allocated in the request's row
    pulled: int = 0  # positions whose KV has arrived
    bytes: int = 0
    state: str = "attached"  # attached | reserved | committed | aborted
    holds_pages: bool = False  # reserved pages not yet given to SGLang (commit) or back to the pool (free)


class MigrationAgent:
    """Per scheduler process: the migration records, their commands and the scheduler-side actions."""

    def __init__(self, scheduler: Any, transfers: TransferWorker | None = None):
        self.scheduler = scheduler
        self.queue = TickQueue()
        self.answers = Answers()
        self.transfers = transfers or TransferWorker()
        self.outgoing: dict[str, Outgoing] = {}
        self.incoming: dict[str, Incoming] = {}
        self.paused: set[int] = set()  # id() of requests A keeps out of its batches

    # -- plumbing ---------------------------------------------------------------------------------------------------
    def in_tick(self, fn: Any) -> Any:
        """Run `fn` on the scheduler thread at the next tick (cancelled, never run late, on timeout)."""
        return self.queue.call(fn)

    def handle(self, msg: dict) -> dict:
        """One command (service thread): dispatch by `cmd`, repeats answered once, errors as `{status, reason}`."""
        return dispatch(self, self.answers, msg)

    def tick(self) -> None:
        """Scheduler thread, between decode steps: run the queued actions; expire silent incoming migrations."""
        if self.incoming:
            now = time.monotonic()
            for rec in list(self.incoming.values()):
                if rec.state in ("attached", "reserved") and now - rec.touched > IDLE_TTL_S:
                    self._abort_incoming(rec, f"no command for {IDLE_TTL_S:.0f} s")
            done = [m for m, r in self.incoming.items() if r.state in ("committed", "aborted") and not r.holds_pages]
            for mid in done[: max(len(done) - KEPT_RECORDS, 0)]:
                del self.incoming[mid]
        ended = [m for m, o in self.outgoing.items() if o.done]
        for mid in ended[: max(len(ended) - KEPT_RECORDS, 0)]:
            del self.outgoing[mid]
        self.queue.run_pending()

    def holds(self) -> bool:
        """Whether the agent holds requests or KV outside SGLang's queues (a paused request on A, an attached or
        reserved one on B, pages waiting for a read to return) or has actions waiting for a tick: the server is
        not idle then, or SGLang's idle leak check would count those pages as leaked, and with `--sleep-on-idle`
        the scheduler would sleep instead of ticking."""
        return (
            bool(self.paused)
            or not self.queue.empty()
            or any(r.state in ("attached", "reserved") or r.holds_pages for r in self.incoming.values())
        )

    def exclude_paused(self, batch: Any) -> None:
        """Keep paused requests out of the batch about to run (their KV stays allocated)."""
        if self.paused and batch is not None and batch.reqs:
            excluded = [r for r in batch.reqs if id(r) in self.paused]
            if excluded:
                batch.filter_batch(reqs_to_exclude=excluded)

    def attach(self, req: Any) -> bool:
        """B: R's request for a migrating request reached the decode queue; keep it here instead (no prefill)."""
        params = getattr(req.sampling_params, "custom_params", None) or {}
        mid = params.get(MID_PARAM)
        if not mid or getattr(req, ARRIVED_ATTR, False):
            # A request that already arrived here and was later retracted comes back through the same queue: it is
            # SGLang's again (held here, it would wait for commands that never come and be aborted as idle).
            return False
        self.incoming[str(mid)] = Incoming(str(mid), req)
        logger.info("migration %s: request %s attached", mid, req.rid)
        return True

    def _out(self, mid: str) -> Outgoing:
        out = self.outgoing.get(mid)
        if out is None or out.done:
            raise CommandError(410, "unknown_migration")
        return out

    def _in(self, mid: str) -> Incoming:
        rec = self.incoming.get(mid)
        if rec is None or rec.state in ("committed", "aborted"):
            raise CommandError(410, "unknown_migration")
        rec.touched = time.monotonic()
        return rec

    def on_abort(self, rid: str, abort_all: bool) -> None:
        """After SGLang's `abort_request` (scheduler thread): SGLang does not see requests the agent holds, so
        abort them here: an attached/reserved incoming one (B) and a paused outgoing one (A), freeing their KV."""
        if not rid and not abort_all:
            return  # an empty rid would match every request

        def hit(req: Any) -> bool:
            return abort_all or req.rid.startswith(rid)

        for rec in list(self.incoming.values()):
            if rec.state in ("attached", "reserved") and hit(rec.req):
                self._abort_incoming(rec, "request aborted")
        for out in self.outgoing.values():
            if out.paused and not out.done and hit(out.req):
                self.paused.discard(id(out.req))
                surgery.end_stream(self.scheduler, out.req, surgery.finish_abort("aborted while migrating"))
                surgery.free(self.scheduler, out.req)
                out.done = "aborted"

    # -- A: the source ----------------------------------------------------------------------------------------------
    def cmd_out_begin(self, msg: dict) -> dict:
        """Check that `rid` runs here and can move; return its prompt, outputs so far, written length and layout."""

        def act() -> dict:
            req = surgery.running(self.scheduler, msg["rid"])
            why = surgery.not_migratable(req, self.scheduler, msg.get("endpoint", "/generate"))
            if why:
                raise CommandError(409, f"not_migratable:{why}")
            self.outgoing[msg["mid"]] = Outgoing(msg["mid"], req)
            return {
                "prompt_tokens": len(req.origin_input_ids),
                "prompt_digest": surgery.prompt_digest(req.origin_input_ids),
                "output_ids": list(req.output_ids),
                "written": surgery.written(req),
                "layout": surgery.layout(self.scheduler),
            }

        return self.in_tick(act)

    def cmd_out_slots(self, msg: dict) -> dict:
        """A's slots for positions `[start, written)` now; the request keeps decoding."""

        def act() -> dict:
            out = self._out(msg["mid"])
            if out.req.finished():
                raise CommandError(409, "finished")
            n = surgery.written(out.req)
            return {"written": n, "slots": surgery.slots(self.scheduler, out.req, msg["start"], n)}

        return self.in_tick(act)

    def cmd_out_pause(self, msg: dict) -> dict:
        """Stop decoding the request (from the batch about to be built); return its exact state for B's commit."""

        def act() -> dict:
            out = self._out(msg["mid"])
            req = out.req
            if req.finished() or req not in self.scheduler.running_batch.reqs:
                raise CommandError(409, "finished" if req.finished() else "not_running")
            n = surgery.written(req)
            if req.kv.kv_committed_len != n:  # a step in flight (overlap) or over-allocation: not stable
                raise CommandError(409, f"unstable:{req.kv.kv_committed_len}!={n}")
            out.paused = True
            self.paused.add(id(req))
            return {
                "output_ids": list(req.output_ids),
                "written": n,
                "slots": surgery.slots(self.scheduler, req, msg["start"], n),
            }

        return self.in_tick(act)

    def cmd_out_finalize(self, msg: dict) -> dict:
        """B committed: end A's stream (every token flushed, finish `abort` with the migrated message) and free r."""

        def act() -> dict:
            out = self._out(msg["mid"])
            req = out.req
            self.paused.discard(id(req))
            self.scheduler.running_batch.filter_batch(reqs_to_exclude=[req])
            surgery.end_stream(self.scheduler, req, surgery.finish_abort(MIGRATED_PREFIX + out.mid))
            surgery.free(self.scheduler, req)
            out.done = "finalized"
            return {"n_output": len(req.output_ids)}

        return self.in_tick(act)

    def cmd_out_resume(self, msg: dict) -> dict:
        """The migration failed: the request goes on here (back through SGLang's prebuilt path if it was paused)."""

        def act() -> dict:
            out = self.outgoing.get(msg["mid"])
            if out is None or out.done:
                return {"resumed": False}
            req = out.req
            self.paused.discard(id(req))
            resumed = out.paused and not req.finished()
            if resumed:
                req.is_retracted = False
                self.scheduler.waiting_queue.append(req)
            out.done = "resumed"
            return {"resumed": resumed}

        return self.in_tick(act)

    # -- B: the destination -----------------------------------------------------------------------------------------
    def cmd_in_reserve(self, msg: dict) -> dict:
        """Allocate a row and KV for the attached request at A's current length, or refuse."""

        def act() -> dict:
            rec = self.incoming.get(msg["mid"])
            if rec is None:
                raise CommandError(404, "not_attached")
            if rec.state != "attached":
                raise CommandError(409, f"state:{rec.state}")
            rec.touched = time.monotonic()
            req = rec.req
            if surgery.prompt_digest(req.origin_input_ids) != msg["prompt_digest"]:
                raise CommandError(409, "prompt_mismatch")
            mine, src = surgery.layout(self.scheduler), msg["layout"]
            if (src["item_lens"], src["page_size"]) != (mine["item_lens"], mine["page_size"]):
                raise CommandError(409, "layout_mismatch")
            rec.allocated = surgery.reserve(self.scheduler, req, msg["output_ids"])
            rec.source, rec.state, rec.holds_pages = src, "reserved", True
            return {"reserved_tokens": rec.allocated}

        return self.in_tick(act)

    def _pull(self, mid: str, start: int, end: int, src_slots: list[int]) -> dict:
        """Read positions `[start, end)` of A's KV into B's allocation (growth in the tick, the reads on the
        transfer worker, waited for up to its deadline)."""
        if len(src_slots) != end - start:
            raise CommandError(400, f"{len(src_slots)} slots for positions [{start}, {end})")

        def grow() -> tuple[list[int], dict, dict]:
            rec = self._in(mid)
            if rec.state != "reserved":
                raise CommandError(409, f"state:{rec.state}")
            rec.allocated = surgery.grow(self.scheduler, rec.req, rec.allocated, end)
            assert rec.source is not None
            out = surgery.slots(self.scheduler, rec.req, start, end), rec.source, surgery.layout(self.scheduler)
            self.transfers.claim(mid)  # pulling from here on: an abort now frees the pages after the reads
            return out

        dst_slots, src, mine = self.in_tick(grow)
        t0 = time.perf_counter()
        claimed = True
        try:
            runs = page_runs(page_pairs(src_slots, dst_slots, src["page_size"]))
            local, peer, lengths = read_batch(runs, src["ptrs"], mine["ptrs"], src["item_lens"])
            if lengths:
                engine = surgery.transfer_engine(self.scheduler)
                claimed = False  # the worker releases it when the reads return
                self.transfers.read(mid, engine, src["session"], split_batches(local, peer, lengths))
        finally:
            if claimed:
                self.transfers.release(mid)
        rec = self._in(mid)  # aborted while reading (client gone, TTL): 410, its pages freed once the reads return
        rec.pulled = max(rec.pulled, end)
        rec.bytes += sum(lengths)
        return {"bytes": sum(lengths), "seconds": time.perf_counter() - t0, "runs": len(runs)}

    def cmd_in_pull(self, msg: dict) -> dict:
        """One pre-copy stage: positions `[start, end)`."""
        return self._pull(msg["mid"], msg["start"], msg["end"], msg["slots"])

    def cmd_in_commit(self, msg: dict) -> dict:
        """The last delta, then the request joins B's batches and continues with the next token."""
        mid, output_ids = msg["mid"], list(msg["output_ids"])
        stage = self._pull(mid, msg["start"], msg["end"], msg["slots"])

        def act() -> dict:
            rec = self._in(mid)
            req = rec.req
            n_written = surgery.written(req, output_ids)
            if n_written != msg["end"] or rec.pulled < n_written:
                raise CommandError(409, f"mismatch:{n_written}/{msg['end']}/{rec.pulled}")
            assert rec.allocated == n_written, (rec.allocated, n_written)  # grown stage by stage, never past A's
            surgery.continue_from(req, output_ids, n_written)
            self.scheduler.waiting_queue.append(req)  # the prebuilt path: o_n is the next input, no forward
            setattr(req, ARRIVED_ATTR, True)
            rec.state, rec.holds_pages = "committed", False  # the pages are r's, SGLang's to free
            return {"n_output": len(output_ids), "bytes": rec.bytes}

        return {**self.in_tick(act), "last_stage": stage}

    def cmd_in_abort(self, msg: dict) -> dict:
        """Free the reservation and end R's attach request with an error; idempotent. Answers the record's state:
        `committed` tells the router (resolving a lost commit reply) that the move did happen."""

        def act() -> dict:
            rec = self.incoming.get(msg["mid"])
            if rec is None or rec.state in ("committed", "aborted"):
                return {"state": rec.state if rec else "unknown"}
            self._abort_incoming(rec, msg.get("reason") or "aborted")
            return {"state": "aborted"}

        return self.in_tick(act)

    def _abort_incoming(self, rec: Incoming, reason: str) -> None:
        """Tick: end R's request for `rec` with a 503 and give its pages back, once no read writes into them."""
        message = f"ares migration {rec.mid} aborted: {reason}"
        surgery.end_stream(self.scheduler, rec.req, surgery.finish_abort(message, status_code=503))
        rec.state = "aborted"
        logger.info("migration %s: incoming request %s aborted (%s)", rec.mid, rec.req.rid, reason)
        if not rec.holds_pages:
            return

        def free_now() -> None:
            if rec.holds_pages:
                rec.holds_pages = False
                surgery.free(self.scheduler, rec.req)

        # Reads are claimed in the tick (this thread), so "not pulling" cannot turn into "pulling" meanwhile.
        if not self.transfers.pulling(rec.mid):
            free_now()
            return
        logger.info("migration %s: pages freed once its reads return", rec.mid)
        # Called on the worker's thread when the last read returns: it hands the free to the tick.
        self.transfers.when_idle(rec.mid, lambda: self.queue.post(free_now))

    def report(self) -> dict:
        """`/ares/state`'s migration block (read from the state service's thread, over copies of the records):
        KV reserved for incoming requests (already inside `used_tokens`), migrations in and out in progress, and
        the pool's KV bytes per token (what a migration moves per position, for the router's cost model)."""
        incoming, outgoing = list(self.incoming.values()), list(self.outgoing.values())
        lay = surgery.layout(self.scheduler)
        return {
            "version": 1,
            "reserved_tokens": sum(r.allocated for r in incoming if r.holds_pages),
            "in": sum(r.state in ("attached", "reserved") for r in incoming),
            "out": sum(o.done is None for o in outgoing),
            "kv_bytes_per_token": sum(lay["item_lens"]) / lay["page_size"],
        }

    def cmd_status(self, msg: dict) -> dict:
        """Reserved tokens and the records (for the router's resolution and tests); answered without the tick.
        An incoming record still waiting for its reads to return before its pages are freed shows as `pulling`."""
        incoming = list(self.incoming.items())
        return {
            "reserved_tokens": sum(r.allocated for _, r in incoming if r.holds_pages),
            "incoming": {m: ("pulling" if r.state == "aborted" and r.holds_pages else r.state) for m, r in incoming},
            "outgoing": {m: (o.done or ("paused" if o.paused else "precopy")) for m, o in list(self.outgoing.items())},
        }


def migration_service(agent: MigrationAgent, address: str) -> Any:
    """The migration command service of `agent` (`commands.migration_service`)."""
    return _service(agent.handle, address)
