"""A fingerprint of one simulation's per-request outcomes, to check that a simulator change meant to be speed-only
leaves the results as they were: run it at both commits and compare the digests.

`python benchmark/sim_digest.py --decode 256 --duration 1800 --rate-per-instance 0.9 --policy ares_hold`
prints the request count, wall time, events and the sha256 (first 16 hex) of first-token and finish times,
retractions, migrations per request and longest token gaps.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np

from ares.sim.cost_model import get_cost_model
from ares.sim.engine import SimConfig, simulate
from ares.workloads import load_workload


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--duration", type=float, default=900.0)
    p.add_argument("--rate-per-instance", type=float, default=0.95)
    p.add_argument("--policy", default="ares_hold")
    p.add_argument("--workload", default="r1")
    p.add_argument("--cost", default="h100-llama2-7b")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    work = load_workload(args.workload, args.rate_per_instance * args.decode, args.duration, seed=args.seed)
    cfg = SimConfig(n_decode=args.decode, cost=get_cost_model(args.cost), policy=args.policy, poll_interval_s=1.0)
    t0 = time.perf_counter()
    res = simulate(work, cfg)
    wall = time.perf_counter() - t0
    h = hashlib.sha256()
    for a in (res.t_first, res.t_finish, res.retractions, res.migrations_per_request, res.max_gap):
        h.update(np.ascontiguousarray(a).tobytes())
    print(f"requests {len(work)} wall {wall:.1f} s events {res.events} digest {h.hexdigest()[:16]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
