"""The cluster as the policy sees it: per-instance state in column form and the aggregates every decision reads.

An `InstanceState` is built by the one snapshot assembler (`ares_router.policy.assemble`) from a server's report and
the caller's own bookkeeping, by the router and the simulator alike; `build_snapshot` then computes, once per poll,
what the policies need: used tokens, request counts, SGLang's admission terms and the load model's demand curves.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ares_router.policy.admission import ADMISSION_MODES, PREDICTIVE_MODES, Admission, KVForecast, planned_remaining
from ares_router.policy.load_model import LoadModel, MigrationCost


class NoHealthyInstance(RuntimeError):
    """Raised when a snapshot has no healthy decode instance to place a request on."""


@dataclass(frozen=True)
class NewRequest:
    """A request to place. `predicted_output`: the output estimate the policy plans with (the shared estimator's,
    `assemble.new_request`); `max_new_tokens`: its max_tokens (None: none given), which SGLang's admission reads."""

    request_id: Hashable
    prompt_tokens: int
    predicted_output: float | None = None
    max_new_tokens: float | None = None

    @property
    def max_new(self) -> float:
        """max_new_tokens with NaN for "none" (the admission rule's convention)."""
        return math.nan if self.max_new_tokens is None else float(self.max_new_tokens)


def _empty() -> np.ndarray:
    return np.zeros(0)


@dataclass(frozen=True)
class InstanceState:
    """One decode instance in column form.

    Running rows (`request_ids` ...): KV length (prompt + generated, as SGLang counts it), tokens generated, predicted
    remaining tokens (NaN: none), its upper quantile (NaN: none), max_tokens (NaN: none or not known). Pending rows:
    requests dispatched here that the server does not report running (prefill, KV transfer, decode queue), with the
    KV they will need and their predicted output (NaN: none). Columns left empty while there are rows read as NaN.
    `admission`: the server's decode admission rule, as its `/ares/state` says (`ADMISSION_MODES`): "sglang"
    (SGLang's own) or "predictive" / "predictive_point" (ARES's forecast of the KV peak, `admission.KVForecast`,
    each request at its P90 / its point prediction).
    """

    instance_id: Hashable
    capacity_tokens: int
    used_tokens: int
    healthy: bool = True
    url: str = ""
    request_ids: Sequence[Hashable] = ()
    lengths: np.ndarray = field(default_factory=_empty)
    generated: np.ndarray = field(default_factory=_empty)
    predicted_remaining: np.ndarray = field(default_factory=_empty)
    predicted_upper: np.ndarray = field(default_factory=_empty)
    max_new_tokens: np.ndarray = field(default_factory=_empty)
    pending_ids: Sequence[Hashable] = ()
    pending_prompt: np.ndarray = field(default_factory=_empty)
    pending_predicted: np.ndarray = field(default_factory=_empty)
    admission: str = "sglang"

    def __post_init__(self) -> None:
        if self.admission not in ADMISSION_MODES:
            raise ValueError(f"admission must be one of {ADMISSION_MODES}, not {self.admission!r}")
        n, m = self.lengths.size, self.pending_prompt.size
        if (
            self.generated.size == n
            and self.predicted_remaining.size == n
            and self.predicted_upper.size == n
            and self.max_new_tokens.size == n
            and self.pending_predicted.size == m
        ):
            return  # every column given (the assembler's case, once per instance and poll): nothing to fill
        for name, size, fill in (
            ("generated", n, 0.0),
            ("predicted_remaining", n, math.nan),
            ("predicted_upper", n, math.nan),
            ("max_new_tokens", n, math.nan),
            ("pending_predicted", m, math.nan),
        ):
            col = getattr(self, name)
            if col.size != size:
                if col.size:
                    raise ValueError(f"{name} has {col.size} values for {size} rows")
                object.__setattr__(self, name, np.full(size, fill))


@dataclass(frozen=True)
class Migration:
    """Move running request `request_id` with its KV cache from instance `source` to `target` (indices)."""

    request_id: Hashable
    source: int
    target: int
    kv_tokens: int
    gain: float = 0.0  # the policy's reason, in its own unit (fraction of capacity), net of cost


@dataclass(frozen=True)
class ClusterSnapshot:
    """The cluster as the policy sees it, with per-instance aggregates computed once per poll (`build_snapshot`).

    Per instance: `capacity`; `used` (reported tokens, or what the rows explain if more, plus pending prompts: a
    pending request the server has already preallocated is in both, since a report does not say which are; so this
    errs on the full side);
    `count` (running + pending requests: SGLang's active requests as far as a router can tell); `running_tokens`
    and `single_need` (SGLang's retractable tokens and largest single-request footprint, `admission`); `demand` and
    `alive` ([instances, points+1]: the load model's curves, pending requests included). `with_dispatch` updates
    them for a request just sent, so bursts between polls spread out; `instances` stays the polled state.
    """

    instances: tuple[InstanceState, ...]
    load_model: LoadModel
    migration_cost: MigrationCost
    admission: Admission
    dispatch_count: int  # requests dispatched so far (round robin's position; no hidden counter)
    capacity: np.ndarray
    used: np.ndarray
    healthy: np.ndarray
    count: np.ndarray
    running_tokens: np.ndarray
    single_need: np.ndarray
    demand: np.ndarray
    alive: np.ndarray
    # Per instance: its KV forecast where the server admits predictively (`InstanceState.admission`), else None.
    forecasts: tuple[KVForecast | None, ...] = ()

    def admits(self, request: NewRequest, index: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Per instance (of `index`): would the server's decode admission take `request` now?"""
        return self.admits_each(float(request.prompt_tokens), request.max_new, index, request.predicted_output)

    def admits_each(
        self,
        prompt: float | np.ndarray,
        max_new: float | np.ndarray,
        index: np.ndarray | slice = slice(None),
        planned: float | np.ndarray | None = None,
    ) -> np.ndarray:
        """Each server's decode admission of requests (`prompt`, `max_new`, `planned`: scalars, or columns
        [requests, 1] for a [requests, instances] answer) on the instances of `index`: SGLang's rule, or on a
        predictive server the forecast peak with the request planned at `planned` output tokens (its output
        estimate, already capped by its max_tokens; None: SGLang's own budget for it, min(max_new, CLIP))."""
        cap = self.capacity[index]
        ok = self.admission.admits(
            cap - self.used[index],
            self.count[index],
            self.running_tokens[index],
            self.single_need[index],
            prompt,
            max_new,
            cap,
        )
        if not self.forecasts:
            return ok
        idx = np.arange(self.capacity.size)[index]
        pred = [(c, int(j)) for c, j in enumerate(np.atleast_1d(idx)) if self.forecasts[j] is not None]
        if not pred:
            return ok
        ok = np.array(ok, dtype=bool, copy=True)
        for c, j in pred:
            limit = self.admission.output_limit(prompt, max_new, self.capacity[j])
            q = self.admission.max_new(prompt, max_new, self.capacity[j]) if planned is None else planned
            q = np.minimum(q, limit)  # never more than SGLang lets it generate
            fits = self.forecasts[j].admits(self.capacity[j], prompt, q)
            ok[..., c] = np.reshape(fits, ok[..., c].shape)
        return ok

    def allocatable(self, index: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Per instance (of `index`): the KV tokens SGLang's admission lets one new request take now. A request
        whose `Admission.least_required` exceeds every instance's figure fits nowhere."""
        return self.admission.allocatable(
            self.capacity[index] - self.used[index], self.count[index], self.running_tokens[index],
            self.single_need[index],
        )  # fmt: skip

    def with_dispatch(self, index: int, request: NewRequest) -> ClusterSnapshot:
        """The snapshot after `request` was sent to instance `index`: it counts there as pending."""
        used = self.used.copy()
        used[index] += request.prompt_tokens
        count = self.count.copy()
        count[index] += 1
        add, add_alive = self.load_model.pending_curve(request.prompt_tokens, request.predicted_output)
        demand = self.demand.copy()
        demand[index] += add
        alive = self.alive.copy()
        alive[index] += add_alive
        # Not `replace`: this runs once per request dispatched, and a frozen dataclass's __init__ is slow.
        out = object.__new__(ClusterSnapshot)
        out.__dict__.update(self.__dict__)
        out.__dict__.update(dispatch_count=self.dispatch_count + 1, used=used, count=count, demand=demand, alive=alive)
        if self.forecasts and self.forecasts[index] is not None:
            forecasts = list(self.forecasts)
            prompt, cap = float(request.prompt_tokens), self.capacity[index]
            planned = request.predicted_output
            if planned is None or math.isnan(planned):
                planned = self.admission.max_new(prompt, request.max_new, cap)
            planned = min(planned, self.admission.output_limit(prompt, request.max_new, cap))
            forecasts[index] = forecasts[index].with_row(float(request.prompt_tokens), float(planned))
            out.__dict__.update(forecasts=tuple(forecasts))
        return out


def build_snapshot(
    instances: Sequence[InstanceState],
    load_model: LoadModel | None = None,
    migration_cost: MigrationCost | None = None,
    admission: Admission | None = None,
    dispatch_count: int = 0,
) -> ClusterSnapshot:
    """A snapshot with its aggregates computed (call once per poll): one pass over all rows, in numpy."""
    instances = tuple(instances)
    lm = load_model or LoadModel()
    adm = admission or Admission()
    n = len(instances)
    capacity = np.array([i.capacity_tokens for i in instances], dtype=np.float64)
    healthy = np.array([i.healthy for i in instances], dtype=bool)
    sizes = np.array([i.lengths.size for i in instances], dtype=np.intp)
    p_sizes = np.array([i.pending_prompt.size for i in instances], dtype=np.intp)
    g = lm.points + 1
    running_tokens = np.zeros(n)
    single_need = np.zeros(n)
    demand, alive = np.zeros((n, g)), np.zeros((n, g))
    if sizes.sum():
        owner = np.repeat(np.arange(n), sizes)
        lengths = np.concatenate([i.lengths for i in instances])
        generated = np.concatenate([i.generated for i in instances])
        max_new = np.concatenate([i.max_new_tokens for i in instances])
        rem = lm.remaining(
            np.concatenate([i.predicted_remaining for i in instances]),
            np.concatenate([i.predicted_upper for i in instances]),
        )
        running_tokens = np.bincount(owner, weights=lengths, minlength=n)
        # Rows are grouped by instance, so a max per instance is one reduceat over the non-empty groups.
        foot = adm.footprint(lengths - generated, max_new, capacity[owner])
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        nonempty = sizes > 0
        single_need[nonempty] = np.maximum.reduceat(foot, starts[nonempty])
        demand, alive = lm.binned(lengths, rem, owner, n)
    pending_prompt = np.zeros(n)
    if p_sizes.sum():
        owner = np.repeat(np.arange(n), p_sizes)
        prompt = np.concatenate([i.pending_prompt for i in instances])
        pred = np.concatenate([i.pending_predicted for i in instances])
        pending_prompt = np.bincount(owner, weights=prompt, minlength=n)
        d, a = lm.binned(prompt, pred, owner, n)
        demand, alive = demand + d, alive + a
    reported = np.array([float(i.used_tokens) for i in instances])
    unexplained = np.maximum(0.0, reported - running_tokens)  # reservations, KV held for migrations: flat
    demand += unexplained[:, None]
    forecasts: tuple[KVForecast | None, ...] = ()
    if any(i.admission in PREDICTIVE_MODES for i in instances):
        forecasts = tuple(
            instance_forecast(i, float(unexplained[j]), adm) if i.admission in PREDICTIVE_MODES else None
            for j, i in enumerate(instances)
        )
    return ClusterSnapshot(
        instances=instances,
        load_model=lm,
        migration_cost=migration_cost or MigrationCost(),
        admission=adm,
        dispatch_count=dispatch_count,
        capacity=capacity,
        used=np.maximum(reported, running_tokens) + pending_prompt,
        healthy=healthy,
        count=(sizes + p_sizes).astype(np.float64),
        running_tokens=running_tokens,
        single_need=single_need,
        demand=demand,
        alive=alive,
        forecasts=forecasts,
    )


def instance_forecast(state: InstanceState, base: float, admission: Admission) -> KVForecast:
    """The KV forecast a predictive server makes of itself, from what the router sees of it: running rows at their
    planned remaining length (`admission.planned_remaining`: the P90, else the prediction or the estimator's prior
    the assembler filled in, capped by max_tokens left), pending rows at their prompt and output estimate (their
    SGLang budget where there is none), plus `base` tokens no row explains."""
    cap = float(state.capacity_tokens)
    left = admission.output_limit(state.lengths - state.generated, state.max_new_tokens, cap) - state.generated
    rem = planned_remaining(
        state.predicted_remaining, state.predicted_upper, left, use_upper=state.admission == "predictive"
    )
    rem = np.where(np.isnan(rem), left, rem)
    pend_limit = admission.output_limit(state.pending_prompt, np.full(state.pending_prompt.size, math.nan), cap)
    pend = np.fmin(state.pending_predicted, pend_limit)  # NaN (no estimate): the limit
    return KVForecast.of(np.concatenate([state.lengths, state.pending_prompt]), np.concatenate([rem, pend]), base)
