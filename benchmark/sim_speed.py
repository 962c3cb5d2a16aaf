"""Simulator speed at scale: 256 decode instances, one simulated hour of the R1 workload at ~70% KV use.

Reports simulated requests per wall second and writes benchmark/results/sim_speed.json.
Rerun: `python benchmark/sim_speed.py` (flags: --decode, --duration, --rate-per-instance, --policy; --quick: 16
instances x 600 s, printed only, for a smoke test).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ares.sim.cost_model import get_cost_model
from ares.sim.engine import SimConfig, simulate
from ares.sim.metrics import slo_pairs, summarize
from ares.workloads import load_workload

OUT = Path(__file__).resolve().parent / "results"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--decode", type=int, default=256)
    p.add_argument("--duration", type=float, default=3600.0)
    # Per decode instance, measured at 256 instances (mean KV use over the whole run, drain included):
    # 0.81 req/s -> 48%, 0.88 -> 63%, 0.95 -> 83% (overloaded: 12% SLO attainment). 0.9 sits near 70%;
    # the measured value is reported below.
    p.add_argument("--rate-per-instance", type=float, default=0.9)
    p.add_argument("--policy", default="ares")
    p.add_argument("--poll", type=float, default=1.0, help="router poll interval (s)")
    p.add_argument("--cost", default="h100-llama2-7b")
    p.add_argument("--quick", action="store_true", help="16 instances x 600 s; print, do not write the results file")
    args = p.parse_args()
    if args.quick:
        args.decode, args.duration = 16, 600.0
    rate = args.rate_per_instance * args.decode
    t0 = time.perf_counter()
    work = load_workload("r1", rate, args.duration, seed=0)
    t1 = time.perf_counter()
    cost = get_cost_model(args.cost)
    cfg = SimConfig(n_decode=args.decode, cost=cost, policy=args.policy, poll_interval_s=args.poll)
    res = simulate(work, cfg)
    t2 = time.perf_counter()
    s = summarize(res, slo_pairs(cost), cost)
    doc = {
        "decode": args.decode,
        "policy": args.policy,
        "cost_model": args.cost,
        "simulated_s": args.duration,
        "rate_rps": rate,
        "requests": len(work),
        "workload_build_s": t1 - t0,
        "simulate_wall_s": t2 - t1,
        "requests_per_wall_s": len(work) / (t2 - t1),
        "events": res.events,
        "mean_kv_utilisation": s["kv_mean"],
        "slo_attainment": s["slo_attainment"],
        "attainment": s["attainment"],
        "p99_tpot_ms": s["tpot_p99"] * 1e3,
        "p50_itl_ms": s["itl_p50"] * 1e3,  # every token gap, stalls included (streaming histogram)
        "p99_itl_ms": s["itl_p99"] * 1e3,
        "token_gaps": s["token_gaps"],
        "migrations": s["migrations"],
        "under_10_min": (t2 - t0) < 600,
    }
    if not args.quick:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "sim_speed.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
