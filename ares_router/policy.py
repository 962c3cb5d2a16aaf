"""The ARES brain: decode placement and rebalancing as pure functions of a cluster snapshot.

Used by both the live router (which fills the snapshot from polled server state) and the simulator
(`ares.sim`), so a policy measured at 256 simulated instances is exactly the code that runs live.

Shape (after Llumnix's global scheduler): filter -> policy. A `Policy` bundles one dispatcher (one method,
`dispatch`) and one rebalancer (one method, `plan`); policies are chosen by name from `POLICIES`, so adding a
policy touches that one mapping. No I/O, no clocks, no globals, no hidden RNG: randomness comes from the
`rng` argument.

Load model (ARCHITECTURE.md, refined): time is counted in decode steps (one token per running request per
step). A running request r with current length l_r and predicted remaining tokens p_r occupies l_r + s KV
tokens s steps from now while s <= p_r and nothing after. On a grid 0 = s_0 < s_1 < ... < s_G = horizon
the instance's demand on the interval (s_{k-1}, s_k] is bounded above by

    U_k = sum over r with p_r > s_{k-1} of (l_r + min(p_r, s_k))

(every request alive at the start of the interval, each at its largest size in the interval), so the grid
never misses the peak that sits just before a request finishes. A request with no prediction keeps its
current length for the whole horizon ("current load" fallback): with no predictions anywhere the ARES
policy ranks instances exactly like `least_kv`. Tokens the server reports but no request explains
(reservations, KV held for a migration in flight) stay constant over the horizon.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType

import numpy as np

__all__ = [
    "ClusterSnapshot",
    "InstanceState",
    "LoadModel",
    "Migration",
    "MigrationCost",
    "NewRequest",
    "NoHealthyInstance",
    "PendingRequest",
    "POLICIES",
    "Policy",
    "RunningRequest",
    "build_snapshot",
    "dispatch",
    "get_policy",
    "plan_rebalance",
]


class NoHealthyInstance(RuntimeError):
    """Raised when a snapshot has no healthy decode instance to place a request on."""


# ----------------------------------------------------------------------------------------------------------
# Snapshot data (what a router fills from polled state)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunningRequest:
    """One running request as a decode instance reports it (row form, for routers)."""

    request_id: Hashable
    length: int  # prompt + tokens generated so far = KV tokens it holds
    generated: int
    predicted_remaining: float | None = None  # None: no prediction yet
    predicted_upper: float | None = None  # optional upper quantile of the remaining tokens


@dataclass(frozen=True)
class PendingRequest:
    """A request dispatched to an instance but not yet reported running by it (in prefill, in transfer,
    queued or retracted)."""

    request_id: Hashable
    prompt_tokens: int  # KV tokens it will need on admission
    predicted_output: float | None = None  # tokens still to generate, if known


@dataclass(frozen=True)
class NewRequest:
    """A request to place."""

    request_id: Hashable
    prompt_tokens: int
    predicted_output: float | None = None  # None: unknown (the usual case at dispatch time)


def _f64(values: Sequence[float] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


@dataclass(frozen=True)
class InstanceState:
    """One decode instance in column form: per-request arrays, NaN where a prediction is missing."""

    instance_id: Hashable
    capacity_tokens: int
    used_tokens: int
    healthy: bool = True
    url: str = ""
    request_ids: Sequence[Hashable] = ()
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0))
    generated: np.ndarray = field(default_factory=lambda: np.zeros(0))
    predicted_remaining: np.ndarray = field(default_factory=lambda: np.zeros(0))
    predicted_upper: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # requests dispatched here but not yet reported running, in column form (see `PendingRequest`)
    pending_ids: Sequence[Hashable] = ()
    pending_prompt: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pending_predicted: np.ndarray = field(default_factory=lambda: np.zeros(0))  # NaN: unknown

    @classmethod
    def from_requests(
        cls,
        instance_id: Hashable,
        capacity_tokens: int,
        used_tokens: int | None,
        requests: Sequence[RunningRequest],
        pending: Sequence[PendingRequest] = (),
        healthy: bool = True,
        url: str = "",
    ) -> InstanceState:
        """Build from row-form requests; `used_tokens=None` means the sum of the request lengths."""
        lengths = _f64([r.length for r in requests])
        nan = math.nan
        return cls(
            instance_id=instance_id,
            capacity_tokens=int(capacity_tokens),
            used_tokens=int(lengths.sum()) if used_tokens is None else int(used_tokens),
            healthy=healthy,
            url=url,
            request_ids=tuple(r.request_id for r in requests),
            lengths=lengths,
            generated=_f64([r.generated for r in requests]),
            predicted_remaining=_f64(
                [nan if r.predicted_remaining is None else r.predicted_remaining for r in requests]
            ),
            predicted_upper=_f64([nan if r.predicted_upper is None else r.predicted_upper for r in requests]),
            pending_ids=tuple(p.request_id for p in pending),
            pending_prompt=_f64([p.prompt_tokens for p in pending]),
            pending_predicted=_f64([nan if p.predicted_output is None else p.predicted_output for p in pending]),
        )

    @property
    def pending_tokens(self) -> float:
        """KV tokens the pending requests will need on arrival."""
        return float(self.pending_prompt.sum())


@dataclass(frozen=True)
class MigrationCost:
    """What moving a request costs: KV bytes over the link plus a fixed pause."""

    kv_bytes_per_token: float = 524_288.0  # Llama-2-7B: 2 * 32 layers * 32 kv heads * 128 dim * 2 bytes
    link_bytes_per_s: float = 25e9
    pause_s: float = 0.02

    def seconds(self, tokens: float | np.ndarray) -> float | np.ndarray:
        """Pause a request of `tokens` KV tokens suffers when migrated."""
        return np.asarray(tokens) * self.kv_bytes_per_token / self.link_bytes_per_s + self.pause_s


@dataclass(frozen=True)
class LoadModel:
    """Predicted KV demand of instances over a horizon of decode steps (see module docstring)."""

    horizon_tokens: int = 2048
    points: int = 16
    use_upper: bool = False  # plan with the upper quantile where the predictor gives one
    default_output_tokens: float | None = None  # assumed output of a new request without a prediction

    @cached_property
    def _grids(self) -> tuple[np.ndarray, np.ndarray]:
        s = np.linspace(0.0, float(self.horizon_tokens), self.points + 1)
        return s, np.concatenate(([-1.0], s[:-1]))  # interval 0 is the present: everyone is alive

    def grid(self) -> np.ndarray:
        """Step offsets s_0 = 0 < ... < s_G = horizon."""
        return self._grids[0]

    def remaining(self, inst: InstanceState) -> np.ndarray:
        """Remaining tokens used for planning: NaN (no prediction) becomes +inf with no growth."""
        rem = inst.predicted_remaining
        if self.use_upper and inst.predicted_upper.size:
            rem = np.where(np.isnan(inst.predicted_upper), rem, inst.predicted_upper)
        return rem

    def contributions(self, lengths: np.ndarray, remaining: np.ndarray) -> np.ndarray:
        """[n_requests, points+1] upper-bound KV demand of each request on each grid interval."""
        s, s_prev = self._grids
        known = ~np.isnan(remaining)
        rem = np.where(known, np.maximum(remaining, 0.0), np.inf)
        alive = rem[:, None] > s_prev[None, :]
        grow = np.where(known, 1.0, 0.0)[:, None] * np.minimum(rem[:, None], s[None, :])
        return np.where(alive, lengths[:, None] + grow, 0.0)

    def pending_curve(self, prompt_tokens: float, predicted_output: float | None) -> np.ndarray:
        """Demand curve of one request not yet running (a new or pending request)."""
        out = predicted_output if predicted_output is not None else self.default_output_tokens
        s, s_prev = self._grids
        if out is None:
            return np.full(s.size, float(prompt_tokens))
        out = max(float(out), 0.0)
        return np.where(out > s_prev, prompt_tokens + np.minimum(out, s), 0.0)

    def demand_by_owner(self, lengths: np.ndarray, remaining: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
        """[n, points+1]: `contributions(lengths, remaining)` summed per `owner` (0..n-1), without building the
        [requests, points+1] matrix: O(requests) binning plus O(n * points) sums, so a rebuild over 65k requests
        costs a few milliseconds.

        With grid s_0 < ... < s_G, a request with known remaining p >= 0 and length l adds, on interval k,
        l + min(p, s_k) when p > s_{k-1} (s_{-1} = -1): that is l for every k <= b (b = #{s_i < p}), plus s_k while
        p >= s_k (k < c, c = #{s_i <= p}), plus p on the one interval with s_{k-1} < p < s_k (b == c == k). Suffix
        sums over b and c give every interval at once. A request without a prediction adds l everywhere.
        """
        s = self._grids[0]
        g = s.size  # points + 1 intervals; bin g means "beyond the horizon"
        out = np.zeros((n, g))
        if lengths.size == 0:
            return out
        known = ~np.isnan(remaining)
        if not known.all():
            out += np.bincount(owner[~known], weights=lengths[~known], minlength=n)[:, None]
        if not known.any():
            return out
        p = np.maximum(remaining[known], 0.0)
        own, ln = owner[known], lengths[known]
        b, c = _grid_bins(s, p)

        def per_bin(bins: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
            return np.bincount(own * (g + 1) + bins, weights=weights, minlength=n * (g + 1)).reshape(n, g + 1)

        def suffix(x: np.ndarray) -> np.ndarray:  # [:, k] = sum of x[:, k:]
            return np.cumsum(x[:, ::-1], axis=1)[:, ::-1]

        out += suffix(per_bin(b, ln))[:, :g]  # alive on interval k: b >= k
        out += s[None, :] * suffix(per_bin(c, None))[:, 1:]  # grown to s_k: c > k
        inside = b == c  # finishes strictly inside an interval: p there, counted on interval b only
        if inside.any():
            in_bins = own[inside] * (g + 1) + b[inside]
            out += np.bincount(in_bins, weights=p[inside], minlength=n * (g + 1)).reshape(n, g + 1)[:, :g]
        return out

    def demand_matrix(self, instances: Sequence[InstanceState]) -> np.ndarray:
        """[instances, points+1]: `instance_curve` of every instance, computed in one pass over all requests."""
        n, g = len(instances), self.points + 1
        out = np.zeros((n, g))
        if n == 0:
            return out
        idx = np.arange(n)
        sizes = [inst.lengths.size for inst in instances]
        if sum(sizes):
            owner = np.repeat(idx, sizes)
            lengths = np.concatenate([inst.lengths for inst in instances])
            rem = np.concatenate([self.remaining(inst) for inst in instances])
            out += self.demand_by_owner(lengths, rem, owner, n)
        explained = np.array([float(inst.lengths.sum()) for inst in instances])
        used = np.array([float(inst.used_tokens) for inst in instances])
        out += np.maximum(0.0, used - explained)[:, None]
        sizes = [inst.pending_prompt.size for inst in instances]
        if sum(sizes):
            owner = np.repeat(idx, sizes)
            prompt = np.concatenate([inst.pending_prompt for inst in instances])
            pred = np.concatenate([inst.pending_predicted for inst in instances])
            if self.default_output_tokens is not None:
                pred = np.where(np.isnan(pred), float(self.default_output_tokens), pred)
            out += self.demand_by_owner(prompt, pred, owner, n)
        return out

    def instance_curve(self, inst: InstanceState) -> np.ndarray:
        """[points+1] demand curve of one instance, pending requests and unexplained tokens included."""
        curve = np.zeros(self.points + 1)
        if inst.lengths.size:
            curve += self.contributions(inst.lengths, self.remaining(inst)).sum(axis=0)
        curve += max(0.0, inst.used_tokens - float(inst.lengths.sum()))
        if inst.pending_prompt.size:
            out = inst.pending_predicted
            if self.default_output_tokens is not None:
                out = np.where(np.isnan(out), float(self.default_output_tokens), out)
            curve += self.contributions(inst.pending_prompt, out).sum(axis=0)
        return curve


def _grid_bins(s: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(#{s_i < p}, #{s_i <= p}) per value of `p` (>= 0) on the sorted grid `s` (s_0 = 0). The grid is uniform, so
    the index comes from one multiplication, then is corrected against the grid itself (so values exactly on a grid
    point land exactly as `searchsorted` puts them): a third of `searchsorted`'s time at 65k requests."""
    g = s.size - 1
    if g < 1 or s[-1] <= 0:
        return np.searchsorted(s, p, side="left"), np.searchsorted(s, p, side="right")
    k = np.minimum(p * (g / s[-1]), g).astype(np.intp)  # last grid point <= p, give or take one (rounding)
    k -= s[k] > p
    np.maximum(k, 0, out=k)
    k += (k < g) & (s[np.minimum(k + 1, g)] <= p)
    c = k + 1
    return c - (s[k] == p), c


@dataclass(frozen=True)
class ClusterSnapshot:
    """The cluster as the policy sees it, with per-instance aggregates precomputed once per poll.

    `used` (tokens incl. pending) and `demand` ([instances, points+1]) are derived from `instances`
    unless given; `with_dispatch` updates them incrementally so bursts between polls spread out.
    """

    instances: tuple[InstanceState, ...]
    load_model: LoadModel = LoadModel()
    migration_cost: MigrationCost = MigrationCost()
    dispatch_count: int = 0  # requests dispatched so far (round robin's position; no hidden counter)
    capacity: np.ndarray | None = None
    used: np.ndarray | None = None
    healthy: np.ndarray | None = None
    demand: np.ndarray | None = None
    count: np.ndarray | None = None  # requests running or pending per instance

    def __post_init__(self) -> None:
        if self.capacity is None:
            object.__setattr__(self, "capacity", _f64([i.capacity_tokens for i in self.instances]))
        if self.used is None:
            used = _f64([i.used_tokens + i.pending_tokens for i in self.instances])
            object.__setattr__(self, "used", used)
        if self.healthy is None:
            object.__setattr__(self, "healthy", np.array([i.healthy for i in self.instances], dtype=bool))
        if self.demand is None:
            object.__setattr__(self, "demand", self.load_model.demand_matrix(self.instances))
        if self.count is None:
            count = _f64([len(i.request_ids) + len(i.pending_ids) for i in self.instances])
            object.__setattr__(self, "count", count)

    def index_of(self, instance_id: Hashable) -> int:
        """Position of an instance in `instances`."""
        for j, inst in enumerate(self.instances):
            if inst.instance_id == instance_id:
                return j
        raise KeyError(instance_id)

    def with_dispatch(self, index: int, request: NewRequest) -> ClusterSnapshot:
        """The snapshot after `request` was sent to instance `index`: the aggregates (`used`, `demand`,
        `count`, `dispatch_count`) count it as pending; `instances` stays the polled state (cheap for bursts)."""
        used = self.used.copy()
        used[index] += request.prompt_tokens
        demand = self.demand.copy()
        demand[index] += self.load_model.pending_curve(request.prompt_tokens, request.predicted_output)
        count = self.count.copy()
        count[index] += 1
        return replace(self, dispatch_count=self.dispatch_count + 1, used=used, demand=demand, count=count)


def build_snapshot(
    instances: Sequence[InstanceState],
    load_model: LoadModel | None = None,
    migration_cost: MigrationCost | None = None,
    dispatch_count: int = 0,
) -> ClusterSnapshot:
    """A snapshot with its aggregates computed (call once per poll)."""
    return ClusterSnapshot(
        instances=tuple(instances),
        load_model=load_model or LoadModel(),
        migration_cost=migration_cost or MigrationCost(),
        dispatch_count=dispatch_count,
    )


@dataclass(frozen=True)
class Migration:
    """Move running request `request_id` with its KV cache from instance `source` to `target` (indices)."""

    request_id: Hashable
    source: int
    target: int
    kv_tokens: int
    gain: float = 0.0  # predicted reduction of the pair's peak load (fraction of capacity), net of cost


# ----------------------------------------------------------------------------------------------------------
# Filter
# ----------------------------------------------------------------------------------------------------------


def eligible(snapshot: ClusterSnapshot, prompt_tokens: int = 0) -> np.ndarray:
    """Indices of healthy instances with room for `prompt_tokens` now; all healthy ones if none has room."""
    healthy = np.flatnonzero(snapshot.healthy)
    if healthy.size == 0:
        raise NoHealthyInstance("no healthy decode instance in the snapshot")
    room = snapshot.capacity[healthy] - snapshot.used[healthy] >= prompt_tokens
    return healthy[room] if room.any() else healthy


# ----------------------------------------------------------------------------------------------------------
# Dispatchers: one method, `dispatch(snapshot, request, rng) -> index`
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundRobinDispatch:
    """Static placement: the next healthy instance in turn (position from `snapshot.dispatch_count`)."""

    def dispatch(self, snapshot: ClusterSnapshot, request: NewRequest, rng: np.random.Generator) -> int:
        healthy = np.flatnonzero(snapshot.healthy)
        if healthy.size == 0:
            raise NoHealthyInstance("no healthy decode instance in the snapshot")
        return int(healthy[snapshot.dispatch_count % healthy.size])


@dataclass(frozen=True)
class RandomDispatch:
    """Uniform over healthy instances, drawn from the caller's generator."""

    def dispatch(self, snapshot: ClusterSnapshot, request: NewRequest, rng: np.random.Generator) -> int:
        healthy = np.flatnonzero(snapshot.healthy)
        if healthy.size == 0:
            raise NoHealthyInstance("no healthy decode instance in the snapshot")
        return int(healthy[rng.integers(healthy.size)])


@dataclass(frozen=True)
class LeastKVDispatch:
    """Lowest current KV usage (fraction of capacity, pending prompts included); ties: lowest index."""

    def dispatch(self, snapshot: ClusterSnapshot, request: NewRequest, rng: np.random.Generator) -> int:
        cand = eligible(snapshot, request.prompt_tokens)
        frac = snapshot.used[cand] / snapshot.capacity[cand]
        return int(cand[np.argmin(frac)])


@dataclass(frozen=True)
class PredictedPeakDispatch:
    """ARES placement: lowest predicted peak demand over the horizon once the request is added.

    score = peak fraction + mean_weight * mean fraction over the horizon (the mean stands for the step-time
    cost every co-running request pays); ties broken by current usage, then index.

    Only instances that would admit the request now are considered, by SGLang's decode admission rule
    (free - prompt >= reserve_tokens * (requests + 1), `num_reserved_decode_tokens` per request): a request
    placed elsewhere waits in that instance's queue, which is TTFT. When no instance would admit it now, the
    one whose predicted demand lets it in soonest (first grid point where the rule holds) is chosen, ties by
    score; without predictions that is the least loaded one, as `least_kv` would pick.
    """

    mean_weight: float = 0.5
    reserve_tokens: float = 512.0

    def dispatch(self, snapshot: ClusterSnapshot, request: NewRequest, rng: np.random.Generator) -> int:
        cand = eligible(snapshot, request.prompt_tokens)
        cap = snapshot.capacity[cand, None]
        need = request.prompt_tokens + self.reserve_tokens * (snapshot.count[cand, None] + 1)
        fits = snapshot.demand[cand] + need <= cap  # [cand, grid]: the rule at each grid point
        add = snapshot.load_model.pending_curve(request.prompt_tokens, request.predicted_output)
        curves = (snapshot.demand[cand] + add[None, :]) / cap
        score = curves.max(axis=1) + self.mean_weight * curves.mean(axis=1)
        # Grid index of first admission (points + 1 = not within the horizon); 0 = now.
        first = np.where(fits.any(axis=1), fits.argmax(axis=1), fits.shape[1])
        score = score + 10.0 * first  # sooner admission dominates; score orders within the same wait
        # Tiny tie-break on current usage; argmin then takes the lowest index among exact ties.
        score = score + 1e-9 * (snapshot.used[cand] / snapshot.capacity[cand])
        return int(cand[np.argmin(score)])


# ----------------------------------------------------------------------------------------------------------
# Rebalancers: one method, `plan(snapshot) -> [Migration]`
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoRebalance:
    """Static placement never moves a running request."""

    def plan(self, snapshot: ClusterSnapshot) -> list[Migration]:
        return []


@dataclass(frozen=True)
class CurrentLoadRebalance:
    """Llumnix-style: move load from instances whose *current* usage is high or far above the least loaded
    one; the request moved is the one whose length best closes half the gap (current sizes only)."""

    high_watermark: float = 0.9
    gap: float = 0.2
    max_per_round: int | None = None

    def plan(self, snapshot: ClusterSnapshot) -> list[Migration]:
        healthy = np.flatnonzero(snapshot.healthy)
        if healthy.size < 2:
            return []
        frac = snapshot.used / snapshot.capacity
        used = snapshot.used.copy()
        limit = self.max_per_round or max(1, healthy.size // 2)
        busy: set[int] = set()
        out: list[Migration] = []
        for src in healthy[np.argsort(-frac[healthy], kind="stable")]:
            src = int(src)
            if src in busy or len(out) >= limit:
                continue
            free_dst = [int(d) for d in healthy if int(d) not in busy and d != src]
            if not free_dst:
                break
            dst = min(free_dst, key=lambda d: used[d] / snapshot.capacity[d])
            f_src = used[src] / snapshot.capacity[src]
            f_dst = used[dst] / snapshot.capacity[dst]
            if not (f_src > self.high_watermark or f_src - f_dst > self.gap) or f_src <= f_dst:
                continue
            inst = snapshot.instances[src]
            if inst.lengths.size == 0:
                continue
            half_gap = (used[src] - used[dst]) / 2.0
            fits = inst.lengths <= min(half_gap, snapshot.capacity[dst] - used[dst])
            if not fits.any():
                continue
            cand = np.flatnonzero(fits)
            r = int(cand[np.argmax(inst.lengths[cand])])  # largest that still closes at most half the gap
            tokens = int(inst.lengths[r])
            out.append(Migration(inst.request_ids[r], src, dst, tokens, float(2 * tokens / snapshot.capacity[src])))
            used[src] -= tokens
            used[dst] += tokens
            busy.update((src, dst))
        return out


@dataclass(frozen=True)
class PredictedRebalance:
    """ARES rebalancing: move a request when that lowers the predicted peak of the (source, target) pair by
    more than the migration costs.

    gain = max(peak_src, peak_dst) before - after (fractions of capacity, load model above);
    cost = cost_per_second * migration pause (KV bytes / link bandwidth + fixed pause): how much predicted
    peak reduction one second of a request's pause is worth. A source is considered when its predicted peak
    is above `high_watermark` or more than `gap` above the least loaded instance.
    """

    high_watermark: float = 0.9
    gap: float = 0.15
    min_gain: float = 0.02
    cost_per_second: float = 0.1
    targets_per_source: int = 4
    max_per_round: int | None = None

    def plan(self, snapshot: ClusterSnapshot) -> list[Migration]:
        healthy = np.flatnonzero(snapshot.healthy)
        if healthy.size < 2:
            return []
        lm = snapshot.load_model
        cap = snapshot.capacity
        demand = snapshot.demand.copy()
        peak = demand.max(axis=1) / cap
        limit = self.max_per_round or max(1, healthy.size // 2)
        avail = np.zeros(len(cap), dtype=bool)
        avail[healthy] = True  # not yet a source or target this round
        out: list[Migration] = []
        for src in healthy[np.argsort(-peak[healthy], kind="stable")]:
            src = int(src)
            if len(out) >= limit:
                break
            if not avail[src]:
                continue
            avail[src] = False
            free_arr = np.flatnonzero(avail)
            if free_arr.size == 0:
                break
            low = float(peak[free_arr].min())
            if not (peak[src] > self.high_watermark or peak[src] - low > self.gap):
                avail[src] = True
                if peak[src] - low <= self.gap and peak[src] <= self.high_watermark:
                    break  # sources come in decreasing peak order: no later one triggers either
                continue
            inst = snapshot.instances[src]
            if inst.lengths.size == 0:
                continue
            contrib = lm.contributions(inst.lengths, lm.remaining(inst))  # [n_req, G+1]
            src_after = (demand[src][None, :] - contrib).max(axis=1) / cap[src]
            cost = self.cost_per_second * snapshot.migration_cost.seconds(inst.lengths)
            best = None
            for dst in free_arr[np.argsort(peak[free_arr], kind="stable")][: self.targets_per_source]:
                dst = int(dst)
                room = cap[dst] - snapshot.used[dst] - inst.lengths
                dst_after = (demand[dst][None, :] + contrib).max(axis=1) / cap[dst]
                before = max(peak[src], peak[dst])
                net = before - np.maximum(src_after, dst_after) - cost
                net = np.where(room > 0, net, -np.inf)
                r = int(np.argmax(net))
                if best is None or net[r] > best[0]:
                    best = (float(net[r]), r, dst)
            if best is None or best[0] <= self.min_gain:
                continue
            net, r, dst = best
            tokens = int(inst.lengths[r])
            out.append(Migration(inst.request_ids[r], src, dst, tokens, net))
            demand[src] -= contrib[r]
            demand[dst] += contrib[r]
            peak[src] = demand[src].max() / cap[src]
            peak[dst] = demand[dst].max() / cap[dst]
            avail[dst] = False
        return out


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """A named pair of decisions. `needs_true_lengths`: the caller must put true remaining lengths in the
    snapshot (and at dispatch) instead of predictions: only a simulator can run it."""

    name: str
    dispatcher: RoundRobinDispatch | RandomDispatch | LeastKVDispatch | PredictedPeakDispatch
    rebalancer: NoRebalance | CurrentLoadRebalance | PredictedRebalance
    needs_true_lengths: bool = False
    uses_predictions: bool = False


POLICIES: Mapping[str, Callable[[], Policy]] = MappingProxyType(
    {
        "round_robin": lambda: Policy("round_robin", RoundRobinDispatch(), NoRebalance()),
        "random": lambda: Policy("random", RandomDispatch(), NoRebalance()),
        "least_kv": lambda: Policy("least_kv", LeastKVDispatch(), NoRebalance()),
        "current_migrate": lambda: Policy("current_migrate", LeastKVDispatch(), CurrentLoadRebalance()),
        "ares": lambda: Policy("ares", PredictedPeakDispatch(), PredictedRebalance(), uses_predictions=True),
        "oracle": lambda: Policy(
            "oracle",
            PredictedPeakDispatch(),
            PredictedRebalance(),
            needs_true_lengths=True,
            uses_predictions=True,
        ),
    }
)


def get_policy(name: str | Policy) -> Policy:
    """The policy registered under `name` (a `Policy` passes through)."""
    if isinstance(name, Policy):
        return name
    try:
        return POLICIES[name]()
    except KeyError:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None


def dispatch(
    snapshot: ClusterSnapshot,
    request: NewRequest,
    policy: str | Policy = "ares",
    rng: np.random.Generator | int | None = None,
) -> Hashable:
    """The id of the decode instance `request` should go to. `rng`: a Generator or seed (random policy)."""
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    index = get_policy(policy).dispatcher.dispatch(snapshot, request, gen)
    return snapshot.instances[index].instance_id


def plan_rebalance(snapshot: ClusterSnapshot, policy: str | Policy = "ares") -> list[Migration]:
    """Migrations the policy wants now (`source`/`target` are indices into `snapshot.instances`)."""
    return get_policy(policy).rebalancer.plan(snapshot)
