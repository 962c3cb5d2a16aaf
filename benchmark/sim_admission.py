"""Predictive decode admission in the simulator: least_kv and ares_hold with SGLang's admission rule and with
`--ares-admission predictive` (`SimConfig.admission`), beside the pooled bound, at few requests per instance.

Cells: concurrency C (`--concurrency`, KV capacity / mean request footprint, as in `sim_map.py`), the workload's
native output lengths. In each cell the reference rate is the pooled bound's headline goodput (SGLang's rule, seed
0, searched to `--resolution`); then every policy x admission rule (`--admissions`; the pooled bound too) runs at
`--loads` x that rate on `--seeds` seeds (same seed = same requests). Per run: SLO attainment (every SLO pair), the
rate of SLO-meeting requests (headline SLO), P99 TPOT, retractions, finished fraction. Per (policy, load): the paired
ratio predictive / sglang of SLO-meeting requests per second and of retractions, mean and 95% interval over seeds.
Goodput searches per policy are not run (too slow for a one-core budget): the fixed loads are the comparison.

Writes <out>/sim_admission.json and .md (default benchmark/results/sim_admission), stamped with commit, command and
inputs. Runs are cached in <out>/cache.jsonl keyed by settings and a hash of the simulator's and policy's source,
so a cut-off run resumes. One process, no workers: `nice python benchmark/sim_admission.py`.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

from provenance import record
from sim_map import cache_settings, cell_spec, native_hour

from ares.sim.bounds import POOLED_BOUND, fluid_bound
from ares.sim.cli import DEFAULT_ACCURACY, add_sim_arguments, spec_from_args
from ares.sim.sweep import capacity_rate, find_goodput, mean_ci95, paired_ratio, run_point
from ares.sim.sweep import format_mean_ci as _f

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmark" / "results" / "sim_admission"
KEEP = ("attainment", "rate", "requests", "finished_frac", "tpot_p99", "ttft_p99", "itl_p99", "retractions",
        "retracted_requests", "migrations", "kv_mean")  # fmt: skip
RULES = ("sglang", "predictive")  # the default --admissions


def _cached(cache: Path, done: dict, key: dict, fn):
    k = json.dumps(key, sort_keys=True)
    if k not in done:
        t0 = time.monotonic()
        done[k] = fn()
        done[k]["wall_s"] = time.monotonic() - t0
        with cache.open("a") as f:
            f.write(json.dumps({"key": key, "value": done[k]}) + "\n")
    return done[k]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sim_arguments(p)
    p.set_defaults(workload="r1", decode=32, duration=600.0, seeds=2, resolution=0.05, policy="least_kv,ares_hold")
    p.add_argument("--concurrency", default="5,3", help="requests per full instance (KV / mean footprint)")
    p.add_argument("--loads", default="0.9,1.2", help="fixed loads, x the cell's pooled-bound goodput")
    p.add_argument("--admissions", default=",".join(RULES), help="decode admission rules to compare (first: base)")
    p.add_argument("--out", default=str(OUT), help="output folder")
    args = p.parse_args()
    rules = [x for x in args.admissions.split(",") if x]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    concs = [float(x) for x in args.concurrency.split(",")]
    loads = [float(x) for x in args.loads.split(",")]
    policies = [x for x in args.policy.split(",") if x and x != POOLED_BOUND]
    seeds = list(range(args.seed, args.seed + args.seeds))
    base, err_src = spec_from_args(args)
    head = next(iter(base.slos_or_default()))
    settings = cache_settings(base, args, err_src)
    cache = out / "cache.jsonl"
    done: dict[str, dict] = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            done[json.dumps(r["key"], sort_keys=True)] = r["value"]
    doc: dict = {
        "provenance": record(ROOT, [DEFAULT_ACCURACY]),
        "settings": settings,
        "policies": policies,
        "seeds": seeds,
        "loads": loads,
        "admissions": rules,
        "headline_slo": head,
        "cells": [],
    }
    for c in concs:
        spec = cell_spec(args, c, None)
        specs = {rule: _with_rule(spec, rule) for rule in {"sglang", *rules}}

        def search(spec=specs["sglang"]) -> dict:
            found, runs = find_goodput(spec, POOLED_BOUND, 0.6 * capacity_rate(spec), seed=seeds[0],
                                       resolution=args.resolution)  # fmt: skip
            return {"goodput": {s: g.to_dict() for s, g in found.items()}, "runs": len(runs)}

        ref = _cached(cache, done, {**settings, "kind": "bound_search", "conc": c, "seed": seeds[0]}, search)
        ref_rate = ref["goodput"][head]["rate"] or ref["goodput"][head]["lo"]
        cell: dict = {"concurrency": c, "kv_capacity_tokens": spec.config.cost.kv_capacity_tokens,
                      "bound_goodput": ref["goodput"], "reference_rps": ref_rate, "at_load": {}}  # fmt: skip
        # the provable bound (`bounds.fluid_bound`) on the hour of the workload the cell's runs are drawn like
        hour = native_hour(spec.workload, spec.seed)
        cell["fluid_bound"] = fluid_bound(hour, spec.config, attainment=0.9)
        cell["fluid_bound_all"] = fluid_bound(hour, spec.config, attainment=1.0)  # serving every request
        for x in loads:
            rows: dict[str, dict[str, list[dict]]] = {}
            for pol in [*policies, POOLED_BOUND]:
                for rule in rules:
                    for s in seeds:
                        key = {**settings, "kind": "load", "conc": c, "load": x, "policy": pol, "admission": rule,
                               "seed": s}  # fmt: skip

                        r = _cached(cache, done, key, functools.partial(_point, specs[rule], pol, ref_rate * x, s))
                        r["good_rps"] = r["attainment"][head] * r["rate"]
                        rows.setdefault(pol, {}).setdefault(rule, []).append(r)
                        print(f"C {c:g} load {x:g} {pol:14s} {rule:10s} seed {s}: attainment "
                              f"{r['attainment'][head]:.3f} good {r['good_rps']:.3f} req/s P99 TPOT "
                              f"{r['tpot_p99'] * 1e3:.1f} ms retractions {r['retractions']} "
                              f"({r['wall_s']:.0f} s)", flush=True)  # fmt: skip
            summary = {}
            for pol, by_rule in rows.items():
                summary[pol] = {rule: _mean(runs) for rule, runs in by_rule.items()}
                for rule in rules[1:]:
                    for k in ("good_rps", "retractions"):
                        summary[pol][f"{rule}/{rules[0]} {k}"] = paired_ratio(
                            [r[k] for r in by_rule[rule]], [r[k] for r in by_rule[rules[0]]]
                        )
            for rule in rules:
                for pol in policies:
                    if pol != "least_kv" and "least_kv" in rows:
                        summary[pol][f"{pol}/least_kv good_rps ({rule})"] = paired_ratio(
                            [r["good_rps"] for r in rows[pol][rule]], [r["good_rps"] for r in rows["least_kv"][rule]]
                        )
            cell["at_load"][f"{x:g}"] = {"summary": summary, "runs": rows}
        doc["cells"].append(cell)
    (out / "sim_admission.json").write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    (out / "sim_admission.md").write_text(md)
    print(md)
    print(f"wrote {out}")
    return 0


def _point(spec, policy: str, rate: float, seed: int) -> dict:
    """One fixed-load run, the numbers kept."""
    r = run_point(spec, policy, rate, seed=seed)
    return {k: r[k] for k in KEEP}


def _with_rule(spec, rule: str):
    import dataclasses

    return dataclasses.replace(spec, config=dataclasses.replace(spec.config, admission=rule))


def _mean(runs: list[dict]) -> dict:
    """Mean and 95% interval over seeds of the numbers the table shows."""
    out = {}
    for k in ("good_rps", "tpot_p99", "ttft_p99", "retractions", "finished_frac"):
        m, h = mean_ci95([float(r[k]) for r in runs])
        out[k] = {"mean": m, "ci95": h}
    m, h = mean_ci95([float(next(iter(r["attainment"].values()))) for r in runs])
    out["attainment"] = {"mean": m, "ci95": h}
    return out


def markdown(doc: dict) -> str:
    """The results as a table per cell and load."""
    st, prov = doc["settings"], doc["provenance"]
    lines = [
        "# Predictive admission in the simulator",
        "",
        f"Commit `{prov['commit']}`{' (dirty tree)' if prov['dirty'] else ''}; command `{prov['command']}`.",
        f"Workload {st['workload']}, {st['decode']} decode instances, {st['duration_s']:g} s of arrivals per run, "
        f"seeds {doc['seeds']}, reserve {st['reserve_tokens']}, error model: {st['error_model']}; headline SLO "
        f"`{doc['headline_slo']}`. Loads are x the pooled bound's goodput (SGLang's rule, seed {doc['seeds'][0]}, "
        f"searched to {st['resolution']:.0%}). good req/s = attainment x measured request rate. Mean ± 95% interval "
        "over seeds; ratios paired by seed.",
        "",
    ]
    for cell in doc["cells"]:
        fb = cell.get("fluid_bound")
        lines += [f"## C = {cell['concurrency']:g} (KV {cell['kv_capacity_tokens']} tokens per instance), "
                  f"reference {cell['reference_rps']:.3f} req/s", "",
                  "Bounds on goodput at 90% attainment, req/s: pooled (simulated, SGLang's rule, seed "
                  f"{doc['seeds'][0]}): " + ", ".join(f"{s} {g['label']}" for s, g in cell["bound_goodput"].items())
                  + ("" if fb is None else f"; fluid (provable, per-instance pools, `bounds.fluid_bound`): "
                     f"{fb['rate']:.3f} at 90% attainment (binding: {fb['binding']}), "
                     f"{cell['fluid_bound_all']['rate']:.3f} serving every request"), ""]  # fmt: skip
        for x, block in cell["at_load"].items():
            lines += [f"### load {x} x reference", "",
                      "| policy | admission | attainment | good req/s | P99 TPOT ms | P99 TTFT s | retractions | "
                      "finished |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for pol, s in block["summary"].items():
                for rule in doc.get("admissions", RULES):
                    r = s[rule]
                    lines.append(
                        f"| {pol} | {rule} | {_f(r['attainment'])} | {_f(r['good_rps'])} | "
                        f"{_f(r['tpot_p99'], 1, 1e3)} | {_f(r.get('ttft_p99'), 1)} | {_f(r['retractions'], 0)} | "
                        f"{_f(r['finished_frac'])} |"
                    )
            lines.append("")
            for pol, s in block["summary"].items():
                for k, v in s.items():
                    if "/" in k:
                        lines.append(f"- {pol}: {k} = {_f(v)} ({v['seeds']} seeds)")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
