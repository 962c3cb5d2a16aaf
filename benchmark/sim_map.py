"""The map: where prediction and migration pay, over per-instance concurrency and output-length dispersion.

Cells = concurrency C (KV capacity / mean request footprint, `ares.sim.regimes.with_concurrency`: smaller KV per
token, so a full instance's step time and the SLOs stay put) x output-length CV (`ares.sim.regimes.OutputSpread`:
the workload's own lengths spread or narrowed by a power law fitted on an hour of it, mean and order kept; `native`
= as sampled). In every cell, for every policy and the pooled bound: goodput for every declared SLO pair
(`ares.sim.metrics.SLO_PAIRS`), searched to `--resolution` on each of `--seeds` seeds, mean with a 95% Student-t
interval; the ratios ares/least_kv, ares/round_robin, ares/current_migrate (what prediction adds to current-load
migration), ares_hold/least_kv and ares_hold/current_migrate_hold (late binding with and without prediction)
per seed (same seed = same requests), mean and interval; and at loads `--loads` x the cell's
pooled-bound headline goodput (seed 0; without the bound, the best policy's): P99 ITL, P99 TPOT and attainment of
every policy. The reserve (`--reserve-tokens`) is one setting per run: rerun with another value and `--out` for
that slice of the map.

Writes sim_map.json, sim_map.md and a heatmap per ratio (sim_map_<a>_vs_<b>.png) to
--out (default benchmark/results/sim_map; --quick: .ares/sim_quick/map). Searches are cached in <out>/cache.jsonl
keyed by their settings and a hash of the simulator's and policy's source, so a cut-off run resumes (--fresh: start
over). `--jobs 2` runs two searches at a time.
Full run (R1, 4 decode, 3 x 3 cells, 8 policies incl. the bound, 3 seeds, 2%): `python benchmark/sim_map.py --jobs 2`.
Smoke (< 2 min): `python benchmark/sim_map.py --quick`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from provenance import record  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ares.sim.bounds import POOLED_BOUND, fluid_bound  # noqa: E402
from ares.sim.cli import DEFAULT_ACCURACY, add_sim_arguments, spec_from_args  # noqa: E402
from ares.sim.regimes import OutputSpread, cv, mean_footprint, with_concurrency  # noqa: E402
from ares.sim.slo_bound import slo_fluid_bound  # noqa: E402
from ares.sim.sweep import (  # noqa: E402
    Goodput,
    RunSpec,
    aggregate_goodput,
    capacity_rate,
    find_goodput,
    mean_ci95,
    paired_ratio,
    run_point,
)
from ares.sim.sweep import format_mean_ci as fmt_ci  # noqa: E402
from ares.workloads import Workload, load_workload  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmark" / "results" / "sim_map"
QUICK_OUT = ROOT / ".ares" / "sim_quick" / "map"
MAP_POLICIES = (
    "round_robin,least_kv,current_migrate,ares,ares_true_lengths,current_migrate_hold,ares_hold," + POOLED_BOUND
)
# A policy name may carry the decode servers' admission rule: "ares_hold+predictive" = ares_hold placing onto
# servers run with `--ares-admission predictive` (`SimConfig.admission`); no suffix = SGLang's rule.
ADMISSION_SEP = "+"
# ares over current-load placement, over static placement, and over current-load migration (what prediction adds);
# late binding (router-side hold) with prediction over current-load placement, and over late binding without it;
# what perfect length knowledge would add (a policy's *_true_lengths twin over it); predictive admission. A ratio is
# reported where both of its policies ran.
RATIOS = (
    ("ares", "least_kv"),
    ("ares", "round_robin"),
    ("ares", "current_migrate"),
    ("ares_true_lengths", "ares"),
    ("ares_hold", "least_kv"),
    ("ares_hold", "current_migrate_hold"),
    ("ares_hold_true_lengths", "ares_hold"),
    ("ares_hold+predictive", "least_kv"),
    ("ares_hold+predictive", "ares_hold"),
    ("ares_hold+predictive", "current_migrate_hold"),
)


def code_hash() -> str:
    """Hash of the simulator's and the policy's source: cached searches are reused only for the same code."""
    h = hashlib.sha256()
    for d in (
        ROOT / "python" / "ares" / "sim",
        ROOT / "python" / "ares" / "workloads",
        ROOT / "ares_router" / "policy",
    ):
        for f in sorted(d.rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def native_hour(workload: str, seed: int) -> Workload:
    """An hour of `workload` at its own rate: the sample footprints and spreads are fitted on (one load per process)."""
    return load_workload(workload, None, 3600.0, seed=seed)


def cache_settings(base: RunSpec, args: argparse.Namespace, err_src: str) -> dict:
    """What a cached result depends on besides its cell: the run's spec and the simulator's source (`code_hash`)."""
    return {
        "workload": base.workload, "decode": base.config.n_decode, "duration_s": base.duration_s,
        "cost_model": base.config.cost.name, "reserve_tokens": base.config.reserve_tokens,
        "resolution": args.resolution, "error_model": err_src, "code": code_hash(),
    }  # fmt: skip


def cell_spec(
    args: argparse.Namespace, conc: float, out_cv: float | None, duration_s: float | None = None, policy: str = ""
) -> RunSpec:
    """The RunSpec of one cell: the flags' spec, its cost at concurrency `conc`, outputs spread to `out_cv`, and
    `duration_s` of arrivals (default: the flags'); the admission rule named in `policy` (`ADMISSION_SEP`), if any."""
    spec, _ = spec_from_args(args)
    native = native_hour(spec.workload, spec.seed)
    cost = with_concurrency(spec.config.cost, mean_footprint(native), conc)
    spread = None if out_cv is None else OutputSpread.fit(native, out_cv)
    config = dataclasses.replace(spec.config, cost=cost)
    if ADMISSION_SEP in policy:
        config = dataclasses.replace(config, admission=policy.split(ADMISSION_SEP, 1)[1])
    return dataclasses.replace(spec, config=config, output_spread=spread, duration_s=duration_s or spec.duration_s)


def base_policy(policy: str) -> str:
    """The placement policy of a map column ("ares_hold+predictive" -> "ares_hold")."""
    return policy.split(ADMISSION_SEP, 1)[0]


def cell_duration(args: argparse.Namespace, cap_rate: float) -> float:
    """Seconds of arrivals for a cell: `--duration`, or with `--min-requests N` the shortest multiple of 60 s (at
    least 600) in which N requests arrive at half the cell's capacity rate (goodput at few requests per instance is
    about half of it), capped at `--duration`: small-C cells need long runs, large-C cells get them cheaply."""
    if not args.min_requests:
        return args.duration
    need = args.min_requests / (0.5 * cap_rate)
    return float(min(args.duration, max(600.0, 60.0 * np.ceil(need / 60.0))))


def _search(task: dict) -> dict:
    """One goodput search (runs in a worker process)."""
    args = argparse.Namespace(**task["args"])
    spec = cell_spec(args, task["conc"], task["cv"], task["duration_s"], task["policy"])
    found, runs = find_goodput(
        spec, base_policy(task["policy"]), task["start"], seed=task["seed"], resolution=args.resolution
    )
    return {"goodput": {s: g.to_dict() for s, g in found.items()}, "runs": len(runs)}


LOAD_KEEP = ("attainment", "rate", "requests", "finished_frac", "itl_p50", "itl_p99", "tpot_p99", "ttft_p99",
             "retractions", "migrations")  # fmt: skip


def _load_point(task: dict) -> dict:
    """One run at a fixed load (runs in a worker process)."""
    args = argparse.Namespace(**task["args"])
    spec = cell_spec(args, task["conc"], task["cv"], task["duration_s"], task["policy"])
    r = run_point(spec, base_policy(task["policy"]), task["rate"], seed=task.get("seed", 0))
    return {k: r[k] for k in LOAD_KEEP}


def _run(fn, tasks: list[dict], cache: Path, done: dict, jobs: int, desc: str) -> None:
    """Run the tasks not in `done` (keyed by `_key`), appending each result to `cache` as it comes."""
    todo = [t for t in tasks if _key(t) not in done]
    if not todo:
        return
    with ProcessPoolExecutor(jobs) as pool, cache.open("a") as f:
        futures = {pool.submit(fn, t): t for t in todo}
        for fut in tqdm(as_completed(futures), total=len(futures), desc=desc):
            t = futures[fut]
            done[_key(t)] = fut.result()
            f.write(json.dumps({"key": t["key"], "value": done[_key(t)]}) + "\n")
            f.flush()


def _key(task: dict) -> str:
    return json.dumps(task["key"], sort_keys=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sim_arguments(p)
    p.set_defaults(decode=4, duration=900.0, resolution=0.02, policy=MAP_POLICIES)
    p.add_argument("--concurrency", default="5,40,300", help="requests per full instance (KV / mean footprint)")
    p.add_argument("--cv", default="0.5,native,2.5", help="output-length CVs (native: the workload's own)")
    p.add_argument("--loads", default="0.6,0.9,1.2", help="fixed loads, x the cell's pooled-bound goodput")
    p.add_argument("--jobs", type=int, default=1, help="searches run at once (processes)")
    p.add_argument("--fresh", action="store_true", help="ignore the cache of an earlier run")
    p.add_argument(
        "--search",
        default=None,
        help="policies whose goodput is searched (default: all; the pooled "
        "bound always is, it sets the loads); the others run at the fixed loads only",
    )
    p.add_argument(
        "--min-requests",
        type=int,
        default=0,
        help="size each cell's runs for about this many requests (`cell_duration`; 0: --duration everywhere)",
    )
    p.add_argument("--out", default=None, help="output folder (default benchmark/results/sim_map)")
    args = p.parse_args()
    if args.quick:
        args.concurrency, args.cv, args.seeds, args.resolution = "5,300", "native,2.5", 1, 0.1
        args.policy, args.loads = "round_robin,least_kv,ares," + POOLED_BOUND, "0.9"
    out = Path(args.out) if args.out else (QUICK_OUT if args.quick else OUT)
    out.mkdir(parents=True, exist_ok=True)
    concs = [float(x) for x in args.concurrency.split(",")]
    cvs = [None if x == "native" else float(x) for x in args.cv.split(",")]
    policies = [x for x in args.policy.split(",") if x]
    searched = policies if args.search is None else [x for x in policies if x in args.search.split(",")]
    if POOLED_BOUND in policies and POOLED_BOUND not in searched:
        searched.append(POOLED_BOUND)
    seeds = [args.seed] if args.quick else list(range(args.seed, args.seed + args.seeds))
    base, err_src = spec_from_args(args)
    settings = cache_settings(base, args, err_src)
    cache = out / "cache.jsonl"
    if args.fresh and cache.exists():
        cache.unlink()
    done: dict[str, dict] = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            done[json.dumps(r["key"], sort_keys=True)] = r["value"]
    argd = vars(args)
    cells = [(c, v) for c in concs for v in cvs]
    caps = {cell: capacity_rate(cell_spec(args, *cell)) for cell in cells}
    durations = {cell: cell_duration(args, caps[cell]) for cell in cells}
    tasks = [
        {"args": argd, "conc": c, "cv": v, "policy": pol, "seed": s, "start": 0.6 * caps[(c, v)],
         "duration_s": durations[(c, v)],
         "key": {**settings, "duration_s": durations[(c, v)], "kind": "search", "conc": c, "cv": v, "policy": pol,
                 "seed": s}}
        for (c, v) in cells for pol in searched for s in seeds
    ]  # fmt: skip
    _run(_search, tasks, cache, done, args.jobs, "goodput searches")
    doc: dict = {
        "provenance": record(ROOT, [Path(args.accuracy_json) if args.accuracy_json else DEFAULT_ACCURACY]),
        "settings": settings,
        "policies": policies,
        "seeds": seeds,
        "loads": [float(x) for x in args.loads.split(",")],
        "searched": searched,
        "cells": [],
    }
    slos = list(base.slos_or_default())
    load_tasks = []
    for c, v in cells:
        per = {
            pol: [done[_key(t)] for t in tasks if t["policy"] == pol and (t["conc"], t["cv"]) == (c, v)]
            for pol in searched
        }  # fmt: skip
        spec = cell_spec(args, c, v, durations[(c, v)])
        hour = native_hour(spec.workload, spec.seed)  # the sample the spread is fitted on
        olen = hour.output_tokens if spec.output_spread is None else spec.output_spread.lengths(hour.output_tokens)
        cell: dict = {"concurrency": c, "cv": v, "cv_measured": cv(olen), "mean_output": float(olen.mean())}
        cell.update(goodput={}, ratios={}, duration_s=durations[(c, v)], capacity_rate_rps=caps[(c, v)])
        cell["kv_capacity_tokens"] = spec.config.cost.kv_capacity_tokens
        # the provable bound on the hour the cell's runs are drawn like (its output lengths spread as theirs)
        work = hour if spec.output_spread is None else spec.output_spread.apply(hour)
        cell["fluid_bound"] = fluid_bound(work, spec.config, attainment=0.9)
        # and its SLO-aware tightening per SLO (`slo_fluid_bound`; on 20,000 of the hour's requests: within 0.5%)
        cell["slo_fluid_bound"] = {
            name: slo_fluid_bound(work, spec.config, slo, attainment=0.9, sample=20000)
            for name, slo in spec.slos_or_default().items()
        }
        for pol, rs in per.items():
            cell["goodput"][pol] = {
                s: aggregate_goodput([Goodput(**{k: r["goodput"][s][k] for k in ("lo", "hi", "status")}) for r in rs])
                for s in slos
            }
        for a, b in RATIOS:
            if a in per and b in per:
                cell["ratios"][f"{a}/{b}"] = {}
                for s in slos:
                    rates_a, rates_b = ([r["goodput"][s]["rate"] for r in per[p]] for p in (a, b))
                    cell["ratios"][f"{a}/{b}"][s] = paired_ratio(rates_a, rates_b)
        heads = {pol: g[slos[0]]["mean"] for pol, g in cell["goodput"].items() if g[slos[0]]["mean"]}
        ref = heads.get(POOLED_BOUND, max(heads.values(), default=None))  # the best policy's when no bound is run
        cell["load_reference_rps"] = ref
        if ref:
            for x in doc["loads"]:
                for pol in policies:
                    for s in seeds:
                        load_tasks.append({
                            "args": argd, "conc": c, "cv": v, "policy": pol, "rate": ref * x, "seed": s,
                            "duration_s": durations[(c, v)],
                            "key": {**settings, "duration_s": durations[(c, v)], "kind": "load", "conc": c,
                                    "cv": v, "policy": pol, "load": x, "seed": s, "rate": ref * x},
                        })  # fmt: skip
        doc["cells"].append(cell)
    _run(_load_point, load_tasks, cache, done, args.jobs, "fixed loads")
    by_cell = {(cell["concurrency"], cell["cv"]): cell for cell in doc["cells"]}
    head = slos[0]
    for t in load_tasks:
        at_load = by_cell[(t["conc"], t["cv"])].setdefault("at_load", {})
        r = dict(done[_key(t)], good_rps=done[_key(t)]["attainment"][head] * done[_key(t)]["rate"])
        at_load.setdefault(f"{t['key']['load']:g}", {}).setdefault(t["policy"], []).append(r)
    for cell in doc["cells"]:
        cell["load_summary"] = {x: load_summary(runs) for x, runs in cell.get("at_load", {}).items()}
    doc["slos"] = {k: v.to_dict() for k, v in base.slos_or_default().items()}
    (out / "sim_map.json").write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    (out / "sim_map.md").write_text(md)
    for a, b in RATIOS:
        heatmap(doc, f"{a}/{b}", out / f"sim_map_{a}_vs_{b}.png")
    print(md)
    print(f"wrote {out}")
    return 0


def load_summary(runs: dict[str, list[dict]]) -> dict:
    """Per policy at one fixed load (runs by seed, in seed order): mean and 95% interval over seeds of the numbers
    the table shows; per ratio of `RATIOS` (both policies run): paired by seed, SLO-meeting requests per second and
    retractions; the fewest requests any run had."""
    out: dict = {"policies": {}, "ratios": {}}
    for pol, rs in runs.items():
        row = {}
        for k in ("good_rps", "tpot_p99", "retractions", "finished_frac"):
            m, h = mean_ci95([float(r[k]) for r in rs])
            row[k] = {"mean": m, "ci95": h}
        m, h = mean_ci95([float(next(iter(r["attainment"].values()))) for r in rs])
        row["attainment"] = {"mean": m, "ci95": h}
        row["min_requests"] = min(int(r["requests"]) for r in rs)
        out["policies"][pol] = row
    for a, b in RATIOS:
        if a in runs and b in runs:
            ta, tb = (sum(int(r["retractions"]) for r in runs[p]) for p in (a, b))
            out["ratios"][f"{a}/{b}"] = {
                "good_rps": paired_ratio([r["good_rps"] for r in runs[a]], [r["good_rps"] for r in runs[b]]),
                # a ratio per seed is undefined where a seed has none: the totals over seeds instead
                "retractions": {"a": ta, "b": tb, "ratio": ta / tb if tb else None},
            }
    return out


def _cv_label(v: float | None) -> str:
    return "native" if v is None else f"{v:g}"


def _fmt(mean: float | None, half: float | None, digits: int = 2) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if half is not None else "")


def markdown(doc: dict) -> str:
    """Per SLO: goodput of every policy per cell, and the ARES ratios with intervals; then the fixed-load tails."""
    st, prov = doc["settings"], doc["provenance"]
    lines = [
        f"# The map: {st['workload']}, {st['decode']} decode, {st['cost_model']}, {st['duration_s']:.0f} s simulated, "
        f"reserve {st['reserve_tokens']}, seeds {doc['seeds']}, search resolution {st['resolution']:.0%}",
        "",
        f"Commit {prov['commit']}{' (dirty)' if prov['dirty'] else ''}; command `{prov['command']}`; "
        f"errors: {st['error_model']}. Concurrency C = KV capacity / mean request footprint; CV = output-length"
        " coefficient of variation (in brackets: measured on the hour of requests the spread is fitted on). Goodput in"
        " req/s (mean ± 95% interval over seeds; `below X`: no rate searched met the SLO).",
    ]
    searched = doc.get("searched", doc["policies"])
    lines += [
        "",
        "Per cell: seconds of arrivals per run, and the provable bounds on goodput at 90% attainment, valid for any"
        " policy (`bounds.fluid_bound`: per-instance pools, resources only; `slo_bound.slo_fluid_bound`: with the"
        " SLOs, one selection of the SLO-meeting requests; on 20,000 requests of the hour). Both are far above the"
        " simulated pooled bound, which is no bound at all: a least_kv run that defers its heaviest 8% of requests"
        " meets 90% attainment above it (`benchmark/sim_bound_witness.py`). At 90% attainment a schedule may give up"
        " the heaviest tenth of requests, which carries most of the work:",
        "",
        "| C | CV | seconds | capacity rate req/s | fluid bound req/s (binding) | SLO-aware bound per SLO req/s |",
        "|---|---|---:|---:|---|---|",
    ]
    for cell in doc["cells"]:
        fb = cell.get("fluid_bound")
        lines.append(
            f"| {cell['concurrency']:g} | {_cv_label(cell['cv'])} | {cell.get('duration_s', st['duration_s']):g} | "
            f"{cell.get('capacity_rate_rps', float('nan')):.2f} | "
            + (f"{fb['rate']:.2f} ({fb['binding']})" if fb else "n/a")
            + " | "
            + ", ".join(f"{k} {v['rate']:.2f} ({v['binding']})" for k, v in cell.get("slo_fluid_bound", {}).items())
            + " |"
        )
    for s in doc["slos"]:
        keys = [f"{a}/{b}" for a, b in RATIOS if a in searched and b in searched]
        lines += ["", f"## SLO {s}", "", "| C | CV | " + " | ".join(searched + keys) + " |"]
        lines.append("|---|---|" + "---:|" * (len(searched) + len(keys)))
        for cell in doc["cells"]:
            cells = []
            for pol in searched:
                g = cell["goodput"][pol][s]
                cells.append(_fmt(g["mean"], g["ci95"]) if g["status"] == "ok" else g["label"].split(" (")[0])
            for key in keys:
                r = cell["ratios"].get(key, {}).get(s)
                cells.append(_fmt(r["mean"], r["ci95"]) + "x" if r and r["mean"] is not None else "n/a")
            lines.append(
                f"| {cell['concurrency']:g} | {_cv_label(cell['cv'])} ({cell['cv_measured']:.2f}) | "
                + " | ".join(cells) + " |"
            )  # fmt: skip
    head = next(iter(doc["slos"]))
    lines += ["", f"## At fixed loads (x the pooled bound's `{head}` goodput), every seed", "",
              f"SLO-meeting requests per second (`{head}` attainment x measured rate), attainment, P99 TPOT and "
              "retractions: mean ± 95% interval over seeds; ratios paired by seed (retractions: totals over seeds).",
              "", "| C | CV | load | policy | good req/s | attainment | P99 TPOT ms | retractions | fewest requests |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for cell in doc["cells"]:
        for load, summ in cell.get("load_summary", {}).items():
            for pol, r in summ["policies"].items():
                lines.append(
                    f"| {cell['concurrency']:g} | {_cv_label(cell['cv'])} | {load} | {pol} | {fmt_ci(r['good_rps'])} | "
                    f"{fmt_ci(r['attainment'])} | {fmt_ci(r['tpot_p99'], 1, 1e3)} | {fmt_ci(r['retractions'], 0)} | "
                    f"{r['min_requests']} |"
                )
    lines += [
        "",
        "| C | CV | load | ratio | good req/s (paired) | retractions (totals) |",
        "|---|---|---:|---|---:|---:|",
    ]
    for cell in doc["cells"]:
        for load, summ in cell.get("load_summary", {}).items():
            for key, r in summ["ratios"].items():
                rt = r["retractions"]
                lines.append(
                    f"| {cell['concurrency']:g} | {_cv_label(cell['cv'])} | {load} | {key} | {fmt_ci(r['good_rps'])}x "
                    f"({r['good_rps']['seeds']} seeds) | {rt['a']} / {rt['b']}"
                    + (f" = {rt['ratio']:.2f}x |" if rt["ratio"] is not None else " |")
                )
    return "\n".join(lines) + "\n"


def heatmap(doc: dict, key: str, path: Path) -> None:
    """Heatmap of goodput ratio `key` (C x CV), one panel per SLO, annotated with mean ± interval."""
    concs = sorted({c["concurrency"] for c in doc["cells"]})
    cvs = list(dict.fromkeys(_cv_label(c["cv"]) for c in doc["cells"]))
    slos = list(doc["slos"])
    fig, axes = plt.subplots(1, len(slos), figsize=(4.2 * len(slos), 3.6), squeeze=False)
    for ax, s in zip(axes[0], slos, strict=True):
        m = np.full((len(concs), len(cvs)), np.nan)
        text = {}
        for cell in doc["cells"]:
            r = cell["ratios"].get(key, {}).get(s)
            i, j = concs.index(cell["concurrency"]), cvs.index(_cv_label(cell["cv"]))
            if r and r["mean"] is not None:
                m[i, j] = r["mean"]
                text[(i, j)] = _fmt(r["mean"], r["ci95"])
        im = ax.imshow(m, cmap="RdBu", vmin=0.5, vmax=1.5, origin="lower", aspect="auto")
        for (i, j), t in text.items():
            ax.text(j, i, t, ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(cvs)), cvs)
        ax.set_yticks(range(len(concs)), [f"{c:g}" for c in concs])
        ax.set_xlabel("output-length CV")
        ax.set_title(f"{key} goodput, SLO {s}", fontsize=9)
    axes[0][0].set_ylabel("requests per full instance (C)")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
