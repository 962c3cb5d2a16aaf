"""Defragmenting moves in the simulator (`ares_hold_defrag`: `ares_hold` plus `policy.Defragmenter`) beside
`ares_hold` and `least_kv`, at few requests per instance, with the router's migration gate (`SimConfig.gate`) on,
and for the migrating policies also with it off (what the shared gate changes).

Cells: concurrency C (`--concurrency`, KV capacity / mean request footprint, as in `sim_map.py`), the workload's
native output lengths, SGLang's admission rule. The reference rate of a cell is the pooled bound's headline goodput
that `benchmark/sim_admission.py` found for the same workload, decode count and C (read from
`--reference`, recorded as an input; `--reference-rps C=rate,...` overrides). Every variant runs at `--loads` x
that rate on `--seeds` seeds (same seed = same requests). Per run: SLO attainment (headline SLO), SLO-meeting
requests per second, P99 TPOT and TTFT, retractions, migrations. Per load: paired ratios by seed (mean, 95%
interval) of good req/s and retractions: defrag / ares_hold (what defragmenting adds), defrag / least_kv,
ares_hold / least_kv, and gate live / off.

Writes <out>/sim_defrag.json and .md (default benchmark/results/sim_defrag), stamped with commit, command and
inputs. Runs are cached in <out>/cache.jsonl keyed by their settings and the simulator's and policy's source hash,
so a cut-off run resumes (`--cells` runs part of it). One process: `nice python benchmark/sim_defrag.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from provenance import record
from sim_map import cache_settings, cell_spec

from ares.sim.cli import DEFAULT_ACCURACY, add_sim_arguments, spec_from_args
from ares.sim.sweep import format_mean_ci as _f
from ares.sim.sweep import mean_ci95, paired_ratio, run_point

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmark" / "results" / "sim_defrag"
REFERENCE = ROOT / "benchmark" / "results" / "sim_admission" / "sim_admission.json"
KEEP = ("attainment", "rate", "requests", "finished_frac", "tpot_p99", "ttft_p99", "retractions", "migrations")
# (label, policy, gate): the variants every cell runs
VARIANTS = (
    ("least_kv", "least_kv", "live"),
    ("ares_hold", "ares_hold", "live"),
    ("ares_hold_defrag", "ares_hold_defrag", "live"),
    ("ares_hold gate off", "ares_hold", "off"),
    ("ares_hold_defrag gate off", "ares_hold_defrag", "off"),
)
RATIOS = (
    ("ares_hold_defrag", "ares_hold"),
    ("ares_hold_defrag", "least_kv"),
    ("ares_hold", "least_kv"),
    ("ares_hold", "ares_hold gate off"),
    ("ares_hold_defrag", "ares_hold_defrag gate off"),
)


def _references(args: argparse.Namespace, settings: dict) -> dict[float, float]:
    """Reference rate per C: from --reference-rps, else sim_admission's pooled-bound search for the same setup."""
    if args.reference_rps:
        return {float(c): float(r) for c, r in (kv.split("=") for kv in args.reference_rps.split(","))}
    doc = json.loads(Path(args.reference).read_text())
    theirs = doc["settings"]
    for k in ("workload", "decode", "cost_model", "reserve_tokens"):
        if theirs[k] != settings[k]:
            raise SystemExit(
                f"{args.reference} was run with {k}={theirs[k]!r}, not {settings[k]!r}: pass --reference-rps"
            )
    return {float(c["concurrency"]): float(c["reference_rps"]) for c in doc["cells"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sim_arguments(p)
    p.set_defaults(workload="r1", decode=32, duration=1800.0, seeds=5)
    p.add_argument("--concurrency", default="3,5", help="requests per full instance (KV / mean footprint)")
    p.add_argument("--loads", default="0.9,1.2", help="fixed loads, x the cell's reference rate")
    p.add_argument("--reference", default=str(REFERENCE), help="sim_admission.json with the pooled-bound rates")
    p.add_argument("--reference-rps", default="", help="C=rate,... instead of --reference")
    p.add_argument("--out", default=str(OUT), help="output folder")
    p.add_argument(
        "--cached-only", action="store_true", help="summarize the cached runs only (seeds every variant ran)"
    )
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    concs = [float(x) for x in args.concurrency.split(",")]
    loads = [float(x) for x in args.loads.split(",")]
    seeds = list(range(args.seed, args.seed + args.seeds))
    base, err_src = spec_from_args(args)
    head = next(iter(base.slos_or_default()))
    settings = cache_settings(base, args, err_src)
    refs = _references(args, settings)
    cache = out / "cache.jsonl"
    done: dict[str, dict] = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            done[json.dumps(r["key"], sort_keys=True)] = r["value"]
    inputs = [DEFAULT_ACCURACY] + ([] if args.reference_rps else [Path(args.reference)])
    doc: dict = {"provenance": record(ROOT, inputs), "settings": settings, "seeds": seeds, "loads": loads,
                 "cached_only": args.cached_only,
                 "headline_slo": head, "variants": [list(v) for v in VARIANTS], "cells": []}  # fmt: skip
    total = len(concs) * len(loads) * len(VARIANTS) * len(seeds)
    n = 0
    t_start = time.monotonic()
    for c in concs:
        spec = cell_spec(args, c, None)
        ref = refs[c]
        cell: dict = {"concurrency": c, "kv_capacity_tokens": spec.config.cost.kv_capacity_tokens,
                      "reference_rps": ref, "at_load": {}}  # fmt: skip
        for x in loads:
            rows: dict[str, list[dict]] = {label: [] for label, _, _ in VARIANTS}
            for s in seeds:  # every variant on a seed before the next seed: a cut-off run leaves paired seeds
                got = {}
                for label, pol, gate in VARIANTS:
                    n += 1
                    key = {**settings, "conc": c, "load": x, "policy": pol, "gate": gate, "seed": s}
                    k = json.dumps(key, sort_keys=True)
                    if k not in done:
                        if args.cached_only:
                            break
                        cfg = dataclasses.replace(spec.config, gate=None if gate == "off" else spec.config.gate)
                        t0 = time.monotonic()
                        r = run_point(dataclasses.replace(spec, config=cfg), pol, ref * x, seed=s)
                        done[k] = {**{f: r[f] for f in KEEP}, "wall_s": time.monotonic() - t0}
                        with cache.open("a") as f:
                            f.write(json.dumps({"key": key, "value": done[k]}) + "\n")
                    r = dict(done[k], seed=s)
                    r["good_rps"] = r["attainment"][head] * r["rate"]
                    got[label] = r
                    print(f"[{n}/{total} {time.monotonic() - t_start:.0f} s] C {c:g} load {x:g} {label:26s} seed {s}: "
                          f"attainment {r['attainment'][head]:.3f} good {r['good_rps']:.3f} req/s P99 TPOT "
                          f"{r['tpot_p99'] * 1e3:.1f} ms retractions {r['retractions']} migrations "
                          f"{r['migrations']} ({r['wall_s']:.0f} s)", flush=True)  # fmt: skip
                if len(got) == len(VARIANTS):  # only seeds every variant ran (paired)
                    for label, r in got.items():
                        rows[label].append(r)
            if not rows["least_kv"]:
                continue
            summary = {label: _mean(runs, head) for label, runs in rows.items()}
            ratios = {}
            for a, b in RATIOS:
                for k in ("good_rps", "retractions"):
                    ratios[f"{a} / {b}: {k}"] = paired_ratio([r[k] for r in rows[a]], [r[k] for r in rows[b]])
            block = {"seeds_run": [r["seed"] for r in rows["least_kv"]], "summary": summary, "ratios": ratios}
            cell["at_load"][f"{x:g}"] = {**block, "runs": rows}
        doc["cells"].append(cell)
    (out / "sim_defrag.json").write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    (out / "sim_defrag.md").write_text(md)
    print(md)
    print(f"wrote {out}")
    return 0


def _mean(runs: list[dict], head: str) -> dict:
    """Mean and 95% interval over seeds of the numbers the table shows."""
    out = {}
    for k in ("good_rps", "tpot_p99", "ttft_p99", "retractions", "migrations", "finished_frac"):
        m, h = mean_ci95([float(r[k]) for r in runs])
        out[k] = {"mean": m, "ci95": h}
    m, h = mean_ci95([float(r["attainment"][head]) for r in runs])
    out["attainment"] = {"mean": m, "ci95": h}
    return out


def markdown(doc: dict) -> str:
    """The results as a table per cell and load, then the paired ratios."""
    st, prov = doc["settings"], doc["provenance"]
    lines = [
        "# Defragmenting moves in the simulator",
        "",
        f"Commit `{prov['commit']}`{' (dirty tree)' if prov['dirty'] else ''}; command `{prov['command']}`.",
        f"Workload {st['workload']}, {st['decode']} decode instances, {st['duration_s']:g} s of arrivals per run, "
        f"seeds {doc['seeds']}, reserve {st['reserve_tokens']}, SGLang's admission rule, error model: "
        f"{st['error_model']}; headline SLO `{doc['headline_slo']}`. Loads are x the pooled bound's goodput found by "
        "`sim_admission.py` (reference). good req/s = attainment x measured request rate. Gate: the router's "
        "migration gate with its default limits (`SimConfig.gate`), or off (every proposal tried). Mean ± 95% "
        "interval over seeds; ratios paired by seed.",
        "",
    ]
    for cell in doc["cells"]:
        lines += [f"## C = {cell['concurrency']:g} (KV {cell['kv_capacity_tokens']} tokens per instance), "
                  f"reference {cell['reference_rps']:.3f} req/s", ""]  # fmt: skip
        for x, block in cell["at_load"].items():
            lines += [f"### load {x} x reference (seeds {block.get('seeds_run')})", "",
                      "| variant | attainment | good req/s | P99 TPOT ms | P99 TTFT s | retractions | migrations | "
                      "finished |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for label, r in block["summary"].items():
                lines.append(
                    f"| {label} | {_f(r['attainment'])} | {_f(r['good_rps'])} | {_f(r['tpot_p99'], 1, 1e3)} | "
                    f"{_f(r['ttft_p99'], 1)} | {_f(r['retractions'], 0)} | {_f(r['migrations'], 0)} | "
                    f"{_f(r['finished_frac'])} |"
                )
            lines.append("")
            for k, v in block["ratios"].items():
                lines.append(f"- {k} = {_f(v)} ({v['seeds']} seeds)")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
