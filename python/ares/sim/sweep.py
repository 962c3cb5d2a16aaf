"""Rate sweeps and goodput search, over several SLOs and seeds.

Goodput for one SLO = the highest request rate at which >= `target` (90%) of the measured requests meet it.
Search (`find_goodput`), for every SLO at once on shared runs (each run is scored against all of them):
  1. bracket: from a start rate, go up x`growth` until a rate misses the target, or down by halving until one
     meets it; the downward walk stops at `floor` and the upward one at `ceiling`;
  2. bisect on log-rate until the bracket [meets, misses] is within `resolution` (1%: hi <= 1.01 lo).
The next run serves the first SLO (in declaration order) still unresolved; its outcome tightens every SLO's
bracket that it falls inside (attainment is assumed to fall with the rate; a run outside a bracket is ignored).
Outcomes (`Goodput.status`): "ok" (resolved to `resolution`), "below" (even `floor` misses: goodput < floor),
"above" (even `ceiling` meets: goodput >= ceiling), "unresolved" (out of runs). A run that meets nothing is
never reported as 0 req/s.
Seeds (`goodput_over_seeds`): one search per seed (the seed drives the workload sample and the simulator's
randomness); the mean with a 95% Student-t interval over the seeds that resolved.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ares.workloads import Workload, load_workload

from .bounds import POOLED_BOUND, pooled_config
from .engine import SimConfig, SimResult, simulate
from .metrics import SLO, slo_pairs, summarize
from .regimes import OutputSpread


@dataclass
class RunSpec:
    """What to simulate: workload, cluster and SLOs (the first is the headline); the policy and rate vary."""

    workload: str = "r1"
    duration_s: float = 1800.0
    seed: int = 0
    config: SimConfig = field(default_factory=SimConfig)
    slos: Mapping[str, SLO] | None = None
    warmup_frac: float = 0.1
    output_spread: OutputSpread | None = None  # map output lengths (`regimes.OutputSpread`); None: as sampled

    def workload_at(self, rate: float | None, seed: int | None = None) -> Workload:
        """The workload at `rate` req/s for this spec's duration (its output lengths mapped, if set)."""
        work = load_workload(self.workload, rate, self.duration_s, seed=self.seed if seed is None else seed)
        return work if self.output_spread is None else self.output_spread.apply(work)

    def slos_or_default(self) -> dict[str, SLO]:
        """The SLOs to score runs against (default: every declared pair)."""
        return dict(self.slos) if self.slos else slo_pairs(self.config.cost)


def simulate_policy(work: Workload, cfg: SimConfig, policy: str) -> SimResult:
    """One run of `policy` (or of the pooled bound, `POOLED_BOUND`) on cluster `cfg`."""
    if policy == POOLED_BOUND:
        return simulate(work, pooled_config(cfg))
    return simulate(work, dataclasses.replace(cfg, policy=policy))


def run_point(spec: RunSpec, policy: str, rate: float, seed: int | None = None) -> dict:
    """Simulate one (policy, rate, seed) and summarize it against every SLO of the spec."""
    seed = spec.seed if seed is None else seed
    work = spec.workload_at(rate, seed)
    cfg = dataclasses.replace(spec.config, seed=seed, warmup_frac=spec.warmup_frac)
    res = simulate_policy(work, cfg, policy)
    out = summarize(res, spec.slos_or_default(), cfg.cost, spec.warmup_frac)
    out.update(policy=policy, offered_rate=rate, seed=seed)
    return out


def capacity_rate(spec: RunSpec) -> float:
    """Little's-law estimate of the rate that fills every decode instance's KV cache."""
    work = dataclasses.replace(spec, duration_s=3600.0).workload_at(None if spec.workload != "sharegpt" else 1.0)
    p, o = work.prompt_tokens.astype(float), work.output_tokens.astype(float)
    cost = spec.config.cost
    token_seconds = float(np.mean((p + o / 2) * o)) * cost.step_time(32, 0.8 * cost.kv_capacity_tokens)
    return spec.config.n_decode * cost.kv_capacity_tokens / token_seconds


@dataclass
class Goodput:
    """Outcome of one goodput search for one SLO: bracket [lo meets, hi misses] and what it means."""

    lo: float | None  # highest rate that met the target (None: none did)
    hi: float | None  # lowest rate above lo that missed it (None: none did)
    status: str  # "ok", "below", "above" or "unresolved" (module docstring)

    @property
    def rate(self) -> float | None:
        """The goodput (req/s) when resolved; None when the search only bounds it."""
        return self.lo if self.status == "ok" else None

    def label(self) -> str:
        """Human-readable: "5.79 req/s", "below 0.01 req/s", "above 80 req/s" or the bracket."""
        if self.status == "ok":
            return f"{self.lo:.3g} req/s"
        if self.status == "below":
            return f"below {self.hi:.3g} req/s"
        if self.status == "above":
            return f"above {self.lo:.3g} req/s"
        return f"between {self.lo or 0:.3g} and {self.hi if self.hi is not None else math.inf:.3g} req/s"

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {"rate": self.rate, "lo": self.lo, "hi": self.hi, "status": self.status, "label": self.label()}


def find_goodput(
    spec: RunSpec,
    policy: str,
    start_rate: float,
    target: float = 0.9,
    resolution: float = 0.01,
    growth: float = 1.25,
    floor: float | None = None,
    ceiling: float | None = None,
    max_runs: int = 60,
    seed: int | None = None,
    progress: Callable[[dict], None] | None = None,
) -> tuple[dict[str, Goodput], list[dict]]:
    """Goodput of `policy` for every SLO of `spec` (module docstring), and every run's summary.

    `floor` / `ceiling` default to start_rate / 1024 and start_rate * 64.
    """
    slos = list(spec.slos_or_default())
    floor = start_rate / 1024 if floor is None else floor
    ceiling = start_rate * 64 if ceiling is None else ceiling
    lo: dict[str, float | None] = dict.fromkeys(slos)
    hi: dict[str, float | None] = dict.fromkeys(slos)
    runs: list[dict] = []

    def resolved(s: str) -> bool:
        a, b = lo[s], hi[s]
        if a is None:
            return b is not None and b <= floor * (1 + 1e-9)
        if b is None:
            return a >= ceiling * (1 - 1e-9)
        return b <= a * (1 + resolution) * (1 + 1e-9)

    def next_rate(s: str) -> float:
        a, b = lo[s], hi[s]
        if a is None and b is None:
            return start_rate
        if a is None:
            return max(b / 2, floor)  # halve until it meets the target or reaches the floor
        if b is None:
            return min(a * growth, ceiling)
        return math.sqrt(a * b)

    while len(runs) < max_runs:
        todo = [s for s in slos if not resolved(s)]
        if not todo:
            break
        rate = next_rate(todo[0])
        summary = run_point(spec, policy, rate, seed)
        runs.append(summary)
        if progress:
            progress(summary)
        for s in slos:
            meets = summary["attainment"][s] >= target
            a, b = lo[s], hi[s]
            inside = (a is None or rate > a) and (b is None or rate < b)
            if not inside:
                continue  # outside the bracket: non-monotone noise, keep the bracket
            if meets:
                lo[s] = rate
            else:
                hi[s] = rate
    out = {}
    for s in slos:
        if not resolved(s):
            status = "unresolved"
        elif lo[s] is None:
            status = "below"
        elif hi[s] is None:
            status = "above"
        else:
            status = "ok"
        out[s] = Goodput(lo[s], hi[s], status)
    return out, runs


_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # dof 1..10


def t95(dof: int) -> float:
    """Two-sided 95% Student-t quantile for `dof` degrees of freedom (scipy when present; scipy is not a declared
    dependency, so a table for the seed counts used, 3 decimals)."""
    try:
        from scipy.stats import t
    except ImportError:
        return _T975[dof - 1] if dof <= len(_T975) else 1.96 + 2.5 / dof
    return float(t.ppf(0.975, dof))


def mean_ci95(vals: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and half-width of its 95% Student-t interval (None when there are too few values for either)."""
    mean = float(np.mean(vals)) if len(vals) else None
    half = float(t95(len(vals) - 1) * np.std(vals, ddof=1) / math.sqrt(len(vals))) if len(vals) >= 2 else None
    return mean, half


def format_mean_ci(d: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    """`{"mean", "ci95"}` (as `mean_ci95` and `paired_ratio` give them) as "m ± h" for a table; "n/a" without a mean,
    the mean alone without an interval."""
    if not d or d.get("mean") is None:
        return "n/a"
    h = d.get("ci95")
    return f"{d['mean'] * scale:.{digits}f}" + ("" if h is None or h != h else f" ± {h * scale:.{digits}f}")


def paired_ratio(rates_a: Sequence[float | None], rates_b: Sequence[float | None]) -> dict:
    """Goodput of a over b seed by seed (same seed = same requests), over the seeds both resolved: mean, half-width
    of the 95% interval, and how many seeds that is."""
    vals = [a / b for a, b in zip(rates_a, rates_b, strict=True) if a and b]
    mean, half = mean_ci95(vals)
    return {"mean": mean, "ci95": half, "seeds": len(vals)}


def aggregate_goodput(per_seed: Sequence[Goodput]) -> dict:
    """Mean and 95% interval of goodput over seeds; a censored seed ("below"/"above") is said, not averaged."""
    vals = [g.rate for g in per_seed if g.status == "ok"]
    out: dict = {"seeds": len(per_seed), "per_seed": [g.to_dict() for g in per_seed]}
    below = [g.hi for g in per_seed if g.status == "below"]
    above = [g.lo for g in per_seed if g.status == "above"]
    other = [g for g in per_seed if g.status == "unresolved"]
    mean, half = mean_ci95(vals)
    out.update(mean=mean, ci95=half, resolved=len(vals))
    if len(vals) == len(per_seed):
        out["status"] = "ok"
        out["label"] = f"{mean:.3g}" + (f" ± {half:.2g}" if half is not None else "") + " req/s"
    elif below and len(below) == len(per_seed):
        out["status"] = "below"
        out["label"] = f"below {max(below):.3g} req/s (no rate searched met the SLO)"
    elif above and len(above) == len(per_seed):
        out["status"] = "above"
        out["label"] = f"above {min(above):.3g} req/s (every rate searched met the SLO)"
    else:
        out["status"] = "mixed"
        parts = [f"{len(vals)} seeds {mean:.3g} req/s"] if vals else []
        parts += [f"{len(below)} below {max(below):.3g}"] if below else []
        parts += [f"{len(above)} above {min(above):.3g}"] if above else []
        parts += [f"{len(other)} unresolved"] if other else []
        out["label"] = "; ".join(parts)
    return out


def goodput_over_seeds(
    spec: RunSpec,
    policy: str,
    start_rate: float,
    seeds: Sequence[int],
    progress: Callable[[dict], None] | None = None,
    **search,
) -> tuple[dict[str, dict], list[dict]]:
    """Per SLO: `aggregate_goodput` of one search per seed; and every run's summary."""
    per: dict[str, list[Goodput]] = {s: [] for s in spec.slos_or_default()}
    runs: list[dict] = []
    for seed in seeds:
        found, r = find_goodput(spec, policy, start_rate, seed=seed, progress=progress, **search)
        runs += r
        for s, g in found.items():
            per[s].append(g)
    return {s: aggregate_goodput(gs) for s, gs in per.items()}, runs
