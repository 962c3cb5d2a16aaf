"""`ares sim`: simulate policies on a workload at given rates (or search goodput); JSON + PNG outputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ares_router.policy import (
    ADMISSION_MODES,
    DEFAULT_HOLD_MAX_WAIT_S,
    POLICIES,
    LoadModel,
    RebalanceLimits,
    max_wait_arg,
)

from .bounds import POOLED_BOUND
from .cost_model import PRESETS, get_cost_model
from .engine import RETRACTIONS, SimConfig
from .metrics import SLO_PAIRS, slo_pairs
from .predictor_model import ErrorModel, load_error_model
from .sweep import RunSpec, capacity_rate, goodput_over_seeds, run_point

QUICK_DURATION_S = 300.0

DEFAULT_ACCURACY = Path("benchmark/results/predictor_accuracy.json")


def add_sim_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by `ares sim` and the benchmark scripts."""
    p.add_argument("--workload", default="r1", help="r1, azure_conv, mooncake_conv or sharegpt")
    p.add_argument("--decode", type=int, default=8, help="decode instances")
    p.add_argument("--prefill", type=int, default=None, help="prefill instances (default decode/2)")
    p.add_argument(
        "--policy",
        default=",".join([*POLICIES, POOLED_BOUND]),
        help=f"comma-separated policies; {POOLED_BOUND}: one instance with the cluster's pooled KV and compute",
    )
    p.add_argument(
        "--cost",
        default="h100-llama2-7b",
        help=f"cost model: a preset ({', '.join(sorted(PRESETS))}) or a measured profile (sim/cost_profiles.json)",
    )
    p.add_argument("--duration", type=float, default=1800.0, help="simulated seconds of arrivals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sigma", type=float, default=0.5, help="predictor log-error sigma at the start")
    p.add_argument("--accuracy-json", default=None, help="empirical error profile (default: the results file if any)")
    p.add_argument("--horizon", type=int, default=2048, help="ARES load-model horizon (decode steps)")
    p.add_argument("--poll", type=float, default=0.5, help="snapshot poll interval (s)")
    p.add_argument(
        "--reserve-tokens",
        type=int,
        default=512,
        help="decode admission reserve per active request (SGLang's --num-reserved-decode-tokens; 0: no reserve, "
        "so overload shows as retractions instead of queueing; SGLang's single-request term still applies)",
    )
    p.add_argument(
        "--retraction",
        choices=RETRACTIONS,
        default="backup",
        help="what a decode retraction keeps: backup (KV copied to host and back, SGLang 0.5.23's PD decode) or "
        "recompute (prompt + generated tokens recomputed at resume)",
    )
    p.add_argument(
        "--admission",
        choices=ADMISSION_MODES,
        default="sglang",
        help="the decode servers' admission rule (their --ares-admission): sglang (SGLang's reserve and "
        "single-request terms) or predictive (the forecast KV peak of the running set plus the new request "
        "within the pool; retractions stay the safety net)",
    )
    p.add_argument(
        "--hold-max-wait",
        type=max_wait_arg,
        default=DEFAULT_HOLD_MAX_WAIT_S,
        help="aging for late binding (*_hold policies): a request held this many seconds is released before any "
        "behind it and holds new arrivals back while it fits nowhere; 'none': no aging (default: the router's, "
        f"{DEFAULT_HOLD_MAX_WAIT_S})",
    )
    p.add_argument(
        "--gate",
        choices=("live", "off"),
        default="live",
        help="the migration gate the rebalancer's proposals pass: live (the router's, with its default limits: "
        "concurrency, cooldowns, confirmation rounds, back-off) or off (every proposal is tried)",
    )
    p.add_argument(
        "--no-link-contention",
        action="store_true",
        help="give every KV transfer a link of its own (default: P->D transfers and migrations share each "
        "instance's NIC)",
    )
    p.add_argument(
        "--max-tokens",
        default="none",
        help="max_tokens the clients send: none (SGLang budgets 4096 new tokens per request at admission), output "
        "(each request's own length, as sglang.benchmark.serving sends it), or a number (outputs end there)",
    )
    p.add_argument(
        "--slos",
        default=",".join(pr.name for pr in SLO_PAIRS),
        help="comma-separated SLO pairs from ares.sim.metrics.SLO_PAIRS; the first is the headline "
        "(default: all: " + "; ".join(f"{pr.name}: {pr.why}" for pr in SLO_PAIRS) + ")",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per goodput search (mean and 95%% interval)")
    p.add_argument("--resolution", type=float, default=0.01, help="goodput search resolution (relative)")
    p.add_argument("--method", default=None, help="predictor method in the accuracy file (default: ours)")
    p.add_argument("--quick", action="store_true", help="short runs (300 s), 1 seed, 10%% resolution: a smoke test")


def _max_tokens(arg: str) -> int | str | None:
    """`--max-tokens`: "none" -> None, "output" -> "output", else a number."""
    return None if arg == "none" else arg if arg == "output" else int(arg)


def spec_from_args(args: argparse.Namespace) -> tuple[RunSpec, str]:
    """The RunSpec the flags describe, and a line saying which error model is used."""
    cost = get_cost_model(args.cost)
    err = ErrorModel.parametric(args.sigma)
    acc = Path(args.accuracy_json) if args.accuracy_json else DEFAULT_ACCURACY
    if acc.exists():
        err = load_error_model(acc, method=args.method) or err
    cfg = SimConfig(
        n_decode=args.decode,
        n_prefill=args.prefill,
        cost=cost,
        error_model=err,
        load_model=LoadModel(horizon_tokens=args.horizon),
        poll_interval_s=args.poll,
        reserve_tokens=args.reserve_tokens,
        retraction=args.retraction,
        admission=getattr(args, "admission", "sglang"),
        hold_max_wait_s=getattr(args, "hold_max_wait", DEFAULT_HOLD_MAX_WAIT_S),
        gate=RebalanceLimits() if getattr(args, "gate", "live") == "live" else None,
        link_contention=not args.no_link_contention,
        max_tokens=_max_tokens(args.max_tokens),
        record_kv_instances=64,
    )
    duration = QUICK_DURATION_S if args.quick else args.duration
    spec = RunSpec(args.workload, duration, args.seed, cfg, slo_pairs(cost, args.slos))
    return spec, err.source


def search_kwargs(args: argparse.Namespace) -> dict:
    """Goodput-search settings from the flags (--quick: 1 seed, 10% resolution)."""
    return {
        "seeds": [args.seed] if args.quick else list(range(args.seed, args.seed + args.seeds)),
        "resolution": max(args.resolution, 0.10) if args.quick else args.resolution,
    }


def add_parser(subparsers) -> None:
    """Register `ares sim`."""
    p = subparsers.add_parser("sim", help="simulate decode policies on a PD cluster", description=__doc__)
    add_sim_arguments(p)
    p.add_argument("--rates", default=None, help="comma-separated req/s (default: goodput search)")
    p.add_argument("--out", default="benchmark/results", help="output folder")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run the sweep (or goodput search) and write `sim_<workload>_d<D>.json` and its P99 TPOT plot."""
    from tqdm import tqdm

    from ares.provenance import record

    from .plots import plot_tpot_vs_rate

    spec, err_src = spec_from_args(args)
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    slos = spec.slos_or_default()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, goodput = [], {}
    if args.rates:
        rates = [float(r) for r in args.rates.split(",")]
        for pol, rate in tqdm([(p, r) for p in policies for r in rates], desc="sim"):
            runs.append(run_point(spec, pol, rate))
    else:
        start = 0.5 * capacity_rate(spec)
        for pol in tqdm(policies, desc="goodput"):
            goodput[pol], pol_runs = goodput_over_seeds(spec, pol, start, **search_kwargs(args))
            runs += pol_runs
    stem = f"sim_{spec.workload}_d{spec.config.n_decode}"
    acc = Path(args.accuracy_json) if args.accuracy_json else DEFAULT_ACCURACY
    doc = {
        "provenance": record(Path(__file__).resolve().parents[3], [acc]),  # the checkout of an editable install
        "workload": spec.workload,
        "decode": spec.config.n_decode,
        "duration_s": spec.duration_s,
        "cost_model": spec.config.cost.to_dict(),
        "slos": {k: v.to_dict() for k, v in slos.items()},
        "error_model": err_src,
        "goodput": goodput,
        "runs": runs,
    }
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    head = next(iter(slos.values()))
    plot_tpot_vs_rate(runs, out / f"{stem}_tpot.png", f"{spec.workload}, {spec.config.n_decode} decode", head.tpot_s)
    for r in runs:
        print(
            f"{r['policy']:16s} rate {r['offered_rate']:7.2f} seed {r['seed']}  "
            + " ".join(f"{k} {v:.3f}" for k, v in r["attainment"].items())
            + f"  P99 TPOT {r['tpot_p99'] * 1e3:6.1f} ms  P50/P99 ITL {r['itl_p50'] * 1e3:5.1f}/"
            f"{r['itl_p99'] * 1e3:5.1f} ms  P99 TTFT {r['ttft_p99']:7.2f} s  "
            f"retract {r['retractions']}  migr {r['migrations']}"
        )
    for pol, per_slo in goodput.items():
        for name, g in per_slo.items():
            print(f"goodput {pol:18s} {name:12s} {g['label']}")
    print(f"wrote {out / stem}.json")
    return 0


__all__ = ["add_parser", "add_sim_arguments", "spec_from_args"]
