"""Goodput of every policy and of the pooled-capacity bound on R1, Azure conv and Mooncake conv (simulated PD).

For each workload, policy (plus `pooled_bound`: one instance with the cluster's pooled KV and compute, see
`ares.sim.bounds`) and seed: goodput searched to 1% for every declared SLO pair (`ares.sim.metrics.SLO_PAIRS`:
the first is the headline), then the mean and 95% interval over the seeds; a search that finds no rate meeting
an SLO says "below X req/s". Then every policy once at round robin's headline goodput: P50/P99 ITL (every token
gap, stalls included), P99 TPOT (per-request mean), P99 TTFT, attainment of every SLO.

Writes sim_summary.json, sim_goodput.md, sim_goodput.png, sim_<workload>_tpot.png and sim_<workload>_kv.png to
--out (default benchmark/results; --quick: .ares/sim_quick, so a smoke run never overwrites the recorded results).
Full run: `python benchmark/sim_goodput.py` (3 workloads x 7 policies x 3 seeds x ~20 runs; est. 1-2 h, one core).
Smoke run (< 1 min): `python benchmark/sim_goodput.py --quick` (R1 only, 300 s, 1 seed, 10% resolution, no KV plots).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from provenance import record
from tqdm import tqdm

from ares.sim.bounds import POOLED_BOUND as BOUND
from ares.sim.cli import DEFAULT_ACCURACY, add_sim_arguments, search_kwargs, spec_from_args
from ares.sim.engine import simulate
from ares.sim.plots import plot_goodput_bars, plot_kv_usage, plot_tpot_vs_rate
from ares.sim.sweep import capacity_rate, goodput_over_seeds, paired_ratio, run_point
from ares.workloads import load_workload

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmark" / "results"
QUICK_OUT = ROOT / ".ares" / "sim_quick"
# Simulated seconds per workload: R1 needs long runs (outputs up to 32k tokens take minutes to decode);
# the Azure trace at ~100 req/s lasts only ~200 s once compressed.
DURATIONS = {"r1": 1800.0, "azure_conv": 300.0, "mooncake_conv": 1200.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sim_arguments(p)
    p.add_argument("--workloads", default=None, help="default: r1,azure_conv,mooncake_conv (--quick: r1)")
    p.add_argument("--out", default=None, help="output folder (default: benchmark/results; --quick: .ares/sim_quick)")
    p.add_argument("--no-kv-plots", action="store_true", help="skip the per-instance KV usage runs and plots")
    p.add_argument(
        "--render", action="store_true", help="no simulation: recompute the ratios and tables of --out's summary"
    )
    args = p.parse_args()
    out = Path(args.out) if args.out else (QUICK_OUT if args.quick else OUT)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        summary = json.loads((out / "sim_summary.json").read_text())
        return write_summary(summary, out)
    workloads = args.workloads or ("r1" if args.quick else "r1,azure_conv,mooncake_conv")
    policies = [x for x in args.policy.split(",") if x]
    search = search_kwargs(args)
    summary: dict = {
        "provenance": record(ROOT, [Path(args.accuracy_json) if args.accuracy_json else DEFAULT_ACCURACY]),
        "search": {"target_attainment": 0.9, **search},
        "workloads": {},
    }
    bars: dict = {}
    for wl in workloads.split(","):
        args.workload = wl
        if not args.quick:
            args.duration = DURATIONS.get(wl, args.duration)
        spec, err_src = spec_from_args(args)
        slos = spec.slos_or_default()
        head = next(iter(slos))
        start = 0.6 * capacity_rate(spec)
        goodput, runs = {}, []
        bar = tqdm(policies, desc=f"{wl} goodput")
        for pol in bar:
            goodput[pol], pol_runs = goodput_over_seeds(spec, pol, start, **search)
            runs += pol_runs
            bar.set_postfix(last=f"{pol}={goodput[pol][head]['label']}")
        ref = reference_rate(goodput, head, start)
        at_ref = {pol: run_point(spec, pol, ref) for pol in tqdm(policies, desc=f"{wl} @ref")}
        entry = {
            "decode": spec.config.n_decode,
            "prefill": spec.config.n_prefill or max(1, spec.config.n_decode // 2),
            "duration_s": spec.duration_s,
            "cost_model": spec.config.cost.name,
            "slos": {k: v.to_dict() for k, v in slos.items()},
            "headline_slo": head,
            "error_model": err_src,
            "start_rate": start,
            "reference_rate": ref,
            "goodput": goodput,
            "at_reference": {pol: compact(r) for pol, r in at_ref.items()},
            "runs": runs + [dict(r, reference=True) for r in at_ref.values()],
        }
        summary["workloads"][wl] = entry
        bars[wl] = {pol: goodput[pol][head]["mean"] or math.nan for pol in policies}
        first_seed = [r for r in runs if r["seed"] == search["seeds"][0]]
        plot_tpot_vs_rate(
            first_seed,
            out / f"sim_{wl}_tpot.png",
            f"{wl}: {spec.config.n_decode} decode (seed {search['seeds'][0]})",
            slos[head].tpot_s,
        )
        if not (args.no_kv_plots or args.quick):  # KV usage per instance over time at the reference rate
            traces = {}
            work = load_workload(wl, ref, spec.duration_s, seed=spec.seed)
            for pol in [x for x in ("round_robin", "least_kv", "ares") if x in policies]:
                res = simulate(work, dataclasses.replace(spec.config, policy=pol, seed=spec.seed))
                traces[pol] = (res.kv_times, res.kv_frac)
            plot_kv_usage(traces, out / f"sim_{wl}_kv.png", f"{wl} at {ref:.2f} req/s: KV per decode instance")
    plot_goodput_bars(bars, out / "sim_goodput.png", f"Simulated goodput ({head} SLO, mean over seeds)")
    return write_summary(summary, out)


def write_summary(summary: dict, out: Path) -> int:
    """Targets and paired ratios from the goodputs, then sim_summary.json and sim_goodput.md."""
    for e in summary["workloads"].values():
        e["paired_ratios"] = paired_ratios(e["goodput"])
    summary["targets"] = targets(summary["workloads"].get("r1"))
    (out / "sim_summary.json").write_text(json.dumps(summary, indent=1))
    (out / "sim_goodput.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"wrote {out}")
    return 0


# (a, b): goodput of a over b, per seed (same seed = same requests), then mean and 95% interval
PAIRS = (
    ("ares", "round_robin"),
    ("ares", "least_kv"),
    ("ares", "current_migrate"),
    ("ares_hold", "least_kv"),
    ("ares_hold", "current_migrate_hold"),
    ("ares_hold", "ares"),
)


def paired_ratios(goodput: dict) -> dict:
    """{"a/b": {slo: {"mean", "ci95", "seeds"}}} over the seeds where both searches resolved."""
    out: dict = {}
    for a, b in PAIRS:
        if a not in goodput or b not in goodput:
            continue
        out[f"{a}/{b}"] = {}
        for slo, ga in goodput[a].items():
            rates_a, rates_b = ([x["rate"] for x in g["per_seed"]] for g in (ga, goodput[b][slo]))
            out[f"{a}/{b}"][slo] = paired_ratio(rates_a, rates_b)
    return out


def reference_rate(goodput: dict, head: str, fallback: float) -> float:
    """Round robin's headline goodput (mean over seeds), else the first resolved policy's, else `fallback`."""
    for pol in ["round_robin", *goodput]:
        g = goodput.get(pol, {}).get(head, {})
        if g.get("mean") is not None:
            return float(g["mean"])
    return fallback


def compact(r: dict) -> dict:
    """The numbers of one run the tables show."""
    keys = (
        "attainment itl_p50 itl_p99 max_itl_p99 tpot_p50 tpot_p99 ttft_p99 retractions migrations gb_moved "
        "kv_spread_mean finished_frac"
    ).split()
    return {k: r[k] for k in keys}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(r1: dict | None) -> dict:
    """The issue's R1 targets, checked against what was measured (headline SLO, mean over seeds)."""
    if not r1:
        return {}
    head = r1["headline_slo"]
    g = {pol: v[head]["mean"] for pol, v in r1["goodput"].items()}
    at = r1["at_reference"]
    out: dict = {"slo": head}
    if "ares" in g and "round_robin" in g:
        rr, ar = at["round_robin"]["tpot_p99"], at["ares"]["tpot_p99"]
        red = 1 - ar / rr if rr else None
        out["p99_tpot_reduction_vs_rr"] = {"value": red, "target": 0.75, "met": bool(red is not None and red >= 0.75)}
        ratio = _ratio(g["ares"], g["round_robin"])
        out["goodput_ratio_vs_rr"] = {"value": ratio, "target": 2.63, "met": bool(ratio is not None and ratio >= 2.63)}
    for other in ("least_kv", "current_migrate", "ares_true_lengths", BOUND):
        if other in g and "ares" in g:
            out[f"ares_vs_{other}"] = {"ares": g["ares"], other: g[other], "ratio": _ratio(g["ares"], g[other])}
    return out


def _cell(g: dict, base: dict | None, bound: dict | None) -> str:
    s = g["label"]
    extra = []
    if g["status"] == "ok" and base and base.get("status") == "ok" and base["mean"]:
        extra.append(f"{g['mean'] / base['mean']:.2f}x rr")
    if g["status"] == "ok" and bound and bound.get("status") == "ok" and bound["mean"]:
        extra.append(f"{100 * g['mean'] / bound['mean']:.0f}% of bound")
    return s + (f" ({', '.join(extra)})" if extra else "")


def _ratio_text(r: dict | None) -> str:
    if not r or r["mean"] is None:
        return "n/a"
    return f"{r['mean']:.3f}" + (f" ± {r['ci95']:.3f}" if r["ci95"] is not None else "") + "x"


def _slo_text(v: dict) -> str:
    parts = [f"TPOT <= {v['tpot_s'] * 1e3:.1f} ms"] if v["tpot_s"] is not None else []
    parts += [f"every token gap <= {v['itl_s'] * 1e3:.1f} ms"] if v["itl_s"] is not None else []
    return ", ".join(parts) or "TTFT only"


def markdown(summary: dict) -> str:
    """Tables of the summary."""
    lines = [
        f"Goodput: highest rate with >= 90% of requests meeting the SLO, searched to "
        f"{100 * summary['search']['resolution']:g}% on {len(summary['search']['seeds'])} seed(s); mean ± 95% "
        f"interval (Student t). `{BOUND}`: one instance with the cluster's pooled KV and compute "
        f"(`ares.sim.bounds`), an upper reference for placement. ITL = every token gap (stalls included), "
        f"TPOT = per-request mean gap.",
        "",
    ]
    for wl, e in summary["workloads"].items():
        slos = e["slos"]
        lines += [
            f"### {wl} ({e['decode']} decode, {e['prefill']} prefill, {e['cost_model']}, "
            f"{e['duration_s']:.0f} s simulated)",
            f"Errors: {e['error_model']}.",
            "",
            "SLOs (all: TTFT <= base + factor x own prefill time): "
            + "; ".join(f"`{k}`: {_slo_text(v)}" for k, v in slos.items()),
            "",
            "| policy | " + " | ".join(f"goodput `{k}`" for k in slos) + " |",
            "|---|" + "---|" * len(slos),
        ]
        for pol, per in e["goodput"].items():
            cells = [_cell(per[k], e["goodput"].get("round_robin", {}).get(k), e["goodput"].get(BOUND, {}).get(k))
                     for k in slos]  # fmt: skip
            lines.append(f"| {pol} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"At {e['reference_rate']:.2f} req/s (round robin's `{e['headline_slo']}` goodput), seed "
            f"{summary['search']['seeds'][0]}:",
            "",
            "| policy | P50 ITL (ms) | P99 ITL (ms) | P99 max gap (s) | P99 TPOT (ms) | P99 TTFT (s) | "
            + " | ".join(f"attain `{k}`" for k in slos)
            + " | retractions | migrations | KV spread |",
            "|---|---|---|---|---|---|" + "---|" * len(slos) + "---|---|---|",
        ]
        for pol, v in e["at_reference"].items():
            lines.append(
                f"| {pol} | {v['itl_p50'] * 1e3:.1f} | {v['itl_p99'] * 1e3:.1f} | {v['max_itl_p99']:.2f} | "
                f"{v['tpot_p99'] * 1e3:.1f} | {v['ttft_p99']:.2f} | "
                + " | ".join(f"{v['attainment'][k]:.3f}" for k in slos)
                + f" | {v['retractions']} | {v['migrations']} | {v['kv_spread_mean']:.2f} |"
            )
        ratios = e.get("paired_ratios") or {}
        if ratios:
            lines += [
                "",
                "Paired ratios of goodput (per seed, same requests; mean ± 95% interval):",
                "",
                "| ratio | " + " | ".join(f"`{k}`" for k in slos) + " |",
                "|---|" + "---:|" * len(slos),
            ]
            for key, per in ratios.items():
                lines.append(f"| {key} | " + " | ".join(_ratio_text(per.get(k)) for k in slos) + " |")
        lines.append("")
    if summary.get("targets"):
        lines += ["### R1 targets", "", "```", json.dumps(summary["targets"], indent=1), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"done in {time.time() - t0:.0f} s")
    raise SystemExit(rc)
