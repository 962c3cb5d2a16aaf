"""What the migration agent does to SGLang's own objects, on the scheduler thread: read a request's KV layout and
page slots, grow a reservation, end a request's stream, free its KV, and make an attached request continue from
the tokens another server produced. Every SGLang field the migration touches is named here, nowhere else.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Any

import orjson

from ares.migration.commands import CommandError


def prompt_digest(ids: list[int]) -> str:
    """A short digest of a prompt's token ids: A and B must be talking about the same request."""
    return hashlib.sha1(orjson.dumps(list(ids))).hexdigest()[:16]


def layout(scheduler: Any) -> dict:
    """This server's KV pool as a peer reads it: Mooncake session, buffer pointers, item lengths, page size."""
    kv = scheduler.disagg_decode_prealloc_queue.kv_manager
    return {
        "session": kv.get_session_id(),
        "ptrs": [int(p) for p in kv.kv_args.kv_data_ptrs],
        "item_lens": [int(n) for n in kv.kv_args.kv_item_lens],
        "page_size": int(scheduler.token_to_kv_pool_allocator.page_size),
    }


def transfer_engine(scheduler: Any) -> Any:
    """Mooncake's TransferEngine with this server's KV pool registered."""
    return scheduler.disagg_decode_prealloc_queue.kv_manager.engine.engine


def slots(scheduler: Any, req: Any, start: int, end: int) -> list[int]:
    """The KV slots of positions `[start, end)` of `req`."""
    return scheduler.req_to_token_pool.req_to_token[req.kv.req_pool_idx, start:end].tolist()


def written(req: Any, output_ids: Any = None) -> int:
    """Positions whose KV is written: prompt + outputs but the last (its KV comes with the next step)."""
    n = len(req.output_ids if output_ids is None else output_ids)
    return len(req.origin_input_ids) + max(n - 1, 0)


def running(scheduler: Any, rid: str) -> Any:
    """The running, unfinished request `rid` (409 `not_running` otherwise)."""
    for req in scheduler.running_batch.reqs:
        if req.rid == rid and not req.finished():
            return req
    raise CommandError(409, "not_running")


def reserve(scheduler: Any, req: Any, output_ids: list[int]) -> int:
    """B: a row and KV for `req` at the length A has written so far (SGLang's own `_pre_alloc` bookkeeping), or
    409 `no_row` / `no_memory`; the positions allocated."""
    need = written(req, output_ids)
    free = int(scheduler.token_to_kv_pool_allocator.available_size())
    if scheduler.req_to_token_pool.available_size() <= 0:
        raise CommandError(409, "no_row")
    if need > free:
        raise CommandError(409, f"no_memory:{need}>{free}")
    req.output_ids = array("q", output_ids)
    scheduler.disagg_decode_prealloc_queue._pre_alloc(req)  # noqa: SLF001 - SGLang's allocation for PD decode
    return req.kv.kv_committed_len


def grow(scheduler: Any, req: Any, allocated: int, end: int) -> int:
    """Extend `req`'s allocation from `allocated` to `end` positions (507 when the pool is out); the new length."""
    if end <= allocated:
        return allocated
    alloc = scheduler.token_to_kv_pool_allocator
    if alloc.page_size == 1:
        loc = alloc.alloc(end - allocated)
    else:
        import torch

        device = alloc.device
        last = scheduler.req_to_token_pool.req_to_token[req.kv.req_pool_idx, allocated - 1 : allocated]
        loc = alloc.alloc_extend(
            prefix_lens=torch.tensor([allocated], dtype=torch.int64, device=device),
            prefix_lens_cpu=torch.tensor([allocated], dtype=torch.int64),
            seq_lens=torch.tensor([end], dtype=torch.int64, device=device),
            seq_lens_cpu=torch.tensor([end], dtype=torch.int64),
            last_loc=last.to(dtype=torch.int64, device=device),
            extend_num_tokens=end - allocated,
        )
    if loc is None:
        raise CommandError(507, "reservation_exceeded")
    scheduler.req_to_token_pool.write((req.kv.req_pool_idx, slice(allocated, end)), loc)
    req.kv.kv_committed_len = req.kv.kv_allocated_len = end
    return end


def end_stream(scheduler: Any, req: Any, reason: Any) -> None:
    """Finish a request the agent holds (SGLang's queues do not list it): its stream gets every unsent token and
    `reason` (a `FINISH_ABORT`)."""
    req.finished_reason = reason
    scheduler.output_streamer.stream_output([req], False)


def free(scheduler: Any, req: Any) -> None:
    """Give `req`'s row and KV back to the pools."""
    from sglang.srt.mem_cache.common import release_kv_cache

    release_kv_cache(req, scheduler.tree_cache, checkpoint=False)


def finish_abort(message: str, status_code: int | None = None) -> Any:
    """SGLang's graceful abort finish (no status code: clients see a normal end with finish reason `abort`)."""
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    return (
        FINISH_ABORT(message=message) if status_code is None else FINISH_ABORT(message=message, status_code=status_code)
    )


def continue_from(req: Any, output_ids: list[int], n_written: int) -> None:
    """B: make the attached request look like one SGLang just received with `output_ids` generated and KV for
    `n_written` positions (what `_pre_alloc` sets for a transferred request), streaming from token n+1 on."""
    n = len(output_ids)
    req.output_ids = array("q", output_ids)
    req.kv.kv_committed_len = req.kv.kv_allocated_len = n_written
    req.full_untruncated_fill_ids = req.origin_input_ids + req.output_ids
    req.prefix_len = 0
    req.extend_end = n_written
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


def not_migratable(req: Any, scheduler: Any, endpoint: str) -> str | None:
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
