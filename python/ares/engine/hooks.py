"""The hooks ARES installs in SGLang's scheduler processes (only with `--ares`), through SGLang's HookRegistry.

- `ScheduleBatch.prepare_for_decode` (BEFORE): requests entering decode get their prompt length written to the
  head's device table, once per request-pool row;
- `ModelRunner.sample` (AROUND): after sampling a decode step, run the head on `logits_output.hidden_states` on the
  forward stream and attach the `[bs]` predictions as an auxiliary output;
- `Scheduler.init_request_dispatcher` (AFTER, TP rank 0): start the `/ares/state` service for this scheduler;
- `SchedulerInternalStateController.get_internal_state` (AFTER): the same report in `/server_info`;
- migration (`ares.migration.agent`): `Scheduler.process_decode_queue` (AFTER) runs the agent's tick between decode
  steps; `Scheduler.update_running_batch` (AROUND) keeps paused requests out of the next batch;
  `DecodePreallocQueue.add` (AROUND) attaches the router's request for an incoming migration instead of waiting for
  a prefill; `Scheduler.is_fully_idle` (AROUND) is False while the agent holds KV; `Scheduler.abort_request`
  (AFTER) aborts the requests the agent holds, which SGLang's queues do not list.
"""

from __future__ import annotations

import logging
from typing import Any

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from ares.config import AresServerConfig
from ares.engine.admission_hook import admission_block, register_admission_hooks
from ares.engine.aux_output import TRACE_KEY, HeadDeviceOutput
from ares.engine.decode_head import DecodeHead
from ares.engine.state_report import ReplyService, build_report, state_service
from ares.migration.agent import MigrationAgent, migration_service

logger = logging.getLogger("ares.engine")

PREPARE_FOR_DECODE = "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_decode"
SAMPLE = "sglang.srt.model_executor.model_runner.ModelRunner.sample"
INIT_DISPATCHER = "sglang.srt.managers.scheduler.Scheduler.init_request_dispatcher"
INTERNAL_STATE = (
    "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state"
)
PROCESS_DECODE_QUEUE = "sglang.srt.managers.scheduler.Scheduler.process_decode_queue"
UPDATE_RUNNING_BATCH = "sglang.srt.managers.scheduler.Scheduler.update_running_batch"
PREALLOC_ADD = "sglang.srt.disaggregation.decode.DecodePreallocQueue.add"
IS_FULLY_IDLE = "sglang.srt.managers.scheduler.Scheduler.is_fully_idle"
ABORT_REQUEST = "sglang.srt.managers.scheduler.Scheduler.abort_request"
STREAM_OUTPUT = "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.stream_output"
SCHEDULER_HOOK_TARGETS = (
    PREPARE_FOR_DECODE,
    SAMPLE,
    INIT_DISPATCHER,
    INTERNAL_STATE,
    PROCESS_DECODE_QUEUE,
    UPDATE_RUNNING_BATCH,
    PREALLOC_ADD,
    IS_FULLY_IDLE,
    ABORT_REQUEST,
)

_POOL_ROW = "_ares_pool_row"  # the request-pool row whose prompt length is in the table


class _Engine:
    """Per-process state shared by the hooks (one scheduler per process)."""

    def __init__(self, config: AresServerConfig):
        self.config = config
        self.head: DecodeHead | None = None
        self.service: ReplyService | None = None
        self.migration: MigrationAgent | None = None  # TP rank 0 only (v1 migrates with TP = 1)
        self.service_scheduler: Any = None  # the scheduler `/ares/state` reports on

    def decode_head(self) -> DecodeHead:
        if self.head is None:
            assert self.config.predictor, "the launcher resolves --ares-predictor before starting schedulers"
            self.head = DecodeHead(self.config.predictor)
        return self.head


_engine: _Engine | None = None


def _before_prepare_for_decode(batch: Any, *args: Any, **kwargs: Any) -> None:
    assert _engine is not None
    new_rows, lengths = [], []
    for req in batch.reqs:
        row = req.kv.req_pool_idx
        if getattr(req, _POOL_ROW, None) != row:
            new_rows.append(row)
            lengths.append(len(req.origin_input_ids))
            setattr(req, _POOL_ROW, row)
    if new_rows:
        _engine.decode_head().set_prompt_lengths(new_rows, lengths, batch.device, batch.req_to_token_pool.size)


def _around_sample(original: Any, runner: Any, logits_output: Any, forward_batch: Any, *args: Any, **kwargs: Any):
    next_token_ids = original(runner, logits_output, forward_batch, *args, **kwargs)
    hidden = getattr(logits_output, "hidden_states", None)
    if _engine is not None and hidden is not None and forward_batch.forward_mode.is_decode():
        from sglang.srt.managers.auxiliary_output import append_auxiliary_output

        preds = _engine.decode_head()(hidden, forward_batch.seq_lens, forward_batch.req_pool_indices)
        logits_output.auxiliary_device_output = append_auxiliary_output(
            logits_output.auxiliary_device_output, HeadDeviceOutput(preds, _engine.config.return_predictions)
        )
    return next_token_ids


def _tp_rank() -> int:
    from sglang.srt.runtime_context import get_parallel

    try:
        return int(get_parallel().tp_rank)
    except (AttributeError, RuntimeError, ValueError):
        return 0


def _after_init_dispatcher(_result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    assert _engine is not None
    # With tensor parallelism every rank holds the same requests; rank 0 reports.
    if _tp_rank() == 0 and _engine.service is None and _engine.config.state_ipc:
        if _engine.config.migrate_ipc:
            _engine.migration = MigrationAgent(scheduler)
            migration_service(_engine.migration, _engine.config.migrate_ipc).start()
        _engine.service_scheduler = scheduler
        _engine.service = state_service(scheduler, _engine.config.state_ipc, _migration_block).start()


def _migration_block() -> dict[str, Any]:
    """`/ares/state`'s extra blocks: admission (`admission_hook`), and migration when this server migrates."""
    if _engine is None:
        return {}
    blocks = admission_block(_engine.service_scheduler) if _engine.service_scheduler is not None else {}
    if _engine.migration is None:
        return blocks
    return {**blocks, "migration": _engine.migration.report()}


def _after_process_decode_queue(_result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    if _engine is not None and _engine.migration is not None:
        _engine.migration.tick()


def _around_update_running_batch(original: Any, scheduler: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    if _engine is not None and _engine.migration is not None:
        _engine.migration.exclude_paused(batch)
    return original(scheduler, batch, *args, **kwargs)


def _around_prealloc_add(original: Any, queue: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    if _engine is not None and _engine.migration is not None and _engine.migration.attach(req):
        return None
    return original(queue, req, *args, **kwargs)


def _after_abort_request(_result: Any, scheduler: Any, recv_req: Any, *args: Any, **kwargs: Any) -> None:
    if _engine is not None and _engine.migration is not None:
        _engine.migration.on_abort(str(recv_req.rid or ""), bool(getattr(recv_req, "abort_all", False)))


def _before_stream_output(streamer: Any, reqs: Any, *args: Any, **kwargs: Any) -> None:
    # With --ares-return-predictions: SGLang sends per-token extras only for keys a request already has, from the
    # request's first chunk on; the first (the prefill's token) goes out before any prediction exists, so the key
    # must be there, padded, or a stream's values would shift by one token.
    for req in reqs:
        if req.customized_info is None:
            req.customized_info = {TRACE_KEY: [None] * len(req.output_ids)}


def _around_is_fully_idle(original: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    if _engine is not None and _engine.migration is not None and _engine.migration.holds():
        return False
    return original(scheduler, *args, **kwargs)


def _after_internal_state(result: Any, controller: Any, *args: Any, **kwargs: Any) -> None:
    assert _engine is not None
    head = _engine.head
    result.internal_state["ares"] = {
        "predictor": _engine.config.predictor,
        "head_backend": head.backend if head is not None else "not run yet",
        "state": build_report(controller.scheduler, extra=_migration_block),
    }


def register_scheduler_hooks(config: AresServerConfig) -> list[str]:
    """Register the scheduler-process hooks for `config` (the caller applies them); return their targets."""
    global _engine
    _engine = _Engine(config)
    HookRegistry.register(PREPARE_FOR_DECODE, _before_prepare_for_decode, HookType.BEFORE)
    HookRegistry.register(SAMPLE, _around_sample, HookType.AROUND)
    HookRegistry.register(INIT_DISPATCHER, _after_init_dispatcher, HookType.AFTER)
    HookRegistry.register(INTERNAL_STATE, _after_internal_state, HookType.AFTER)
    HookRegistry.register(PROCESS_DECODE_QUEUE, _after_process_decode_queue, HookType.AFTER)
    HookRegistry.register(UPDATE_RUNNING_BATCH, _around_update_running_batch, HookType.AROUND)
    HookRegistry.register(PREALLOC_ADD, _around_prealloc_add, HookType.AROUND)
    HookRegistry.register(IS_FULLY_IDLE, _around_is_fully_idle, HookType.AROUND)
    HookRegistry.register(ABORT_REQUEST, _after_abort_request, HookType.AFTER)
    targets = [*SCHEDULER_HOOK_TARGETS, *register_admission_hooks(config.admission)]
    if config.return_predictions:
        HookRegistry.register(STREAM_OUTPUT, _before_stream_output, HookType.BEFORE)
        targets.append(STREAM_OUTPUT)
    return targets
