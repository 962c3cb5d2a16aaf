"""The one snapshot assembler: a decode server's report plus the caller's own bookkeeping -> an `InstanceState`.

The router calls it with what it polled (`/ares/state` or `/v1/loads`) and the requests it relays; the simulator
calls it with the same report its simulated server would give and the same bookkeeping a router would keep. So a
policy sees the same snapshot for the same cluster state in both bodies (`test/test_one_brain.py` checks it).

Also here, for the same reason: `new_request`, the one way a request to place gets its output estimate (the shared
`OutputEstimator`, used until the server's length head reports on the request).

Cost (the router rebuilds after every poll, at 256 instances x 256 running requests): the reported rows stay numpy
columns (no Python object per request); Python runs per request only for the few the server does not report and,
rarely, for rows whose max_tokens the admission rule needs (see `assemble_instance`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ares_router.estimate import OutputEstimator
from ares_router.policy.admission import ADMISSION_MODES, Admission
from ares_router.policy.snapshot import InstanceState, NewRequest

_EMPTY = np.zeros(0)
_EMPTY.flags.writeable = False  # shared by every empty column of every snapshot
_NO_ROWS = np.zeros(0, dtype=np.intp)
_NO_ROWS.flags.writeable = False


def _col(values: Iterable[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


@dataclass(frozen=True)
class ReportedRequest:
    """One running request as a decode server's `/ares/state` reports it."""

    rid: Hashable
    prompt_tokens: int
    generated_tokens: int
    predicted_remaining: float | None = None
    predicted_p90: float | None = None


@dataclass(frozen=True)
class DecodeLoad:
    """What one poll of a decode server returned (`ares_router.poller` documents the wire format); per-request state
    (only from `/ares/state`) in column form, because a poll of a busy server carries hundreds of requests."""

    capacity_tokens: int
    used_tokens: int
    running_reqs: int
    queued_reqs: int = 0
    source: str = "v1_loads"  # "ares_state" | "v1_loads"
    rids: tuple[Hashable, ...] = ()
    prompt_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    generated_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    predicted_remaining: np.ndarray = field(default_factory=lambda: np.zeros(0))  # NaN: no prediction yet
    predicted_p90: np.ndarray = field(default_factory=lambda: np.zeros(0))  # NaN: not reported
    kv_bytes_per_token: float | None = None  # `/ares/state`'s migration block: KV bytes a migration moves per token
    admission: str = "sglang"  # `/ares/state`'s admission block: the server's rule (`admission.ADMISSION_MODES`)
    lengths: np.ndarray = field(init=False, repr=False, compare=False)
    length_sum: float = field(init=False, repr=False, compare=False)
    unpredicted_rows: np.ndarray = field(init=False, repr=False, compare=False)

    @classmethod
    def from_reports(
        cls, capacity_tokens: int, used_tokens: int, requests: Sequence[ReportedRequest], queued_reqs: int = 0
    ) -> DecodeLoad:
        """An `/ares/state`-style load from row-form requests."""
        return cls(
            capacity_tokens,
            used_tokens,
            len(requests),
            queued_reqs,
            "ares_state",
            tuple(r.rid for r in requests),
            _col(r.prompt_tokens for r in requests),
            _col(r.generated_tokens for r in requests),
            _col(r.predicted_remaining for r in requests),
            _col(r.predicted_p90 for r in requests),
        )

    @cached_property
    def row_of(self) -> dict[Hashable, int]:
        """rid -> row of the per-request columns."""
        return {rid: k for k, rid in enumerate(self.rids)}

    def __post_init__(self) -> None:
        # Snapshots share these columns (no copy per poll), so nothing may change them in place.
        for col in (self.prompt_tokens, self.generated_tokens, self.predicted_remaining, self.predicted_p90):
            col.setflags(write=False)  # as `col.flags.writeable = False`, without building a flags object
        # Derived once per poll, here rather than in cached properties (their lock costs more than the arithmetic).
        lengths = self.prompt_tokens + self.generated_tokens  # KV tokens as SGLang's admission counts them
        lengths.setflags(write=False)
        object.__setattr__(self, "lengths", lengths)
        object.__setattr__(self, "length_sum", float(lengths.sum()))  # KV tokens the reported requests explain
        nan = np.isnan(self.predicted_remaining)
        # Rows without a prediction yet (the estimator fills in there); usually none.
        object.__setattr__(self, "unpredicted_rows", np.flatnonzero(nan) if nan.any() else _NO_ROWS)

    def prediction_of(self, rid: Hashable) -> tuple[float, float] | None:
        """(generated_tokens, predicted_remaining) this report gives for `rid`, or None (not reported, or reported
        without a prediction)."""
        k = self.row_of.get(rid) if self.rids else None
        if k is None:
            return None
        p = float(self.predicted_remaining[k])
        return None if np.isnan(p) else (float(self.generated_tokens[k]), p)


@dataclass(frozen=True)
class OwnRows:
    """The caller's own requests on one instance that the server's report does not list, in dispatch order.

    Started ones (`running_*`) have produced a token, so they run as far as the caller can tell (retracted, migrating,
    or the server reports no rows); the others (`pending_*`) are in prefill, KV transfer or the decode queue.
    `*_max_new`: their max_tokens, NaN for none.
    """

    running_ids: tuple[Hashable, ...] = ()
    running_prompt: np.ndarray = field(default_factory=lambda: _EMPTY)
    running_generated: np.ndarray = field(default_factory=lambda: _EMPTY)
    running_max_new: np.ndarray = field(default_factory=lambda: _EMPTY)
    pending_ids: tuple[Hashable, ...] = ()
    pending_prompt: np.ndarray = field(default_factory=lambda: _EMPTY)
    pending_max_new: np.ndarray = field(default_factory=lambda: _EMPTY)


NO_OWN_ROWS = OwnRows()


def admission_mode(report: dict) -> str:
    """The admission rule a decode server's `/ares/state` body says it runs (its `admission` block's `mode`, from
    `ares.engine.admission_hook`); "sglang" for a server that does not say (an older ARES, or `/v1/loads`)."""
    mode = (report.get("admission") or {}).get("mode", "sglang")
    if mode not in ADMISSION_MODES:
        raise ValueError(f"unknown admission mode {mode!r} in the server's report; known: {', '.join(ADMISSION_MODES)}")
    return mode


def new_request(
    request_id: Hashable, prompt_tokens: int, max_tokens: int | None, estimator: OutputEstimator
) -> NewRequest:
    """A request to place, with the estimator's output guess (the head has not seen it yet)."""
    return NewRequest(request_id, prompt_tokens, estimator.total(prompt_tokens, max_tokens), max_tokens)


def assemble_instance(
    instance_id: Hashable,
    load: DecodeLoad | None,
    own: OwnRows,
    estimator: OutputEstimator,
    admission: Admission,
    max_new_of: Callable[[np.ndarray], np.ndarray] | None = None,
    healthy: bool = True,
    url: str = "",
) -> InstanceState:
    """One instance of the snapshot.

    Rows: the server's reported requests (its view wins: exact lengths, the head's prediction; that includes
    requests the caller does not relay, e.g. other routers' or direct clients': they are load too), then the caller's
    started ones the report lacks; pending: the caller's not started ones. A row without a prediction gets the
    estimator's guess, capped by its max_tokens. `used` is the server's figure, or what the rows explain if more.

    `max_new_of(rows)`: max_tokens (NaN: none) of the given report rows; servers do not report it, the caller knows
    it for the requests it relays. It is asked only where a number depends on it: rows without a prediction, and the
    rows of an instance where SGLang's single-request term may bind (few, short requests: otherwise the term is
    below the per-request reserve whatever the max_tokens, and stays so while the snapshot lives, since requests
    only add to the reserve). Elsewhere max_tokens stays NaN ("none"), which the admission rule reads as CLIP.
    """
    n_rep = len(load.rids) if load is not None else 0
    n_own = len(own.running_ids)
    rep_max = np.full(n_rep, np.nan) if n_rep else _EMPTY
    missing = load.unpredicted_rows if n_rep else _NO_ROWS
    if n_rep:
        rep_rem = load.predicted_remaining
        if missing.size:  # no prediction yet: the estimate, capped by the request's max_tokens, less what it generated
            if max_new_of is not None:
                rep_max[missing] = max_new_of(missing)
            rep_rem = rep_rem.copy()
            rep_rem[missing] = estimator.remaining_array(
                load.prompt_tokens[missing], rep_max[missing], load.generated_tokens[missing]
            )
    if n_own:
        own_len = own.running_prompt + own.running_generated
        own_rem = estimator.remaining_array(own.running_prompt, own.running_max_new, own.running_generated)
    if n_rep and n_own:
        lengths = np.concatenate([load.lengths, own_len])
        generated = np.concatenate([load.generated_tokens, own.running_generated])
        remaining = np.concatenate([rep_rem, own_rem])
        upper = np.concatenate([load.predicted_p90, np.full(n_own, np.nan)])
        request_ids = load.rids + own.running_ids
        length_sum = load.length_sum + float(own_len.sum())
    elif n_rep:  # the usual case: the server reports every running request (no copies)
        lengths, generated, remaining = load.lengths, load.generated_tokens, rep_rem
        upper, request_ids, length_sum = load.predicted_p90, load.rids, load.length_sum
    elif n_own:
        lengths, generated, remaining = own_len, own.running_generated, own_rem
        upper, request_ids = np.full(n_own, np.nan), own.running_ids
        length_sum = float(own_len.sum())
    else:
        lengths = generated = remaining = upper = _EMPTY
        request_ids, length_sum = (), 0.0
    capacity = load.capacity_tokens if load is not None and load.capacity_tokens > 0 else 1
    if n_rep and n_own:
        max_new = np.concatenate([rep_max, own.running_max_new])
    else:
        max_new = rep_max if n_rep else own.running_max_new if n_own else _EMPTY
    if n_rep and max_new_of is not None and load.admission != "sglang":
        # a predictive server plans every request within its max_tokens: the router's view needs them all
        rows = np.flatnonzero(np.isnan(max_new[:n_rep]))
        if rows.size:
            max_new = max_new.copy()
            max_new[rows] = max_new_of(rows)
    elif n_rep and max_new_of is not None and missing.size < n_rep:
        # SGLang's single-request term at its largest for these rows (a footprint prompt + min(max_new,
        # capacity - prompt - 2, CLIP) is at most min(prompt + CLIP, capacity - 2)): if even that stays within the
        # per-request reserve, max_tokens changes no decision here and need not be looked up.
        count = lengths.size + len(own.pending_ids)
        most = min(float((lengths - generated).max()) + admission.clip_max_new_tokens, capacity - 2.0)
        if most - length_sum > admission.reserve_tokens * count:
            rows = np.flatnonzero(np.isnan(max_new[:n_rep]))
            max_new = max_new.copy()
            max_new[rows] = max_new_of(rows)
    n_pend = len(own.pending_ids)
    return InstanceState(
        instance_id=instance_id,
        capacity_tokens=int(capacity),
        used_tokens=int(max(load.used_tokens, length_sum) if load is not None else length_sum),
        healthy=healthy and load is not None,
        url=url,
        request_ids=request_ids,
        lengths=lengths,
        generated=generated,
        predicted_remaining=remaining,
        predicted_upper=upper,
        max_new_tokens=max_new,
        pending_ids=own.pending_ids,
        pending_prompt=own.pending_prompt if n_pend else _EMPTY,
        pending_predicted=estimator.total_array(own.pending_prompt, own.pending_max_new) if n_pend else _EMPTY,
        admission=load.admission if load is not None else "sglang",
    )
