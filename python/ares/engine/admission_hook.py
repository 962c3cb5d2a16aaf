"""Predictive decode admission inside SGLang (`--ares-admission predictive`) and the retraction counter (`--ares`).

SGLang 0.5.23 admits a new PD decode request in `DecodePreallocQueue.pop_preallocated`
(`srt/disaggregation/decode.py` ~L1333) when `_required_admission_tokens(req, fill, prefix, retractable)` (~L508:
max(fill + R, fill + min(max_new, CLIP) - retractable)) is at most `_allocatable_token_budgets(retractable, ...)`
(~L2083: available - max(R x active, single) - R x a just-run prebuilt batch - the retracted queue's needs). The
smallest change that swaps the blanket terms for the forecast, and nothing else, is two AROUND hooks:

- `_allocatable_token_budgets`, for the admission calls only (those pass `retractable_tokens` and count the
  retracted queue; the retracted-request resume path, `resume_retracted_reqs` ~L1021, passes neither and keeps
  SGLang's rule): the original with `reserved_tokens=0`, plus back the single-request term it subtracted, i.e.
  available - the prebuilt and retracted-queue terms. Those two stay: they are KV that is about to be taken.
- `_required_admission_tokens`: forecast peak with the request - KV in use now (`KVForecast.peak_with`, the rule
  in `ares_router.policy.admission` the router's view and the simulator use).

So `required <= allocatable` reads `peak_with(fill, planned) <= capacity - (prebuilt + retracted terms)`, and since
the peak is at least the KV in use plus the request's own prompt, the immediate fit SGLang checks still holds.
The forecast's rows are the requests holding KV here: the running batch (KV length prompt + generated, planned
remaining from the head's record: its P90, else its point prediction, else the prior, never past max_new_tokens),
and those admitted but not running yet (transfer queue, waiting queue, and the ones admitted earlier in the same
`pop_preallocated` pass, tracked by an AFTER hook on `_pre_alloc`), at their prompt and the prior's output
estimate. KV in use that no row explains is flat (`base`).

SGLang's retraction stays the safety net for forecasts that undershoot: an AFTER hook on
`ScheduleBatch.retract_decode` counts retracted requests, reported in `/ares/state` beside the mode and the forecast.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import numpy as np

from ares.engine.request_state import ATTR
from ares_router.estimate import OutputEstimator
from ares_router.policy.admission import KVForecast, planned_remaining

logger = logging.getLogger("ares.engine")

_QUEUE = "sglang.srt.disaggregation.decode.DecodePreallocQueue"
REQUIRED = f"{_QUEUE}._required_admission_tokens"
ALLOCATABLE = f"{_QUEUE}._allocatable_token_budgets"
PRE_ALLOC = f"{_QUEUE}._pre_alloc"
POP_PREALLOCATED = f"{_QUEUE}.pop_preallocated"
RETRACT_DECODE = "sglang.srt.managers.schedule_batch.ScheduleBatch.retract_decode"
PREDICTIVE_TARGETS = (REQUIRED, ALLOCATABLE, PRE_ALLOC, POP_PREALLOCATED)


class AdmissionState:
    """Per scheduler process: the admission mode, the prior, the retraction count and the requests admitted in the
    current `pop_preallocated` pass."""

    def __init__(self, mode: str, estimator: OutputEstimator | None = None) -> None:
        self.mode = mode
        self.estimator = estimator or OutputEstimator()
        self.retractions = 0  # requests SGLang retracted on this server (decode OOM), since start
        self.admitted_predictive = 0  # requests admitted by the forecast
        self.pass_reqs: list[Any] = []  # admitted in the current pass, not in a queue yet
        self.queue: Any = None  # the DecodePreallocQueue, once seen (for reports)
        self.lock = threading.Lock()


_state: AdmissionState | None = None


def rows_of(
    queue: Any, estimator: OutputEstimator, extra: list[Any] = (), use_upper: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(KV lengths, planned remaining) of the requests holding KV on this server (see the module docstring);
    `use_upper`: plan at the head's P90 where it gives one (else at its point prediction)."""
    scheduler = queue.scheduler
    lengths: list[float] = []
    predicted: list[float] = []
    upper: list[float] = []
    left: list[float] = []
    seen: set[int] = set()
    nan = math.nan
    for req in list(scheduler.running_batch.reqs):
        if req.finished() or id(req) in seen:
            continue
        seen.add(id(req))
        prompt, g = len(req.origin_input_ids), len(req.output_ids)
        max_new = req.sampling_params.max_new_tokens
        rec = getattr(req, ATTR, None)
        lengths.append(prompt + g)
        if rec is None:
            predicted.append(estimator.remaining(prompt, max_new, g))
            upper.append(nan)
        else:
            predicted.append(rec.remaining(g))
            p90 = rec.p90_remaining(g)
            upper.append(nan if p90 is None else p90)
        left.append(nan if max_new is None else float(max_new - g))
    waiting = [d.req for d in queue.transfer_queue.queue if not getattr(d, "host_staged", False)]
    waiting += list(scheduler.waiting_queue)
    for req in [*waiting, *extra]:
        if id(req) in seen or req.finished():
            continue
        seen.add(id(req))
        prompt = len(req.origin_input_ids)
        max_new = req.sampling_params.max_new_tokens
        lengths.append(prompt)
        predicted.append(estimator.total(prompt, max_new))
        upper.append(nan)
        left.append(nan if max_new is None else float(max_new))
    rem = planned_remaining(np.array(predicted), np.array(upper), np.array(left), use_upper)
    return np.array(lengths, dtype=np.float64), rem


def forecast(queue: Any, state: AdmissionState) -> tuple[KVForecast, float]:
    """(this server's KV forecast, KV tokens in use now)."""
    scheduler = queue.scheduler
    used = float(scheduler.max_total_num_tokens - queue.token_to_kv_pool_allocator.available_size())
    lengths, rem = rows_of(queue, state.estimator, state.pass_reqs, use_upper=state.mode == "predictive")
    return KVForecast.of(lengths, rem, base=max(0.0, used - float(lengths.sum()))), used


def _around_required(original: Any, queue: Any, req: Any, allocated_tokens: int, prefix_len: int, *a: Any, **k: Any):
    if _state is None or _state.mode == "sglang":
        return original(queue, req, allocated_tokens, prefix_len, *a, **k)
    _state.queue = queue
    fc, used = forecast(queue, _state)
    max_new = req.sampling_params.max_new_tokens
    planned = _state.estimator.total(len(req.origin_input_ids), max_new)
    # The request's own KV need is what `_pre_alloc` will take now (allocated_tokens; prefix hits excluded).
    need = fc.peak_with(float(allocated_tokens), planned) - used
    return int(math.ceil(max(need, float(allocated_tokens))))


def _around_allocatable(original: Any, queue: Any, *args: Any, **kwargs: Any):
    retractable = kwargs.get("retractable_tokens", args[0] if args else None)
    count_retracted = kwargs.get("count_retracted", args[1] if len(args) > 1 else True)
    if _state is None or _state.mode == "sglang" or retractable is None or not count_retracted:
        return original(queue, *args, **kwargs)  # the resume path and everything else: SGLang's rule
    kwargs = {**kwargs, "reserved_tokens": 0}
    if len(args) > 3:
        args = (*args[:3], 0, *args[4:])
        kwargs.pop("reserved_tokens")
    budget = original(queue, *args, **kwargs)
    # `original` subtracted max(0, single-request term): give it back.
    return budget + max(0, queue._need_space_for_single_req(retractable))


def _before_pop_preallocated(queue: Any, *args: Any, **kwargs: Any) -> None:
    if _state is not None:
        _state.pass_reqs = []


def _after_pre_alloc(_result: Any, queue: Any, req: Any, *args: Any, **kwargs: Any) -> None:
    if _state is not None and not getattr(req, "is_retracted", False):
        _state.pass_reqs.append(req)


def _after_retract_decode(result: Any, *args: Any, **kwargs: Any) -> None:
    if _state is not None:
        with _state.lock:
            _state.retractions += len(result[0])


def admission_block(scheduler: Any) -> dict[str, Any]:
    """`/ares/state`'s admission block: the mode, SGLang's retractions so far and (predictive) the forecast."""
    if _state is None:
        return {}
    block: dict[str, Any] = {"mode": _state.mode, "retractions": _state.retractions}
    queue = getattr(scheduler, "disagg_decode_prealloc_queue", None) or _state.queue
    if _state.mode != "sglang" and queue is not None:
        try:
            fc, used = forecast(queue, _state)
            block.update(forecast_peak_tokens=fc.peak, forecast_base_tokens=fc.base, forecast_rows=int(fc.r.size))
        except Exception as e:  # noqa: BLE001 - a report must not fail because a queue changed under it
            block["forecast_error"] = f"{type(e).__name__}: {e}"
    return {"admission": block}


def register_admission_hooks(mode: str) -> list[str]:
    """Register the retraction counter and, in a predictive mode, the admission hooks; return the targets."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    global _state
    _state = AdmissionState(mode)
    HookRegistry.register(RETRACT_DECODE, _after_retract_decode, HookType.AFTER)
    if mode == "sglang":
        return [RETRACT_DECODE]
    HookRegistry.register(REQUIRED, _around_required, HookType.AROUND)
    HookRegistry.register(ALLOCATABLE, _around_allocatable, HookType.AROUND)
    HookRegistry.register(PRE_ALLOC, _after_pre_alloc, HookType.AFTER)
    HookRegistry.register(POP_PREALLOCATED, _before_pop_preallocated, HookType.BEFORE)
    return [RETRACT_DECODE, *PREDICTIVE_TARGETS]
