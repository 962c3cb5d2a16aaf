"""Simulator speed at scale: 256 decode instances, one simulated hour of the R1 workload at ~70% KV use.

Reports simulated requests per wall second per policy (each on the same requests, one after the other on one core)
with each run's SLO attainment and tails, and writes benchmark/results/sim_speed.json.
Rerun: `python benchmark/sim_speed.py` (flags: --decode, --duration, --rate-per-instance, --policy a,b,...; --quick:
16 instances x 600 s, printed only, for a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from provenance import record

from ares.sim.cost_model import get_cost_model
from ares.sim.engine import SimConfig, simulate
from ares.sim.metrics import slo_pairs, summarize
from ares.workloads import load_workload

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmark" / "results"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--decode", type=int, default=256)
    p.add_argument("--duration", type=float, default=3600.0)
    # Per decode instance, measured at 256 instances (mean KV use over the whole run, drain included):
    # 0.81 req/s -> 48%, 0.88 -> 63%, 0.95 -> 83% (overloaded: 12% SLO attainment). 0.9 sits near 70%;
    # the measured value is reported below.
    p.add_argument("--rate-per-instance", type=float, default=0.9)
    p.add_argument("--policy", default="ares", help="comma-separated: each simulated on the same requests, timed")
    p.add_argument("--poll", type=float, default=1.0, help="router poll interval (s)")
    p.add_argument("--cost", default="h100-llama2-7b")
    p.add_argument("--quick", action="store_true", help="16 instances x 600 s; print, do not write the results file")
    p.add_argument("--out", default=str(OUT / "sim_speed.json"), help="results file")
    args = p.parse_args()
    if args.quick:
        args.decode, args.duration = 16, 600.0
    rate = args.rate_per_instance * args.decode
    t0 = time.perf_counter()
    work = load_workload("r1", rate, args.duration, seed=0)
    build_s = time.perf_counter() - t0
    cost = get_cost_model(args.cost)
    doc = {
        "provenance": record(ROOT),
        "cpu": platform.processor() or platform.machine(),
        "decode": args.decode,
        "cost_model": args.cost,
        "simulated_s": args.duration,
        "rate_rps": rate,
        "requests": len(work),
        "workload_build_s": build_s,
        "runs": {},
    }
    for pol in [x for x in args.policy.split(",") if x]:
        cfg = SimConfig(n_decode=args.decode, cost=cost, policy=pol, poll_interval_s=args.poll)
        t1 = time.perf_counter()
        res = simulate(work, cfg)
        wall = time.perf_counter() - t1
        s = summarize(res, slo_pairs(cost), cost)
        doc["runs"][pol] = {
            "simulate_wall_s": wall,
            "requests_per_wall_s": len(work) / wall,
            "under_10_min": build_s + wall < 600,
            "events": res.events,
            "mean_kv_utilisation": s["kv_mean"],
            "attainment": s["attainment"],
            "p99_tpot_ms": s["tpot_p99"] * 1e3,
            "p50_itl_ms": s["itl_p50"] * 1e3,  # every token gap, stalls included (streaming histogram)
            "p99_itl_ms": s["itl_p99"] * 1e3,
            "p99_ttft_s": s["ttft_p99"],
            "token_gaps": s["token_gaps"],
            "retractions": s["retractions"],
            "migrations": s["migrations"],
            # other jobs on the machine slow a run: the 1-minute load average as it ended says how busy it was
            "load_average_1min_at_end": os.getloadavg()[0],
        }
        print(pol, json.dumps(doc["runs"][pol]), flush=True)
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
