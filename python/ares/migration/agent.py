"""The migration agent inside a decode server's scheduler process (TP rank 0, `--ares`): the source (A) and
destination (B) halves of `docs/migration.md`.

Commands arrive as JSON on a local ZMQ REP socket (`migration_service`, a thread). Anything that touches scheduler
state (the running batch, allocators, `req_to_token`, queues, streams) runs in the **tick**, on the scheduler
thread between two decode steps (an AFTER hook on `process_decode_queue`); the service thread waits for it. B's
Mooncake reads run on the service thread, outside the tick: the pages they write belong to B's reservation and
the pages they read are ones A keeps until B's commit, so the scheduler can go on decoding meanwhile.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import time
from array import array
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import orjson

from ares.engine.state_report import ReplyService
from ares.migration.pages import page_pairs, page_runs, read_batch, split_batches

logger = logging.getLogger("ares.migration")

MID_PARAM = "ares_mid"  # `sampling_params.custom_params` key marking R's attach request on B
MIGRATED_PREFIX = "ares_migrated:"  # A's finish message once B has committed
TICK_TIMEOUT_S = 30.0
IDLE_TTL_S = 60.0  # B frees an incoming migration no command touched for this long (A or R gone silent)


# Set on a request once its migration committed here (see `MigrationAgent.attach`).
ARRIVED_ATTR = "_ares_migration_arrived"


class CommandError(Exception):
    """A refused or failed command: `status` (HTTP-like: 404, 409, 410, 502) and a short `reason`."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Outgoing:
    """A's record of a request leaving."""

    mid: str
    req: Any
    paused: bool = False
    done: str | None = None  # "finalized" | "resumed"


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


def prompt_digest(ids: list[int]) -> str:
    """A short digest of a prompt's token ids: A and B must be talking about the same request."""
    return hashlib.sha1(orjson.dumps(list(ids))).hexdigest()[:16]


class MigrationAgent:
    """Per scheduler process: the command queue, the outgoing/incoming records and the scheduler-side actions."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler
        self.tasks: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self.outgoing: dict[str, Outgoing] = {}
        self.incoming: dict[str, Incoming] = {}
        self.paused: set[int] = set()  # id() of requests A keeps out of its batches

    # -- plumbing ---------------------------------------------------------------------------------------------------
    def in_tick(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the scheduler thread at the next tick and return its result (from another thread)."""
        fut: Future = Future()
        self.tasks.put((fn, fut))
        return fut.result(timeout=TICK_TIMEOUT_S)

    def tick(self) -> None:
        """Scheduler thread, between decode steps: run the queued actions; expire silent incoming migrations."""
        if self.incoming:
            now = time.monotonic()
            for rec in list(self.incoming.values()):
                if rec.state in ("attached", "reserved") and now - rec.touched > IDLE_TTL_S:
                    self._abort_incoming(rec, f"no command for {IDLE_TTL_S:.0f} s")
            done = [m for m, r in self.incoming.items() if r.state in ("committed", "aborted")]
            for mid in done[: max(len(done) - 256, 0)]:  # keep the last records for `status`
                del self.incoming[mid]
        ended = [m for m, o in self.outgoing.items() if o.done]
        for mid in ended[: max(len(ended) - 256, 0)]:
            del self.outgoing[mid]
        while True:
            try:
                fn, fut = self.tasks.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - the waiting thread reports it
                fut.set_exception(e)

    def holds(self) -> bool:
        """Whether the agent holds requests or KV outside SGLang's queues (a paused request on A, an attached or
        reserved one on B) or has commands waiting for a tick: the server is not idle then, or SGLang's idle leak
        check would count those pages as leaked, and with `--sleep-on-idle` the scheduler would sleep instead of
        ticking."""
        return (
            bool(self.paused)
            or not self.tasks.empty()
            or any(r.state in ("attached", "reserved") for r in self.incoming.values())
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

    def handle(self, msg: dict) -> dict:
        """One command (service thread): dispatch by `cmd`; errors become `{"status", "reason"}`."""
        cmd = msg.get("cmd")
        handler = getattr(self, f"cmd_{cmd}", None)
        if handler is None:
            return {"status": 400, "reason": f"unknown command {cmd!r}"}
        try:
            return {"status": 200, **handler(msg)}
        except CommandError as e:
            return {"status": e.status, "reason": e.reason}
        except Exception as e:  # noqa: BLE001 - a failed command must answer, not kill the service
            logger.exception("migration command %s failed", cmd)
            return {"status": 500, "reason": f"{type(e).__name__}: {e}"}

    # -- scheduler access -------------------------------------------------------------------------------------------
    @property
    def _prealloc(self) -> Any:
        return self.scheduler.disagg_decode_prealloc_queue

    def _layout(self) -> dict:
        kv = self._prealloc.kv_manager
        return {
            "session": kv.get_session_id(),
            "ptrs": [int(p) for p in kv.kv_args.kv_data_ptrs],
            "item_lens": [int(n) for n in kv.kv_args.kv_item_lens],
            "page_size": int(self.scheduler.token_to_kv_pool_allocator.page_size),
        }

    def _slots(self, req: Any, start: int, end: int) -> list[int]:
        row = req.kv.req_pool_idx
        return self.scheduler.req_to_token_pool.req_to_token[row, start:end].tolist()

    @staticmethod
    def _written(req: Any, output_ids: Any = None) -> int:
        """Positions whose KV is written: prompt + outputs but the last (its KV comes with the next step)."""
        n = len(req.output_ids if output_ids is None else output_ids)
        return len(req.origin_input_ids) + max(n - 1, 0)

    def _running(self, rid: str) -> Any:
        for req in self.scheduler.running_batch.reqs:
            if req.rid == rid and not req.finished():
                return req
        raise CommandError(409, "not_running")

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
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

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
                self._end(out.req, FINISH_ABORT(message="aborted while migrating"), free=True)
                out.done = "aborted"

    # -- A: the source ----------------------------------------------------------------------------------------------
    def cmd_out_begin(self, msg: dict) -> dict:
        """Check that `rid` runs here and can move; return its prompt, outputs so far, written length and layout."""

        def act() -> dict:
            req = self._running(msg["rid"])
            why = _not_migratable(req, self.scheduler, msg.get("endpoint", "/generate"))
            if why:
                raise CommandError(409, f"not_migratable:{why}")
            self.outgoing[msg["mid"]] = Outgoing(msg["mid"], req)
            return {
                "prompt_tokens": len(req.origin_input_ids),
                "prompt_digest": prompt_digest(req.origin_input_ids),
                "output_ids": list(req.output_ids),
                "written": self._written(req),
                "layout": self._layout(),
            }

        return self.in_tick(act)

    def cmd_out_slots(self, msg: dict) -> dict:
        """A's slots for positions `[start, written)` now; the request keeps decoding."""

        def act() -> dict:
            out = self._out(msg["mid"])
            if out.req.finished():
                raise CommandError(409, "finished")
            written = self._written(out.req)
            return {"written": written, "slots": self._slots(out.req, msg["start"], written)}

        return self.in_tick(act)

    def cmd_out_pause(self, msg: dict) -> dict:
        """Stop decoding the request (from the batch about to be built); return its exact state for B's commit."""

        def act() -> dict:
            out = self._out(msg["mid"])
            req = out.req
            if req.finished() or req not in self.scheduler.running_batch.reqs:
                raise CommandError(409, "finished" if req.finished() else "not_running")
            written = self._written(req)
            if req.kv.kv_committed_len != written:  # a step in flight (overlap) or over-allocation: not stable
                raise CommandError(409, f"unstable:{req.kv.kv_committed_len}!={written}")
            out.paused = True
            self.paused.add(id(req))
            return {
                "output_ids": list(req.output_ids),
                "written": written,
                "slots": self._slots(req, msg["start"], written),
            }

        return self.in_tick(act)

    def cmd_out_finalize(self, msg: dict) -> dict:
        """B committed: end A's stream (every token flushed, finish `abort` with the migrated message) and free r."""

        def act() -> dict:
            from sglang.srt.managers.schedule_batch import FINISH_ABORT

            out = self._out(msg["mid"])
            req = out.req
            self.paused.discard(id(req))
            self.scheduler.running_batch.filter_batch(reqs_to_exclude=[req])
            self._end(req, FINISH_ABORT(message=MIGRATED_PREFIX + out.mid), free=True)
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
        """Allocate a row and KV for the attached request at A's current length (plus headroom), or refuse."""

        def act() -> dict:
            rec = self.incoming.get(msg["mid"])
            if rec is None:
                raise CommandError(404, "not_attached")
            if rec.state != "attached":
                raise CommandError(409, f"state:{rec.state}")
            req = rec.req
            if prompt_digest(req.origin_input_ids) != msg["prompt_digest"]:
                raise CommandError(409, "prompt_mismatch")
            layout = self._layout()
            src = msg["layout"]
            if (src["item_lens"], src["page_size"]) != (layout["item_lens"], layout["page_size"]):
                raise CommandError(409, "layout_mismatch")
            need = self._written(req, msg["output_ids"]) + int(msg.get("headroom_tokens", 0))
            free = int(self.scheduler.token_to_kv_pool_allocator.available_size())
            if self.scheduler.req_to_token_pool.available_size() <= 0:
                raise CommandError(409, "no_row")
            if need > free:
                raise CommandError(409, f"no_memory:{need}>{free}")
            req.output_ids = array("q", msg["output_ids"])
            self._prealloc._pre_alloc(req)  # row + KV for the positions written on A so far, SGLang's bookkeeping
            rec.allocated = req.kv.kv_committed_len
            rec.source = src
            rec.state = "reserved"
            return {"reserved_tokens": rec.allocated}

        return self.in_tick(act)

    def _grow(self, rec: Incoming, end: int) -> None:
        """Tick: extend B's allocation for the request to `end` positions."""
        if end <= rec.allocated:
            return
        req = rec.req
        alloc = self.scheduler.token_to_kv_pool_allocator
        if alloc.page_size == 1:
            loc = alloc.alloc(end - rec.allocated)
        else:
            import torch

            device = alloc.device
            last = self.scheduler.req_to_token_pool.req_to_token[req.kv.req_pool_idx, rec.allocated - 1 : rec.allocated]
            loc = alloc.alloc_extend(
                prefix_lens=torch.tensor([rec.allocated], dtype=torch.int64, device=device),
                prefix_lens_cpu=torch.tensor([rec.allocated], dtype=torch.int64),
                seq_lens=torch.tensor([end], dtype=torch.int64, device=device),
                seq_lens_cpu=torch.tensor([end], dtype=torch.int64),
                last_loc=last.to(dtype=torch.int64, device=device),
                extend_num_tokens=end - rec.allocated,
            )
        if loc is None:
            raise CommandError(507, "reservation_exceeded")
        self.scheduler.req_to_token_pool.write((req.kv.req_pool_idx, slice(rec.allocated, end)), loc)
        rec.allocated = end
        req.kv.kv_committed_len = req.kv.kv_allocated_len = end

    def _pull(self, mid: str, start: int, end: int, src_slots: list[int]) -> dict:
        """Read positions `[start, end)` of A's KV into B's allocation (service thread; growth in the tick)."""
        if len(src_slots) != end - start:
            raise CommandError(400, f"{len(src_slots)} slots for positions [{start}, {end})")

        def grow() -> list[int]:
            rec = self._in(mid)
            if rec.state != "reserved":
                raise CommandError(409, f"state:{rec.state}")
            self._grow(rec, end)
            return self._slots(rec.req, start, end)

        dst_slots = self.in_tick(grow)
        rec = self._in(mid)
        src, t0 = rec.source, time.perf_counter()
        assert src is not None
        runs = page_runs(page_pairs(src_slots, dst_slots, src["page_size"]))
        mine = self._layout()
        local, peer, lengths = read_batch(runs, src["ptrs"], mine["ptrs"], src["item_lens"])
        if lengths:
            engine = self._prealloc.kv_manager.engine.engine  # Mooncake's TransferEngine, KV pool registered
            for batch in split_batches(local, peer, lengths):
                ret = engine.batch_transfer_sync_read(src["session"], *batch)
                if ret < 0:
                    raise CommandError(502, f"transfer_failed:{ret}")
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
            written = self._written(req, output_ids)
            if written != msg["end"] or rec.pulled < written:
                raise CommandError(409, f"mismatch:{written}/{msg['end']}/{rec.pulled}")
            assert rec.allocated == written, (rec.allocated, written)  # grown stage by stage, never past A's length
            _continue_from(req, output_ids, written)
            self.scheduler.waiting_queue.append(req)  # the prebuilt path: o_n is the next input, no forward
            setattr(req, ARRIVED_ATTR, True)
            rec.state = "committed"
            return {"n_output": len(output_ids), "bytes": rec.bytes}

        return {**self.in_tick(act), "last_stage": stage}

    def cmd_in_abort(self, msg: dict) -> dict:
        """Free the reservation and end R's attach request with an error; idempotent."""

        def act() -> dict:
            rec = self.incoming.get(msg["mid"])
            if rec is None or rec.state in ("committed", "aborted"):
                return {"state": rec.state if rec else "unknown"}
            self._abort_incoming(rec, msg.get("reason", "aborted"))
            return {"state": "aborted"}

        return self.in_tick(act)

    def _abort_incoming(self, rec: Incoming, reason: str) -> None:
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        message = f"ares migration {rec.mid} aborted: {reason}"
        self._end(rec.req, FINISH_ABORT(message=message, status_code=503), free=rec.state == "reserved")
        rec.state = "aborted"
        logger.info("migration %s: incoming request %s aborted (%s)", rec.mid, rec.req.rid, reason)

    def _end(self, req: Any, reason: Any, free: bool) -> None:
        """Tick: finish a request the agent holds (SGLang's queues do not list it): its stream gets every unsent
        token and `reason`; with `free`, its row and KV go back to the pools."""
        from sglang.srt.mem_cache.common import release_kv_cache

        req.finished_reason = reason
        self.scheduler.output_streamer.stream_output([req], False)
        if free:
            release_kv_cache(req, self.scheduler.tree_cache, checkpoint=False)

    def report(self) -> dict:
        """`/ares/state`'s migration block (read from the state service's thread, over copies of the records):
        KV reserved for incoming requests (already inside `used_tokens`), migrations in and out in progress, and
        the pool's KV bytes per token (what a migration moves per position, for the router's cost model)."""
        incoming, outgoing = list(self.incoming.values()), list(self.outgoing.values())
        layout = self._layout()
        return {
            "version": 1,
            "reserved_tokens": sum(r.allocated for r in incoming if r.state == "reserved"),
            "in": sum(r.state in ("attached", "reserved") for r in incoming),
            "out": sum(o.done is None for o in outgoing),
            "kv_bytes_per_token": sum(layout["item_lens"]) / layout["page_size"],
        }

    def cmd_status(self, msg: dict) -> dict:
        """Reserved tokens and the records (for `/ares/state` and tests); answered without the tick."""
        return {
            "reserved_tokens": sum(r.allocated for r in self.incoming.values() if r.state == "reserved"),
            "incoming": {m: r.state for m, r in self.incoming.items()},
            "outgoing": {m: (o.done or ("paused" if o.paused else "precopy")) for m, o in self.outgoing.items()},
        }


def _continue_from(req: Any, output_ids: list[int], written: int) -> None:
    """B: make the attached request look like one SGLang just received with `output_ids` generated and KV for
    `written` positions (what `_pre_alloc` sets for a transferred request), streaming from token n+1 on."""
    n = len(output_ids)
    req.output_ids = array("q", output_ids)
    req.kv.kv_committed_len = req.kv.kv_allocated_len = written
    req.full_untruncated_fill_ids = req.origin_input_ids + req.output_ids
    req.prefix_len = 0
    req.extend_end = written
    # A already streamed o_1..o_n: B's chunks start at o_{n+1}, its counts include all n (usage stays right) ...
    req.send_token_offset = n
    # ... and its detokenizer starts with the last few tokens as context, so its text starts at o_{n+1} too.
    from sglang.srt.managers.schedule_batch import INIT_INCREMENTAL_DETOKENIZATION_OFFSET

    ids = req.origin_input_ids_unpadded + req.output_ids  # the same container types SGLang builds it from
    req.read_offset = len(req.origin_input_ids_unpadded) + n
    req.surr_offset = max(req.read_offset - INIT_INCREMENTAL_DETOKENIZATION_OFFSET, 0)
    req.surr_and_decode_ids = ids[req.surr_offset :]
    req.cur_decode_ids_len = n
    req.send_decode_id_offset = 0


def _not_migratable(req: Any, scheduler: Any, endpoint: str) -> str | None:
    """Why `req` (a request to `endpoint`) cannot move in v1 (`docs/migration.md` §1), or None."""
    sp = req.sampling_params
    if scheduler.enable_overlap:
        return "overlap_scheduler"
    args = scheduler.server_args
    if endpoint == "/v1/chat/completions" and (args.reasoning_parser or args.tool_call_parser):
        return "chat_parser"  # the reasoning/tool-call parser's state lives in A's HTTP handler
    if getattr(req, "grammar", None) is not None:
        return "grammar"
    if req.return_logprob:
        return "logprob"
    if getattr(req, "return_hidden_states", False):
        return "hidden_states"
    if sp.frequency_penalty or sp.presence_penalty or sp.repetition_penalty != 1.0 or sp.min_new_tokens:
        return "penalties"
    if getattr(req, "lora_id", None):
        return "lora"
    if getattr(req, "multimodal_inputs", None) is not None:
        return "multimodal"
    return None


def migration_service(agent: MigrationAgent, address: str) -> ReplyService:
    """The migration command service: JSON command in, the agent's JSON answer out, one command at a time."""

    def answer(raw: bytes) -> bytes:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            return orjson.dumps({"status": 400, "reason": f"bad JSON: {e}"})
        return orjson.dumps(agent.handle(msg))

    return ReplyService("migration", address, answer)
