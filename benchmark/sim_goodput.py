"""Goodput and P99 TPOT of every policy on R1, Azure conv and Mooncake conv (simulated PD cluster).

Writes benchmark/results/sim_summary.json, sim_goodput.md, sim_goodput.png, sim_<workload>_tpot.png and
sim_<workload>_kv.png. Rerun: `python benchmark/sim_goodput.py` (add --quick for a smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from tqdm import tqdm

from ares.sim.cli import add_sim_arguments, spec_from_args
from ares.sim.engine import simulate
from ares.sim.plots import plot_goodput_bars, plot_kv_usage, plot_tpot_vs_rate
from ares.sim.sweep import capacity_rate, find_goodput, run_point
from ares.workloads import load_workload

OUT = Path(__file__).resolve().parent / "results"
# Simulated seconds per workload: R1 needs long runs (outputs up to 32k tokens take minutes to decode);
# the Azure trace at ~100 req/s lasts only ~200 s once compressed.
DURATIONS = {"r1": 1800.0, "azure_conv": 300.0, "mooncake_conv": 1200.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_sim_arguments(p)
    p.add_argument("--workloads", default="r1,azure_conv,mooncake_conv")
    p.add_argument("--refine", type=int, default=3, help="bisection steps after the first failing rate")
    args = p.parse_args()
    policies = [x for x in args.policy.split(",") if x]
    summary: dict = {"workloads": {}, "targets": {}}
    bars: dict = {}
    for wl in args.workloads.split(","):
        args.workload = wl
        args.duration = DURATIONS.get(wl, args.duration) if not args.quick else 600.0
        spec, err_src = spec_from_args(args)
        start = 0.6 * capacity_rate(spec)
        goodput, runs = {}, []
        bar = tqdm(policies, desc=f"{wl} goodput")
        for pol in bar:
            goodput[pol], pol_runs = find_goodput(spec, pol, start, refine=args.refine)
            runs += pol_runs
            bar.set_postfix(last=f"{pol}={goodput[pol]:.2f}")
        # Everyone at round_robin's goodput rate: the P99 TPOT comparison of the targets.
        ref = goodput.get("round_robin") or max(goodput.values())
        at_ref = {pol: run_point(spec, pol, ref) for pol in tqdm(policies, desc=f"{wl} @rr goodput")}
        entry = {
            "decode": spec.config.n_decode,
            "duration_s": spec.duration_s,
            "cost_model": spec.config.cost.name,
            "slo": spec.slo_or_default().to_dict(),
            "error_model": err_src,
            "reference_rate": ref,
            "policies": {
                pol: {
                    "goodput_rps": goodput[pol],
                    "p99_tpot_ms_at_rr_goodput": at_ref[pol]["tpot_p99"] * 1e3,
                    "p99_ttft_s_at_rr_goodput": at_ref[pol]["ttft_p99"],
                    "slo_attainment_at_rr_goodput": at_ref[pol]["slo_attainment"],
                    "retractions_at_rr_goodput": at_ref[pol]["retractions"],
                    "migrations_at_rr_goodput": at_ref[pol]["migrations"],
                    "gb_moved_at_rr_goodput": at_ref[pol]["gb_moved"],
                    "kv_spread_at_rr_goodput": at_ref[pol]["kv_spread_mean"],
                }
                for pol in policies
            },
            "runs": runs + [dict(r, reference=True) for r in at_ref.values()],
        }
        summary["workloads"][wl] = entry
        bars[wl] = goodput
        plot_tpot_vs_rate(
            runs, OUT / f"sim_{wl}_tpot.png", f"{wl}: {spec.config.n_decode} decode", spec.slo_or_default().tpot_s
        )
        # KV usage per instance over time at the reference rate, for the static and the ARES policy.
        traces = {}
        work = load_workload(wl, ref, spec.duration_s, seed=spec.seed)
        for pol in [x for x in ("round_robin", "least_kv", "ares") if x in policies]:
            res = simulate(work, dataclasses.replace(spec.config, policy=pol, seed=spec.seed))
            traces[pol] = (res.kv_times, res.kv_frac)
        plot_kv_usage(traces, OUT / f"sim_{wl}_kv.png", f"{wl} at {ref:.2f} req/s: KV per decode instance")
    summary["targets"] = targets(summary["workloads"].get("r1"))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sim_summary.json").write_text(json.dumps(summary, indent=1))
    plot_goodput_bars(bars, OUT / "sim_goodput.png", "Simulated goodput (8 decode instances)")
    (OUT / "sim_goodput.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


def targets(r1: dict | None) -> dict:
    """The issue's R1 targets, checked against what was measured."""
    if not r1:
        return {}
    pol = r1["policies"]
    g = {k: v["goodput_rps"] for k, v in pol.items()}
    out = {}
    if "ares" in pol and "round_robin" in pol:
        rr, ar = pol["round_robin"]["p99_tpot_ms_at_rr_goodput"], pol["ares"]["p99_tpot_ms_at_rr_goodput"]
        red = 1 - ar / rr if rr else float("nan")
        out["p99_tpot_reduction_vs_rr"] = {"value": red, "target": 0.75, "met": bool(red >= 0.75)}
        ratio = g["ares"] / g["round_robin"] if g["round_robin"] else float("inf")
        out["goodput_ratio_vs_rr"] = {"value": ratio, "target": 2.63, "met": bool(ratio >= 2.63)}
    for other in ("least_kv", "current_migrate"):
        if other in g and "ares" in g:
            out[f"ares_ahead_of_{other}"] = {"ares": g["ares"], other: g[other], "met": bool(g["ares"] > g[other])}
    if "oracle" in g and "ares" in g and g["oracle"]:
        gap = 1 - g["ares"] / g["oracle"]
        out["ares_within_10pct_of_oracle"] = {"gap": gap, "met": bool(gap <= 0.10)}
    return out


def markdown(summary: dict) -> str:
    """Tables of the summary."""
    lines = []
    for wl, e in summary["workloads"].items():
        lines += [
            f"### {wl} ({e['decode']} decode, {e['cost_model']}, {e['duration_s']:.0f} s simulated)",
            f"SLO: TTFT <= {e['slo']['ttft_base_s']} s + {e['slo']['ttft_prefill_factor']} x own prefill time; "
            f"TPOT <= {e['slo']['tpot_s'] * 1e3:.1f} ms. Errors: {e['error_model']}. "
            f"Reference rate (round_robin goodput): {e['reference_rate']:.2f} req/s.",
            "",
            "| policy | goodput (req/s) | P99 TPOT @ref (ms) | P99 TTFT @ref (s) | attain @ref | retractions @ref |"
            " migrations @ref | KV spread @ref |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for pol, v in e["policies"].items():
            lines.append(
                f"| {pol} | {v['goodput_rps']:.2f} | {v['p99_tpot_ms_at_rr_goodput']:.1f} | "
                f"{v['p99_ttft_s_at_rr_goodput']:.2f} | {v['slo_attainment_at_rr_goodput']:.3f} | "
                f"{v['retractions_at_rr_goodput']} | {v['migrations_at_rr_goodput']} | "
                f"{v['kv_spread_at_rr_goodput']:.2f} |"
            )
        lines.append("")
    if summary.get("targets"):
        lines += ["### R1 targets", "", "```", json.dumps(summary["targets"], indent=1), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"done in {time.time() - t0:.0f} s")
    raise SystemExit(rc)
