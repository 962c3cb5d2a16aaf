"""`ares sim`: simulate policies on a workload at given rates (or search goodput); JSON + PNG outputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ares_router.policy import POLICIES, LoadModel

from .cost_model import PRESETS, get_cost_model
from .engine import SimConfig
from .predictor_model import ErrorModel, load_error_model
from .sweep import RunSpec, capacity_rate, find_goodput, run_point

DEFAULT_ACCURACY = Path("benchmark/results/predictor_accuracy.json")


def add_sim_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by `ares sim` and the benchmark scripts."""
    p.add_argument("--workload", default="r1", help="r1, azure_conv, mooncake_conv or sharegpt")
    p.add_argument("--decode", type=int, default=8, help="decode instances")
    p.add_argument("--prefill", type=int, default=None, help="prefill instances (default decode/2)")
    p.add_argument("--policy", default=",".join(POLICIES), help="comma-separated policies")
    p.add_argument("--cost", default="h100-llama2-7b", choices=sorted(PRESETS), help="cost model preset")
    p.add_argument("--duration", type=float, default=1800.0, help="simulated seconds of arrivals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sigma", type=float, default=0.5, help="predictor log-error sigma at the start")
    p.add_argument("--accuracy-json", default=None, help="empirical error profile (default: the results file if any)")
    p.add_argument("--horizon", type=int, default=2048, help="ARES load-model horizon (decode steps)")
    p.add_argument("--dispatch-prediction", action="store_true", help="ARES knows a noisy length at dispatch")
    p.add_argument("--poll", type=float, default=0.5, help="snapshot poll interval (s)")
    p.add_argument(
        "--reserve-tokens",
        type=int,
        default=512,
        help="decode admission headroom per running request (SGLang's num_reserved_decode_tokens; 0: admit "
        "whenever the prompt fits, so overload shows as retractions instead of queueing)",
    )
    p.add_argument("--tpot-factor", type=float, default=1.25, help="TPOT SLO = factor x full-KV step time")
    p.add_argument("--quick", action="store_true", help="short runs (600 s) for a smoke test")


def spec_from_args(args: argparse.Namespace) -> tuple[RunSpec, str]:
    """The RunSpec the flags describe, and a line saying which error model is used."""
    from ares.workloads import load_workload

    from .metrics import SLO

    cost = get_cost_model(args.cost)
    err = ErrorModel.parametric(args.sigma)
    acc = Path(args.accuracy_json) if args.accuracy_json else DEFAULT_ACCURACY
    if acc.exists():
        outs = load_workload(args.workload, None if args.workload != "sharegpt" else 1.0, 3600.0).output_tokens
        err = load_error_model(acc, outs) or err
    cfg = SimConfig(
        n_decode=args.decode,
        n_prefill=args.prefill,
        cost=cost,
        error_model=err,
        load_model=LoadModel(horizon_tokens=args.horizon),
        poll_interval_s=args.poll,
        dispatch_prediction=args.dispatch_prediction,
        reserve_tokens=args.reserve_tokens,
        record_kv_instances=64,
    )
    duration = 600.0 if args.quick else args.duration
    spec = RunSpec(args.workload, duration, args.seed, cfg, SLO.for_cost(cost, tpot_factor=args.tpot_factor))
    return spec, err.source


def add_parser(subparsers) -> None:
    """Register `ares sim`."""
    p = subparsers.add_parser("sim", help="simulate decode policies on a PD cluster", description=__doc__)
    add_sim_arguments(p)
    p.add_argument("--rates", default=None, help="comma-separated req/s (default: goodput search)")
    p.add_argument("--out", default="benchmark/results", help="output folder")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run the sweep and write `sim_<workload>_d<D>.json` and its P99 TPOT plot."""
    from tqdm import tqdm

    from .plots import plot_tpot_vs_rate

    spec, err_src = spec_from_args(args)
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
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
            goodput[pol], pol_runs = find_goodput(spec, pol, start)
            runs += pol_runs
    stem = f"sim_{spec.workload}_d{spec.config.n_decode}"
    doc = {
        "workload": spec.workload,
        "decode": spec.config.n_decode,
        "duration_s": spec.duration_s,
        "cost_model": spec.config.cost.to_dict(),
        "slo": spec.slo_or_default().to_dict(),
        "error_model": err_src,
        "goodput": goodput,
        "runs": runs,
    }
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    plot_tpot_vs_rate(
        runs,
        out / f"{stem}_tpot.png",
        f"{spec.workload}, {spec.config.n_decode} decode",
        spec.slo_or_default().tpot_s,
    )
    for r in runs:
        print(
            f"{r['policy']:16s} rate {r['offered_rate']:7.2f}  attain {r['slo_attainment']:.3f}  "
            f"P99 TPOT {r['tpot_p99'] * 1e3:6.1f} ms  P99 TTFT {r['ttft_p99']:7.2f} s  "
            f"retract {r['retractions']}  migr {r['migrations']}"
        )
    for pol, g in goodput.items():
        print(f"goodput {pol:16s} {g:.2f} req/s")
    print(f"wrote {out / stem}.json")
    return 0


__all__ = ["add_parser", "add_sim_arguments", "spec_from_args"]
