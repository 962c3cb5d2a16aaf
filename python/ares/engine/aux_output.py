"""The head's per-step output travelling from the forward to the scheduler through SGLang's auxiliary-output
protocol (`sglang.srt.managers.auxiliary_output`): the device tensor is copied to the host by SGLang's own
asynchronous result copy, and `consume` runs once the step's tokens are committed, aligned with `batch.reqs`."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ares.engine.request_state import record

_steps = itertools.count(1)  # decode steps whose predictions reached the scheduler, in this process
TRACE_KEY = "ares_predicted_remaining"  # the response's meta_info key with --ares-return-predictions


@dataclass(frozen=True)
class HeadDeviceOutput:
    """`[bs, 1 + quantiles]` predictions on the device (a fresh tensor, not a CUDA-graph buffer)."""

    predictions: torch.Tensor
    trace: bool = False  # also expose each prediction in the response (`--ares-return-predictions`)

    def copy_to_host(self, copy_tensor: Callable[[torch.Tensor], torch.Tensor]) -> HeadHostOutput:
        return HeadHostOutput(copy_tensor(self.predictions), self.trace)


@dataclass(frozen=True)
class HeadHostOutput:
    """The same on the host; `consume` stores each request's prediction on the request."""

    predictions: torch.Tensor
    trace: bool = False

    def consume(self, batch: Any, commits: Sequence[Any]) -> None:
        preds = self.predictions.tolist()
        step = next(_steps)
        has_p90 = bool(preds) and len(preds[0]) > 1
        for req, commit, row in zip(batch.reqs, commits, preds, strict=False):
            # No commit: the request produced no visible token this step (finished or retracted meanwhile).
            if commit is None:
                continue
            if self.trace:
                trace_prediction(req, commit.output_index, row[0])
            if req.finished():  # leaves the report now; its last prediction is of no use to the router
                continue
            record(req, row[0], row[1] if has_p90 else None, commit.output_index, step)


def trace_prediction(req: Any, output_index: int, point: float) -> None:
    """Put `point` at `output_index` of the request's `customized_info[TRACE_KEY]`, which SGLang slices per token
    like logprobs and accumulates into `meta_info`; the list is kept as long as `req.output_ids` so every chunk
    stays aligned with its tokens (None where no prediction was made)."""
    if req.customized_info is None:
        req.customized_info = {}
    values = req.customized_info.setdefault(TRACE_KEY, [])
    size = max(len(req.output_ids), output_index + 1)
    values.extend([None] * (size - len(values)))
    values[output_index] = point
