"""One-at-a-time sweep of the placement and rebalancing constants the `ares` policy is built with (simulated PD
cluster, R1 arrivals and lengths, a few requests per instance where placement and migration matter).

Each row changes one constant of `ares` (everything else at its default) and reports, against the default, the
requests meeting the headline SLO per second at a fixed load, SLO attainment, retractions and migrations, with a
paired per-seed ratio and its 95% interval. The constants (defaults in brackets) and where they live:

- `LoadThresholds` of the predicted rebalancer: `high_watermark` [0.9] and `gap` [0.15]
  (`ares_router/policy/rebalance.py`; the current-load rebalancer uses 0.9 / 0.2, Llumnix-style);
- `PeakGainChooser`: `min_gain` [0.02] and `cost_per_second` [0.1];
- `PredictedPeakDispatch.mean_weight` [0.5] (`ares_router/policy/dispatch.py`);
- the load model's `horizon_tokens` [2048] and `points` [16] (`ares_router/policy/load_model.py`).

The router-only gate (`RebalanceLimits`: concurrency, cooldowns, confirmation rounds, back-off) and the migration
timeouts are not in the simulator, so they are not swept here; `docs/constants.md` says where each comes from.

    python benchmark/sim_constants.py [--decode 16] [--concurrency 5] [--duration 1800] [--seeds 0,1,2,3,4]
                                      [--load 0.5] [--quick]
Writes benchmark/results/sim_constants.{json,md} (resumable: finished rows are kept in the JSON and skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from provenance import record

from ares.sim.cost_model import get_cost_model
from ares.sim.engine import SimConfig
from ares.sim.regimes import mean_footprint, with_concurrency
from ares.sim.sweep import RunSpec, capacity_rate, paired_ratio, run_point
from ares.workloads import load_workload
from ares_router.policy import LoadModel, Policy
from ares_router.policy.dispatch import PredictedPeakDispatch
from ares_router.policy.rebalance import (
    LeastLoadedTargets,
    LoadThresholds,
    PeakGainChooser,
    PredictedLoad,
    Rebalancer,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {"high_watermark": 0.9, "gap": 0.15, "min_gain": 0.02, "cost_per_second": 0.1, "mean_weight": 0.5,
            "horizon_tokens": 2048, "points": 16}  # fmt: skip
SWEEP = {
    "high_watermark": [0.8, 0.95],
    "gap": [0.1, 0.2, 0.3],
    "min_gain": [0.005, 0.05],
    "cost_per_second": [0.03, 0.3],
    "mean_weight": [0.0, 1.0],
    "horizon_tokens": [1024, 4096],
    "points": [8, 32],
}


def build(k: dict) -> tuple[Policy, LoadModel]:
    """The `ares` policy and load model with the constants `k`."""
    rebalancer = Rebalancer(
        PredictedLoad(),
        LoadThresholds(k["high_watermark"], k["gap"]),
        LeastLoadedTargets(4),
        PeakGainChooser(k["min_gain"], k["cost_per_second"]),
    )
    policy = Policy("ares", PredictedPeakDispatch(k["mean_weight"]), rebalancer)
    return policy, LoadModel(horizon_tokens=k["horizon_tokens"], points=k["points"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--concurrency", type=float, default=5.0, help="full-size requests per instance's KV")
    ap.add_argument("--duration", type=float, default=1800.0)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--load", type=float, default=0.5, help="offered rate, x the Little's-law capacity estimate")
    ap.add_argument("--cost", default="h100-llama2-7b")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 decode, 300 s, 1 seed, two rows")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmark" / "results" / "sim_constants")
    args = ap.parse_args()
    if args.quick:
        args.decode, args.duration, args.seeds = 4, 300.0, "0"
        args.out = ROOT / ".ares" / "sim_constants_quick"
    seeds = [int(s) for s in args.seeds.split(",")]
    native = load_workload("r1", None, 3600.0, seed=0)
    cost = with_concurrency(get_cost_model(args.cost), mean_footprint(native), args.concurrency)
    spec = RunSpec(workload="r1", duration_s=args.duration, config=SimConfig(n_decode=args.decode, cost=cost))
    rate = args.load * capacity_rate(spec)
    slo = next(iter(spec.slos_or_default()))
    rows_spec = [("default", None)] + [(name, v) for name, vals in SWEEP.items() for v in vals]
    if args.quick:
        rows_spec = rows_spec[:2]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = args.out.with_suffix(".json")
    doc = json.loads(path.read_text()) if path.exists() else {}
    key = {"decode": args.decode, "concurrency": args.concurrency, "duration": args.duration, "seeds": seeds,
           "load": args.load, "cost": args.cost, "rate": rate}  # fmt: skip
    if doc.get("config") != key:
        doc = {"config": key, "rows": {}}
    doc["provenance"] = record(ROOT)
    doc["slo"] = slo
    t0 = time.monotonic()
    for i, (name, value) in enumerate(rows_spec):
        label = "default" if value is None else f"{name}={value}"
        if label in doc["rows"]:
            continue
        k = dict(DEFAULTS) if value is None else {**DEFAULTS, name: value}
        policy, lm = build(k)
        cfg = dataclasses.replace(spec.config, load_model=lm)
        per_seed = [run_point(dataclasses.replace(spec, config=cfg), policy, rate, seed) for seed in seeds]
        doc["rows"][label] = {
            "constant": name, "value": value,
            "goodput": [p["rate"] * p["attainment"][slo] for p in per_seed],
            "attainment": [p["attainment"][slo] for p in per_seed],
            "retractions": [p["retractions"] for p in per_seed],
            "migrations": [p["migrations"] for p in per_seed],
            "p99_tpot_ms": [1e3 * p["tpot_p99"] for p in per_seed],
        }  # fmt: skip
        path.write_text(json.dumps(doc, indent=1) + "\n")  # after every row: a cut-short run resumes here
        print(f"[{i + 1}/{len(rows_spec)}] {label}: {time.monotonic() - t0:.0f}s", flush=True)
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(args.out.with_suffix(".md").read_text())
    return 0


def markdown(doc: dict) -> str:
    """The sweep's table: each row against the default, paired over seeds."""
    c, base = doc["config"], doc["rows"]["default"]
    lines = [
        "# ARES policy constants, one at a time (simulator)",
        "",
        f"Commit `{doc['provenance']['commit'][:12]}`{' (dirty)' if doc['provenance']['dirty'] else ''}; command "
        f"`{doc['provenance']['command']}`. R1, {c['decode']} decode instances, C = {c['concurrency']:g} (KV for that "
        f"many mean-footprint requests each), {c['duration']:g} s, seeds {c['seeds']}, offered {c['rate']:.3f} req/s "
        f"({c['load']:g}x the capacity estimate); SLO `{doc['slo']}`. Goodput = SLO-meeting requests per second; "
        "ratio to the default paired per seed (mean ± 95% half-width).",
        "",
        "| constant = value | goodput (req/s) | vs default | SLO attainment | retractions | migrations | P99 TPOT ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in doc["rows"].items():
        ratio = paired_ratio(r["goodput"], base["goodput"])
        mean, half = ratio["mean"], ratio["ci95"]
        iv = "" if half is None else f" ± {half:.3f}"
        lines.append(
            f"| {label} | {sum(r['goodput']) / len(r['goodput']):.3f} | "
            f"{'n/a' if mean is None else f'{mean:.3f}'}{iv} | {sum(r['attainment']) / len(r['attainment']):.3f} "
            f"| {sum(r['retractions'])} | {sum(r['migrations'])} | {max(r['p99_tpot_ms']):.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
