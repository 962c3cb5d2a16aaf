"""Dispatch policies: where a new request goes. Each is a small object with one decision method,
`dispatch(snapshot, request, rng) -> instance index`, chosen by name from `DISPATCHERS`.

The filter in front of the load-aware ones is SGLang's own decode admission (`ClusterSnapshot.admits`): a request
placed where the server would not preallocate it now waits in that server's queue, and holds its prefill back,
which is TTFT. Static placement (round robin, random) ignores load, admission included, as SGLang's routers do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import numpy as np

from ares_router.policy.snapshot import ClusterSnapshot, NewRequest, NoHealthyInstance


class Dispatcher(Protocol):
    """A placement policy."""

    def dispatch(self, snapshot: ClusterSnapshot, request: NewRequest, rng: np.random.Generator) -> int:
        """Index (into `snapshot.instances`) of the instance `request` goes to."""
        ...


def healthy_instances(snapshot: ClusterSnapshot) -> np.ndarray:
    """Indices of the healthy instances; raises `NoHealthyInstance` when there is none."""
    healthy = np.flatnonzero(snapshot.healthy)
    if healthy.size == 0:
        raise NoHealthyInstance("no healthy decode instance in the snapshot")
    return healthy


def eligible(snapshot: ClusterSnapshot, request: NewRequest) -> np.ndarray:
    """Indices of healthy instances that admit `request` now (SGLang's rule); all healthy ones if none does (it
    has to wait somewhere)."""
    healthy = healthy_instances(snapshot)
    ok = snapshot.admits(request, healthy)
    return healthy[ok] if ok.any() else healthy


@dataclass(frozen=True)
class RoundRobinDispatch:
    """Static placement: the next healthy instance in turn (position from `snapshot.dispatch_count`)."""

    def dispatch(self, snapshot: ClusterSnapshot, request: NewRequest, rng: np.random.Generator) -> int:
        """The next healthy instance."""
        healthy = healthy_instances(snapshot)
        return int(healthy[snapshot.dispatch_count % healthy.size])


@dataclass(frozen=True)
class RandomDispatch:
    """Uniform over healthy instances, drawn from the caller's generator."""

    def dispatch(self, snapshot: ClusterSnapshot, request: NewRequest, rng: np.random.Generator) -> int:
        """A healthy instance drawn uniformly."""
        healthy = healthy_instances(snapshot)
        return int(healthy[rng.integers(healthy.size)])


@dataclass(frozen=True)
class LeastKVDispatch:
    """Current load: among the instances that admit the request now, the lowest KV usage (fraction of capacity,
    pending prompts included); ties: lowest index."""

    def dispatch(self, snapshot: ClusterSnapshot, request: NewRequest, rng: np.random.Generator) -> int:
        """The least used admitting instance."""
        cand = eligible(snapshot, request)
        frac = snapshot.used[cand] / snapshot.capacity[cand]
        return int(cand[np.argmin(frac)])


@dataclass(frozen=True)
class PredictedPeakDispatch:
    """ARES placement: lowest predicted peak demand over the horizon once the request is added.

    score = peak fraction + mean_weight * mean fraction over the horizon (the mean stands for the step-time cost
    every co-running request pays). Instances that admit the request now come first; when none does, the one
    whose predicted demand lets it in soonest (the first grid point where SGLang's rule holds on the predicted
    demand and the requests still alive then), so the request waits where the wait is shortest. Ties: score, then
    current usage, then index. Without predictions this ranks like `least_kv`.
    """

    mean_weight: float = 0.5

    def dispatch(self, snapshot: ClusterSnapshot, request: NewRequest, rng: np.random.Generator) -> int:
        """The admitting (or soonest admitting) instance with the lowest predicted peak."""
        cand = healthy_instances(snapshot)
        cap = snapshot.capacity[cand]
        adm = snapshot.admission
        need = adm.required(float(request.prompt_tokens), request.max_new, snapshot.running_tokens[cand], cap)
        room = adm.allocatable(
            cap[:, None] - snapshot.demand[cand],
            snapshot.alive[cand],
            snapshot.running_tokens[cand, None],
            snapshot.single_need[cand, None],
        )
        fits = need[:, None] <= room  # [cand, grid]: the rule at each grid point, on predicted demand
        now = adm.allocatable(
            cap - snapshot.used[cand], snapshot.count[cand], snapshot.running_tokens[cand], snapshot.single_need[cand]
        )
        fits[:, 0] = need <= now  # now: exactly the admission rule on the current state (`ClusterSnapshot.admits`)
        first = np.where(fits.any(axis=1), fits.argmax(axis=1), fits.shape[1])  # points + 1: not within the horizon
        add, _ = snapshot.load_model.pending_curve(request.prompt_tokens, request.predicted_output)
        curves = (snapshot.demand[cand] + add[None, :]) / cap[:, None]
        score = curves.max(axis=1) + self.mean_weight * curves.mean(axis=1)
        frac = snapshot.used[cand] / cap
        order = np.lexsort((np.arange(cand.size), frac, score, first))  # last key is the primary one
        return int(cand[order[0]])


DISPATCHERS: Mapping[str, Callable[[], Dispatcher]] = MappingProxyType(
    {
        "round_robin": RoundRobinDispatch,
        "random": RandomDispatch,
        "least_kv": LeastKVDispatch,
        "predicted_peak": PredictedPeakDispatch,
    }
)
