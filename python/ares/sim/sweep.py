"""Rate sweeps and goodput search.

Goodput = the highest request rate at which >= `target` (90%) of requests meet both SLOs. Search: start
from half the KV-capacity estimate of the cluster (Little's law), raise the rate by `growth` until a run
misses the target, then bisect `refine` times between the last passing and the first failing rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ares.workloads import load_workload

from .engine import SimConfig, simulate
from .metrics import SLO, summarize


@dataclass
class RunSpec:
    """What to simulate: workload, cluster and SLO; the policy and rate vary."""

    workload: str = "r1"
    duration_s: float = 1800.0
    seed: int = 0
    config: SimConfig = field(default_factory=SimConfig)
    slo: SLO | None = None
    warmup_frac: float = 0.1

    def slo_or_default(self) -> SLO:
        return self.slo or SLO.for_cost(self.config.cost)


def run_point(spec: RunSpec, policy: str, rate: float) -> dict:
    """Simulate one (policy, rate) and summarize it."""
    work = load_workload(spec.workload, rate, spec.duration_s, seed=spec.seed)
    cfg = dataclasses.replace(spec.config, policy=policy, seed=spec.seed)
    res = simulate(work, cfg)
    out = summarize(res, spec.slo_or_default(), cfg.cost, spec.warmup_frac)
    out.update(policy=policy, offered_rate=rate)
    return out


def capacity_rate(spec: RunSpec) -> float:
    """Little's-law estimate of the rate that fills every decode instance's KV cache."""
    work = load_workload(spec.workload, None if spec.workload != "sharegpt" else 1.0, 3600.0, seed=spec.seed)
    p, o = work.prompt_tokens.astype(float), work.output_tokens.astype(float)
    cost = spec.config.cost
    token_seconds = float(np.mean((p + o / 2) * o)) * cost.step_time(32, 0.8 * cost.kv_capacity_tokens)
    return spec.config.n_decode * cost.kv_capacity_tokens / token_seconds


def find_goodput(
    spec: RunSpec,
    policy: str,
    start_rate: float,
    target: float = 0.9,
    growth: float = 1.25,
    refine: int = 3,
    max_runs: int = 14,
    progress: Callable[[dict], None] | None = None,
) -> tuple[float, list[dict]]:
    """(goodput rate, every run's summary) for one policy."""
    runs: list[dict] = []

    def point(rate: float) -> bool:
        s = run_point(spec, policy, rate)
        runs.append(s)
        if progress:
            progress(s)
        return s["slo_attainment"] >= target

    lo, hi = 0.0, None
    rate = start_rate
    while len(runs) < max_runs:
        if point(rate):
            lo = rate
            rate *= growth
        else:
            hi = rate
            break
    if hi is None:
        return lo, runs
    if lo == 0.0:  # the start already failed: walk down
        while len(runs) < max_runs and hi > start_rate / 64:
            rate = hi / growth
            if point(rate):
                lo = rate
                break
            hi = rate
    for _ in range(refine):
        if lo == 0.0 or len(runs) >= max_runs:
            break
        mid = (lo + hi) / 2
        if point(mid):
            lo = mid
        else:
            hi = mid
    return lo, runs
