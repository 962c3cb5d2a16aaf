"""How the goodput gain over static placement depends on the TPOT SLO (simulated PD cluster, R1 by default).

The headline run (`sim_goodput.py`) fixes TPOT SLO = 1.25 x the step time of a full-KV instance, which a
step can never exceed, so only stalls (retraction, migration) break TPOT there and goodput is set by TTFT.
This sweep asks the other question: if the service promised a tighter TPOT, what would each policy sustain?
Each (policy, rate) is simulated once on a fixed rate grid; every SLO is then evaluated on the same
per-request latencies. Goodput for one SLO = the highest grid rate below which every grid rate reaches >= 90%
attainment, interpolated linearly to the first failing rate; when even the lowest grid rate misses, the table
says "< lowest rate" (no goodput in the grid), never 0. `pooled_bound` (`ares.sim.bounds`) is the pooled-capacity
upper reference. (`sim_goodput.py` searches goodput to 1% over seeds; this is a one-seed grid.)

Writes benchmark/results/sim_slo_sensitivity.{json,md,png} (--quick: .ares/sim_quick/, 4 rates, 300 s).
Rerun: `python benchmark/sim_slo_sensitivity.py` (--points / --duration / --policy to cut it down).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from provenance import record  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ares.sim.cli import DEFAULT_ACCURACY, add_sim_arguments, spec_from_args  # noqa: E402
from ares.sim.metrics import SLO, slo_attainment  # noqa: E402
from ares.sim.sweep import capacity_rate, simulate_policy  # noqa: E402
from ares.workloads import load_workload  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmark" / "results"
QUICK_OUT = ROOT / ".ares" / "sim_quick"


def goodput_on_grid(rates: np.ndarray, attainment: np.ndarray, target: float = 0.9) -> float | None:
    """Highest rate with every grid rate up to it at >= target, interpolated to the first failing one; None when
    even the lowest rate misses (goodput below the grid: say so, do not print 0)."""
    fail = np.flatnonzero(attainment < target)
    if fail.size == 0:
        return float(rates[-1])
    k = int(fail[0])
    if k == 0:
        return None
    a0, a1 = attainment[k - 1], attainment[k]
    w = (a0 - target) / (a0 - a1) if a0 > a1 else 0.0
    return float(rates[k - 1] + w * (rates[k] - rates[k - 1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_sim_arguments(p)
    p.add_argument("--factors", default="0.6,0.7,0.8,0.9,1.0,1.25", help="TPOT SLO factors (x full-KV step)")
    p.add_argument("--points", type=int, default=14, help="rates on the grid")
    p.add_argument("--low", type=float, default=0.15, help="lowest rate, x the KV-capacity rate estimate")
    p.add_argument("--high", type=float, default=1.1, help="highest rate, x the KV-capacity rate estimate")
    p.add_argument("--out", default=None, help="output folder (default: benchmark/results; --quick: .ares/sim_quick)")
    args = p.parse_args()
    if args.quick:
        args.points = min(args.points, 4)
    out = Path(args.out) if args.out else (QUICK_OUT if args.quick else OUT)
    spec, err_src = spec_from_args(args)
    policies = [x for x in args.policy.split(",") if x]
    factors = [float(x) for x in args.factors.split(",")]
    cost = spec.config.cost
    rates = capacity_rate(spec) * np.geomspace(args.low, args.high, args.points)
    slos = {f: SLO.for_cost(cost, tpot_factor=f) for f in factors}
    attain = {pol: np.zeros((len(factors), len(rates))) for pol in policies}
    bar = tqdm(total=len(policies) * len(rates), desc="simulate")
    for j, rate in enumerate(rates):
        work = load_workload(spec.workload, float(rate), spec.duration_s, seed=spec.seed)
        cfg = dataclasses.replace(spec.config, seed=spec.seed, warmup_frac=spec.warmup_frac)
        for pol in policies:
            res = simulate_policy(work, cfg, pol)
            for i, f in enumerate(factors):
                attain[pol][i, j] = slo_attainment(res, slos[f], cost, spec.warmup_frac)
            bar.update(1)
    bar.close()
    goodput = {pol: [goodput_on_grid(rates, attain[pol][i]) for i in range(len(factors))] for pol in policies}
    doc = {
        "provenance": record(ROOT, [Path(args.accuracy_json) if args.accuracy_json else DEFAULT_ACCURACY]),
        "workload": spec.workload,
        "decode": spec.config.n_decode,
        "duration_s": spec.duration_s,
        "cost_model": cost.name,
        "error_model": err_src,
        "full_kv_step_ms": SLO.for_cost(cost, tpot_factor=1.0).tpot_s * 1e3,
        "tpot_factors": factors,
        "tpot_slo_ms": [slos[f].tpot_s * 1e3 for f in factors],
        "ttft_slo": {"base_s": slos[factors[0]].ttft_base_s, "prefill_factor": slos[factors[0]].ttft_prefill_factor},
        "rates": rates.tolist(),
        "attainment": {pol: a.tolist() for pol, a in attain.items()},
        "goodput_rps": goodput,
    }
    if "round_robin" in goodput:
        rr = goodput["round_robin"]
        doc["goodput_ratio_vs_round_robin"] = {
            pol: [g / r if g is not None and r else None for g, r in zip(v, rr, strict=True)]
            for pol, v in goodput.items()
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim_slo_sensitivity.json").write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    (out / "sim_slo_sensitivity.md").write_text(md)
    plot(doc, out / "sim_slo_sensitivity.png")
    print(md)
    print(f"wrote {out}")
    return 0


def markdown(doc: dict) -> str:
    """Goodput per policy and TPOT SLO, with the ratio to round robin."""
    head = " | ".join(f"{f:g}x ({ms:.1f} ms)" for f, ms in zip(doc["tpot_factors"], doc["tpot_slo_ms"], strict=True))
    lines = [
        f"### Goodput (req/s) vs TPOT SLO: {doc['workload']}, {doc['decode']} decode, {doc['cost_model']}, "
        f"{doc['duration_s']:.0f} s simulated",
        f"TPOT SLO = factor x full-KV step time ({doc['full_kv_step_ms']:.1f} ms); TTFT SLO unchanged. "
        f"Errors: {doc['error_model']}. Ratio to round_robin in brackets; `< X`: even the lowest grid rate "
        f"({doc['rates'][0]:.3g} req/s) missed the 90% target.",
        "",
        f"| policy | {head} |",
        "|---|" + "---|" * len(doc["tpot_factors"]),
    ]
    ratios = doc.get("goodput_ratio_vs_round_robin", {})
    for pol, gs in doc["goodput_rps"].items():
        cells = []
        for i, g in enumerate(gs):
            r = ratios.get(pol, [None] * len(gs))[i]
            if g is None:
                cells.append(f"< {doc['rates'][0]:.3g}")
            else:
                cells.append(f"{g:.2f}" + (f" ({r:.2f}x)" if r is not None else ""))
        lines.append(f"| {pol} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """Goodput per policy against the TPOT SLO."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for pol, gs in doc["goodput_rps"].items():  # below-grid points are left out (NaN), not drawn at 0
        ax.plot(doc["tpot_slo_ms"], [np.nan if g is None else g for g in gs], marker="o", label=pol)
    ax.axvline(doc["full_kv_step_ms"], color="grey", ls="--", lw=1, label="full-KV step time")
    ax.set_xlabel("TPOT SLO (ms)")
    ax.set_ylabel("goodput (req/s, >= 90% attainment)")
    ax.set_title(f"{doc['workload']}: {doc['decode']} decode, {doc['cost_model']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
