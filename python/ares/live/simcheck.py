"""The simulator against the live cluster: a CPU cost profile measured from the live run's own servers, and the
simulator's prediction of each policy's P99 TPOT and goodput on the same request list, side by side.

The profile (`cpu-smollm2-135m-measured`):
- decode step time `a + b*batch + c*kv_tokens`: least squares over SGLang's own decode log lines of every decode
  server during the replays (`Decode batch, #running-req: N, #token: K, ... gen throughput (token/s): X`, one per
  40 steps: step = N / X). The fit absorbs the CPU the other servers take meanwhile (they share 2 cores);
- prefill: `base + per_token * prompt` fitted to the calibration requests' TTFT alone (prefill, KV transfer,
  bootstrap and the first step together);
- migration: the measured link profile `cpu-loopback-measured` (`benchmark/migration_bench.py`);
- KV capacity: the servers' `--max-total-tokens`.
The simulated workload is the live one: the same arrival times and prompt lengths, and as output lengths the
lengths each request actually had in that policy's replay (the model's own greedy answers).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ares.sim.cost_model import CostModel
from ares.sim.engine import SimConfig, simulate
from ares.sim.metrics import request_latencies
from ares.workloads.base import Workload
from ares_router.link_profile import get_link_profile

DECODE_LINE = re.compile(
    rb"\[(?P<ts>[\d\- :]+)\] Decode batch, #running-req: (?P<n>\d+), #token: (?P<k>\d+),.*?"
    rb"gen throughput \(token/s\): (?P<thr>[\d.]+)"
)
PROFILE_NAME = "cpu-smollm2-135m-measured"
KV_BYTES_SMOLLM2 = 2 * 30 * 3 * 64 * 2  # 30 layers x (K, V) x 3 KV heads x head dim 64 x bf16


def decode_points(logs: list[Path]) -> np.ndarray:
    """(batch, kv tokens, step seconds) of every decode log line with a throughput."""
    rows = []
    for p in logs:
        for m in DECODE_LINE.finditer(p.read_bytes()):
            n, k, thr = int(m["n"]), int(m["k"]), float(m["thr"])
            if n > 0 and thr > 0:
                rows.append((n, k, n / thr))
    return np.asarray(rows, dtype=float).reshape(-1, 3)


def fit_linear_nonneg(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares `y ~ x @ coef` with coef >= 0 (a negative step-time term is dropped and the rest refitted)."""
    cols = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        coef[cols] = np.linalg.lstsq(x[:, cols], y, rcond=None)[0]
        neg = [j for j in cols if coef[j] < 0]
        if not neg:
            return coef
        cols.remove(min(neg, key=lambda j: coef[j]))


def fit_profile(decode_logs: list[Path], calibration: list[dict], kv_capacity: int) -> tuple[CostModel, dict]:
    """The measured cost model and its fit statistics."""
    pts = decode_points(decode_logs)
    if len(pts) < 3:
        raise ValueError(f"only {len(pts)} decode log lines with a throughput: too few to fit the step time")
    x = np.column_stack([np.ones(len(pts)), pts[:, 0], pts[:, 1]])
    a, b, c = fit_linear_nonneg(x, pts[:, 2])
    pred = x @ np.array([a, b, c])
    r2 = 1 - float(np.sum((pts[:, 2] - pred) ** 2) / max(np.sum((pts[:, 2] - pts[:, 2].mean()) ** 2), 1e-12))
    p = np.array([[1.0, c_["prompt_tokens"]] for c_ in calibration])
    ttft = np.array([c_["ttft_s"] for c_ in calibration])
    pre_base, pre_tok = fit_linear_nonneg(p, ttft) if len(calibration) >= 2 else (float(ttft.mean()), 0.0)
    link = get_link_profile("cpu-loopback-measured")
    cost = CostModel(
        name=PROFILE_NAME,
        step_base_s=float(a),
        step_per_request_s=float(b),
        step_per_kv_token_s=float(c),
        prefill_base_s=float(pre_base),
        prefill_per_token_s=float(pre_tok),
        kv_capacity_tokens=int(kv_capacity),
        kv_bytes_per_token=KV_BYTES_SMOLLM2,
        link_bytes_per_s=link.bytes_per_s,
        migration_pause_s=link.pause_s,
        migration_setup_s=link.setup_s,
        note="MEASURED on the live CPU cluster (ares.live.simcheck): step time from the decode servers' own log "
        "lines, prefill from single requests' TTFT, migration from cpu-loopback-measured",
    )
    stats = {
        "decode_points": len(pts),
        "r2": r2,
        "batch_range": [int(pts[:, 0].min()), int(pts[:, 0].max())],
        "kv_range": [int(pts[:, 1].min()), int(pts[:, 1].max())],
    }
    return cost, stats


def live_as_workload(requests: list[dict], outputs: dict[str, int]) -> Workload:
    """The replay as a simulator workload: arrivals and prompt lengths, and each request's live output length."""
    reqs = [r for r in requests if outputs.get(r["rid"], 0) > 0]
    return Workload(
        "live",
        np.array([r["arrival_s"] for r in reqs], dtype=float),
        np.array([r["prompt_tokens"] for r in reqs], dtype=np.int64),
        np.array([outputs[r["rid"]] for r in reqs], dtype=np.int64),
    )


def simulate_policy(
    work: Workload, policy: str, cost: CostModel, slo_ttft_s: float, slo_tpot_s: float, args, error_model=None
) -> dict:
    """The simulator's figures for `policy` on the live workload, computed as the live ones are."""
    cfg = SimConfig(
        n_decode=args.decode,
        n_prefill=1,
        cost=cost,
        policy=policy,
        poll_interval_s=0.5,
        rebalance_every=2,  # the router's 1 s rebalancing interval
        reserve_tokens=args.reserve_tokens,
        max_tokens=args.max_new_tokens,
        warmup_frac=0.0,
        seed=0,
        **({"error_model": error_model} if error_model is not None else {}),
    )
    res = simulate(work, cfg)
    lat = request_latencies(res)
    done = ~np.isnan(res.t_finish)
    tpot = lat["tpot"][done & (res.output > 1)]
    met = done & (lat["ttft"] <= slo_ttft_s) & ((lat["tpot"] <= slo_tpot_s) | (res.output <= 1))
    end = float(np.nanmax(res.t_finish)) if done.any() else float("nan")
    return {
        "p99_tpot_ms": 1e3 * float(np.percentile(tpot, 99)) if tpot.size else None,
        "p50_tpot_ms": 1e3 * float(np.percentile(tpot, 50)) if tpot.size else None,
        "slo_attainment": float(met.mean()),
        "goodput_rps": float(met.sum() / end) if end > 0 else 0.0,
        "retractions": int(res.retractions.sum()),
        "migrations": int(res.migrations),
    }


def compare(live: dict, sim: dict) -> dict:
    """sim / live for the figures the issue asks the simulator to predict within 25%."""
    out = {}
    for key in ("p99_tpot_ms", "goodput_rps"):
        lv, sv = live.get(key), sim.get(key)
        out[key] = None if not lv or sv is None else sv / lv
    out["within_25pct"] = all(v is not None and abs(v - 1) <= 0.25 for v in out.values())
    return out
