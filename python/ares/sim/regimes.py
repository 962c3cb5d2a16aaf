"""Regime knobs for the map (`benchmark/sim_map.py`): per-instance concurrency and output-length dispersion.

Concurrency = an instance's KV capacity / the workload's mean request footprint (prompt + output tokens): how many
requests an instance holds when full. `with_concurrency` changes it the way a smaller KV per token does (GQA, KV
quantisation): capacity scales by f, KV bytes per token and the per-KV-token step cost by 1/f, so a full instance's
step time, the SLOs scaled from it (`metrics.full_kv_step`) and a full instance's migration bytes stay as they were.

Dispersion = the coefficient of variation (CV) of output lengths. `OutputSpread` maps every output length through a
power law, o' = s * o^k, with k found by bisection so the CV hits the target and s so the mean stays (up to the
clip at 32k tokens): the order of requests by length (and so the prompt/output pairing) is kept, only the spread
changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ares.workloads import Workload

from .cost_model import CostModel

MAX_OUTPUT_TOKENS = 32768  # R1's longest outputs; a spread-out length is clipped here (and at 1)


def mean_footprint(work: Workload) -> float:
    """Mean tokens a request holds when it finishes (prompt + output)."""
    return float(np.mean(work.prompt_tokens.astype(float) + work.output_tokens))


def with_concurrency(cost: CostModel, footprint_tokens: float, concurrency: float) -> CostModel:
    """`cost` with KV capacity = concurrency x footprint, KV bytes and per-KV-token step cost scaled inversely."""
    if concurrency <= 0 or footprint_tokens <= 0:
        raise ValueError(f"concurrency ({concurrency}) and footprint ({footprint_tokens}) must be positive")
    capacity = max(int(round(concurrency * footprint_tokens)), 1)
    f = capacity / cost.kv_capacity_tokens
    return dataclasses.replace(
        cost,
        name=f"{cost.name}@C{concurrency:g}",
        kv_capacity_tokens=capacity,
        kv_bytes_per_token=cost.kv_bytes_per_token / f,
        step_per_kv_token_s=cost.step_per_kv_token_s / f,
        note=f"{cost.note} KV per token scaled by {1 / f:.3g} for {concurrency:g} full-size requests per instance",
    )


def cv(x: np.ndarray) -> float:
    """Coefficient of variation (population std / mean)."""
    x = np.asarray(x, dtype=float)
    return float(x.std() / x.mean())


@dataclass(frozen=True)
class OutputSpread:
    """A fixed map of output lengths, o' = clip(round(scale * o ** power), 1, MAX_OUTPUT_TOKENS): fitted once on a
    reference sample, then the same for every rate and seed (a small sample could not be fitted on its own)."""

    power: float
    scale: float
    target_cv: float

    def lengths(self, out: np.ndarray) -> np.ndarray:
        """The mapped lengths (int64)."""
        y = self.scale * np.asarray(out, dtype=float) ** self.power
        return np.clip(np.rint(y), 1, MAX_OUTPUT_TOKENS).astype(np.int64)

    def apply(self, work: Workload) -> Workload:
        """`work` with its output lengths mapped."""
        return dataclasses.replace(
            work, name=f"{work.name}@cv{self.target_cv:g}", output_tokens=self.lengths(work.output_tokens)
        )

    @classmethod
    def fit(cls, work: Workload, target_cv: float, tol: float = 0.02) -> OutputSpread:
        """The map that gives `work`'s outputs CV `target_cv` with their mean kept (bisection on the power)."""
        if target_cv <= 0:
            raise ValueError(f"target CV must be positive, got {target_cv}")
        out = work.output_tokens.astype(float)
        if len(out) < 2 or np.all(out == out[0]):
            raise ValueError("cannot spread output lengths that are all equal")

        def make(k: float) -> OutputSpread:
            return cls(k, float(out.mean() / np.mean(out**k)), target_cv)

        lo, hi = 0.0, 1.0
        while cv(make(hi).lengths(out)) < target_cv:
            lo, hi = hi, hi * 2
            if hi > 64:
                raise ValueError(f"CV {target_cv} is out of reach (clipped at {MAX_OUTPUT_TOKENS} tokens)")
        while hi - lo > 1e-4:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cv(make(mid).lengths(out)) < target_cv else (lo, mid)
        spread = make(hi)
        got = cv(spread.lengths(out))
        if abs(got - target_cv) > tol * target_cv:
            raise ValueError(f"CV {target_cv} is out of reach (clipped at {MAX_OUTPUT_TOKENS} tokens): got {got:.3f}")
        return spread
