"""Per-request and per-run metrics, SLOs and SLO attainment.

Per request: TTFT = admission to the decode batch - arrival (in PD serving the first token reaches the
client once the decode instance holds the request); TPOT = (finish - first token) / (output - 1), which
includes every stall (queueing after retraction, recompute, migration pause); E2E = finish - arrival.

SLOs scale with the cost model:
  TTFT <= ttft_base_s + ttft_prefill_factor * (prefill time of the request's own prompt)
  TPOT <= tpot_factor * (step time of a decode instance whose KV cache is full, at batch 64)
A request meets its SLO when it finished and meets both. Metrics cover requests arriving in
[warmup, duration]: the cluster starts empty, and long reasoning requests take minutes to reach steady state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .cost_model import CostModel
from .engine import SimResult


@dataclass(frozen=True)
class SLO:
    """Latency targets; `ttft_s` is per request (base + factor * own prefill time)."""

    ttft_base_s: float
    ttft_prefill_factor: float
    tpot_s: float

    @classmethod
    def for_cost(
        cls,
        cost: CostModel,
        tpot_factor: float = 1.25,
        ttft_base_s: float = 1.0,
        ttft_prefill_factor: float = 3.0,
    ) -> SLO:
        """Default SLOs scaled with the cost model (module docstring)."""
        full_step = cost.step_time(64, cost.kv_capacity_tokens)
        return cls(ttft_base_s, ttft_prefill_factor, tpot_factor * full_step)

    def ttft_limit(self, cost: CostModel, prompt: np.ndarray) -> np.ndarray:
        """Per-request TTFT limit (s)."""
        return self.ttft_base_s + self.ttft_prefill_factor * (cost.prefill_base_s + cost.prefill_per_token_s * prompt)

    def to_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


def request_latencies(res: SimResult) -> dict[str, np.ndarray]:
    """Per-request TTFT, TPOT and E2E seconds (NaN for unfinished requests)."""
    ttft = res.t_first - res.arrival
    tpot = np.where(res.output > 1, (res.t_finish - res.t_first) / np.maximum(res.output - 1, 1), 0.0)
    return {"ttft": ttft, "tpot": tpot, "e2e": res.t_finish - res.arrival}


def _pct(x: np.ndarray, q: float) -> float:
    x = x[~np.isnan(x)]
    return float(np.percentile(x, q)) if x.size else float("nan")


def measured(res: SimResult, warmup_frac: float = 0.1) -> np.ndarray:
    """Mask of the requests the metrics cover: those arriving after the warm-up."""
    return res.arrival >= warmup_frac * res.duration_s


def slo_attainment(res: SimResult, slo: SLO, cost: CostModel, warmup_frac: float = 0.1) -> float:
    """Fraction of measured requests that finished and met both SLOs."""
    lat = request_latencies(res)
    sel = measured(res, warmup_frac)
    if not sel.any():
        return 1.0
    finished = ~np.isnan(res.t_finish[sel])
    ttft_ok = lat["ttft"][sel] <= slo.ttft_limit(cost, res.prompt[sel])
    return float((finished & ttft_ok & (lat["tpot"][sel] <= slo.tpot_s)).mean())


def summarize(res: SimResult, slo: SLO, cost: CostModel, warmup_frac: float = 0.1) -> dict:
    """Run-level metrics of the requests arriving after the warm-up."""
    lat = request_latencies(res)
    sel = measured(res, warmup_frac)
    ttft, tpot, e2e = lat["ttft"][sel], lat["tpot"][sel], lat["e2e"][sel]
    finished = ~np.isnan(res.t_finish[sel])
    ok_tpot = finished & (tpot <= slo.tpot_s)
    span = max(res.duration_s * (1 - warmup_frac), 1e-9)
    stats = res.kv_stats
    settled = res.kv_times >= warmup_frac * res.duration_s
    settled &= res.kv_times <= res.duration_s
    out = {
        "requests": int(sel.sum()),
        "rate": float(sel.sum() / span),
        "finished_frac": float(finished.mean()) if sel.any() else 1.0,
        "slo_attainment": slo_attainment(res, slo, cost, warmup_frac),
        "tpot_attainment": float(ok_tpot.mean()) if sel.any() else 1.0,
        "retractions": int(res.retractions[sel].sum()),
        "retracted_requests": int((res.retractions[sel] > 0).sum()),
        "migrations": int(res.migrations),
        "migrations_rejected": int(res.migrations_rejected),
        "gb_moved": float(res.bytes_moved / 1e9),
        "clipped_requests": int(res.clipped),
        "kv_mean": float(stats[settled, 0].mean()) if settled.any() else float("nan"),
        "kv_spread_mean": float((stats[settled, 2] - stats[settled, 1]).mean()) if settled.any() else float("nan"),
        "kv_std_mean": float(stats[settled, 3].mean()) if settled.any() else float("nan"),
        "kv_max_mean": float(stats[settled, 2].mean()) if settled.any() else float("nan"),
        "events": int(res.events),
    }
    for name, x in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = _pct(x, q)
        out[f"{name}_mean"] = float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")
    return out
