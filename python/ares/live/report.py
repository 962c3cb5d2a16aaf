"""Figures of one policy's replay (latency percentiles, SLO attainment, goodput, retractions, migrations, the
head's live error, KV balance), their mean over seeds with ratios to a base policy (round robin where it ran, else the
first), a markdown table and a PNG."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ares.live.client import Outcome
from ares.live.monitor import Trace


@dataclass(frozen=True)
class Slo:
    """Per-request SLOs, fixed before any replay from the measured single-request figures."""

    ttft_s: float
    tpot_s: float


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def head_mae(outcomes: list[Outcome], trace: Trace) -> dict:
    """The head's live error: |predicted remaining - true remaining| over every poll that saw a prediction of a
    request that finished (true remaining = its final length - tokens generated at the poll); also over the
    requests that ended on their own (EOS), the population the offline evaluation scores, apart from those cut at
    `max_new_tokens` (often greedy loops: no end of their own to predict)."""
    final = {o.backend_rid: (o.n_output, o.finish) for o in outcomes if o.ok and o.backend_rid}
    err, truth, eos_err = [], [], []
    for rid, samples in trace.predictions.items():
        if rid not in final:
            continue
        n, finish = final[rid]
        for generated, pred in samples:
            true_rem = max(n - generated, 0)
            err.append(abs(pred - true_rem))
            truth.append(true_rem)
            if finish == "stop":
                eos_err.append(err[-1])
    if not err:
        return {"mae_tokens": None, "samples": 0}
    return {
        "mae_tokens": float(np.mean(err)),
        "mae_tokens_eos": float(np.mean(eos_err)) if eos_err else None,
        "mean_true_remaining": float(np.mean(truth)),
        "samples": len(err),
        "requests": sum(1 for r in trace.predictions if r in final),
    }


def kv_imbalance(trace: Trace) -> float | None:
    """Time-weighted imbalance: sum over samples of the fullest server's KV over the sum of the mean (1: always
    equal; N servers: one server holds everything)."""
    used = np.asarray(trace.used, dtype=float)
    if used.size == 0 or used.sum() == 0:
        return None
    return float(used.max(axis=1).sum() / used.mean(axis=1).sum())


def summarize(
    outcomes: list[Outcome], trace: Trace, slo: Slo, retracted: list[int], migrations: dict, wall_s: float
) -> dict:
    """One replay's figures."""
    ok = [o for o in outcomes if o.ok]
    tpot = [o.tpot_s for o in ok if o.tpot_s is not None]
    ttft = [o.ttft_s for o in ok]
    itl = [g for o in ok for g in o.itl_s()]
    met = [o for o in ok if o.ttft_s <= slo.ttft_s and (o.tpot_s is None or o.tpot_s <= slo.tpot_s)]
    end = max((o.event_s[-1] for o in ok), default=wall_s)
    used = np.asarray(trace.used, dtype=float)
    caps = np.asarray(trace.capacity or [1] * (used.shape[1] if used.ndim == 2 else 1), dtype=float)
    return {
        "requests": len(outcomes),
        "completed": len(ok),
        "lost": len(outcomes) - len(ok),
        "duplicated": sum(o.duplicated for o in outcomes),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "output_tokens": int(sum(o.n_output for o in ok)),
        "finish_length": sum(o.finish == "length" for o in ok),
        "p50_tpot_ms": None if not tpot else 1e3 * _pct(tpot, 50),
        "p99_tpot_ms": None if not tpot else 1e3 * _pct(tpot, 99),
        "p50_ttft_s": _pct(ttft, 50),
        "p99_ttft_s": _pct(ttft, 99),
        "p50_itl_ms": None if not itl else 1e3 * _pct(itl, 50),
        "p99_itl_ms": None if not itl else 1e3 * _pct(itl, 99),
        "slo_met": len(met),
        "slo_attainment": len(met) / max(len(outcomes), 1),
        "goodput_rps": len(met) / end if end > 0 else 0.0,
        "throughput_tok_s": sum(o.n_output for o in ok) / end if end > 0 else 0.0,
        "makespan_s": end,
        "retractions": int(sum(retracted)),
        "retractions_per_server": retracted,
        "migrations": migrations,
        "head": head_mae(outcomes, trace),
        "kv_imbalance": kv_imbalance(trace),
        "kv_peak_frac": (used.max(axis=0) / caps).round(3).tolist() if used.size else [],
        "placed": {d: sum(o.decode == d for o in outcomes) for d in sorted({o.decode for o in outcomes if o.decode})},
    }


RATIO_KEYS = ("goodput_rps", "p99_tpot_ms", "slo_attainment")


def aggregate(runs: dict[str, list[dict]]) -> dict:
    """Per policy: mean and per-seed values of the main figures, and per-seed ratios to the base policy
    (`base_policy`): `<figure>_vs_base`."""
    out: dict = {}
    base = runs.get(base_policy(runs)) if runs else None
    for policy, per_seed in runs.items():
        agg: dict = {}
        for key in (
            "goodput_rps",
            "slo_attainment",
            "p50_tpot_ms",
            "p99_tpot_ms",
            "p99_ttft_s",
            "p99_itl_ms",
            "retractions",
            "lost",
            "duplicated",
        ):
            vals = [r[key] for r in per_seed if r[key] is not None]
            agg[key] = {"mean": float(np.mean(vals)) if vals else None, "per_seed": vals}
        agg["slo_met"] = sum(r.get("slo_met", round(r["slo_attainment"] * r["requests"])) for r in per_seed)
        agg["requests"] = sum(r["requests"] for r in per_seed)
        agg["migrations_committed"] = sum(r["migrations"].get("committed", 0) for r in per_seed)
        maes = [r["head"]["mae_tokens"] for r in per_seed if r["head"]["mae_tokens"] is not None]
        agg["head_mae_tokens"] = float(np.mean(maes)) if maes else None
        if base:
            for key in RATIO_KEYS:
                ratios = [
                    r[key] / b[key] for r, b in zip(per_seed, base, strict=False) if r[key] is not None and b[key]
                ]
                agg[f"{key}_vs_base"] = {
                    "mean": float(np.mean(ratios)) if ratios else None,
                    "min": float(np.min(ratios)) if ratios else None,
                    "max": float(np.max(ratios)) if ratios else None,
                }
        out[policy] = agg
    return out


def _fmt(x, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def base_policy(per_policy: dict) -> str:
    """The policy the others are compared with: round robin where it ran, else the first one run."""
    return "round_robin" if "round_robin" in per_policy else next(iter(per_policy))


def attainment_ratio(met_a: int, n_a: int, met_b: int, n_b: int, z: float = 1.96) -> dict:
    """Ratio of two SLO attainments (met_a/n_a over met_b/n_b) with its 95% interval (Katz's log method for a ratio
    of two proportions; 0.5 added to every count when one is 0), and whether the interval excludes 1."""
    if min(n_a, n_b) == 0:
        return {"ratio": None, "low": None, "high": None, "tells": False}
    a, b, na, nb = met_a, met_b, n_a, n_b
    if a == 0 or b == 0:
        a, b, na, nb = a + 0.5, b + 0.5, na + 0.5, nb + 0.5
    ratio = (a / na) / (b / nb)
    se = float(np.sqrt(max(1 / a - 1 / na + 1 / b - 1 / nb, 0.0)))
    low, high = ratio * np.exp(-z * se), ratio * np.exp(z * se)
    return {"ratio": float(ratio), "low": float(low), "high": float(high), "tells": bool(low > 1 or high < 1)}


def comparison_lines(agg: dict) -> str:
    """One line per policy against the base (`base_policy`): SLO-meeting counts, the attainment ratio with its
    95% interval, and plainly whether the sample is large enough to tell them apart."""
    if len(agg) < 2:
        return ""
    base = base_policy(agg)
    lines = ["", f"Against {base} (requests meeting the SLO, all seeds pooled; attainment ratio, 95% interval):", ""]
    b = agg[base]
    for name, a in agg.items():
        if name == base:
            continue
        r = attainment_ratio(a["slo_met"], a["requests"], b["slo_met"], b["requests"])
        verdict = (
            "a real difference" if r["tells"] else "too few requests to tell these two apart (the interval spans 1)"
        )
        lines.append(
            f"- {name}: {a['slo_met']}/{a['requests']} vs {b['slo_met']}/{b['requests']}, "
            f"{_fmt(r['ratio'])}x ({_fmt(r['low'])}-{_fmt(r['high'])}): {verdict}"
        )
    return "\n".join(lines) + "\n"


def markdown(agg: dict) -> str:
    """The side-by-side table (means over seeds; ratios to the base policy with their min-max over seeds; SLO-meeting
    counts), then each policy against the base with an interval (`comparison_lines`)."""
    base = base_policy(agg)
    rows = [
        f"| policy | goodput (req/s) | vs {base} | met / requests | SLO attain. | P50 TPOT ms | P99 TPOT ms "
        f"| P99 TPOT vs {base} | P99 TTFT s | P99 ITL ms | retractions | migrations | lost | dup. | head MAE (tok) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for policy, a in agg.items():
        g = a.get("goodput_rps_vs_base", {})
        t = a.get("p99_tpot_ms_vs_base", {})
        rows.append(
            f"| {policy} | {_fmt(a['goodput_rps']['mean'], '.3f')} "
            f"| {_fmt(g.get('mean'))}x ({_fmt(g.get('min'))}-{_fmt(g.get('max'))}) "
            f"| {a['slo_met']}/{a['requests']} | {_fmt(a['slo_attainment']['mean'], '.3f')} "
            f"| {_fmt(a['p50_tpot_ms']['mean'], '.0f')} "
            f"| {_fmt(a['p99_tpot_ms']['mean'], '.0f')} | {_fmt(t.get('mean'))}x "
            f"| {_fmt(a['p99_ttft_s']['mean'], '.1f')} | {_fmt(a['p99_itl_ms']['mean'], '.0f')} "
            f"| {sum(a['retractions']['per_seed'])} | {a['migrations_committed']} "
            f"| {sum(a['lost']['per_seed'])} | {sum(a['duplicated']['per_seed'])} "
            f"| {_fmt(a['head_mae_tokens'], '.1f')} |"
        )
    return "\n".join(rows) + "\n" + comparison_lines(agg)


def plot(runs_raw: dict[str, list[tuple[list[Outcome], Trace]]], slo: Slo, path) -> None:
    """Left: CDF of per-request TPOT per policy (all seeds pooled) with the SLO; right: KV used per server over
    time, one row per policy (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(runs_raw)
    fig = plt.figure(figsize=(13, 2.2 * max(len(policies), 2)))
    gs = fig.add_gridspec(len(policies), 2)
    ax = fig.add_subplot(gs[:, 0])
    for p in policies:
        tp = np.sort([1e3 * o.tpot_s for outs, _ in runs_raw[p] for o in outs if o.tpot_s is not None])
        if len(tp):
            ax.plot(tp, np.arange(1, len(tp) + 1) / len(tp), label=p)
    ax.axvline(1e3 * slo.tpot_s, color="k", ls="--", lw=1, label="TPOT SLO")
    ax.set_xlabel("per-request TPOT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TPOT CDF (all seeds)")
    ax.legend()
    for i, p in enumerate(policies):
        a = fig.add_subplot(gs[i, 1])
        _, tr = runs_raw[p][0]
        used = np.asarray(tr.used, dtype=float)
        caps = np.asarray(tr.capacity or [1] * used.shape[1], dtype=float) if used.size else np.ones(1)
        for j in range(used.shape[1] if used.ndim == 2 else 0):
            a.plot(tr.t_s, used[:, j] / caps[j], lw=1, label=f"decode{j}")
        a.set_ylim(0, 1.05)
        a.set_ylabel(f"{p}\nKV used")
        if i == 0:
            a.set_title("KV used per decode server (first seed)")
            a.legend(fontsize=7, loc="upper right")
        if i == len(policies) - 1:
            a.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out: Path, doc: dict) -> None:
    """NAME.json and NAME.md of a (possibly partial) live run under `out`."""
    doc["aggregate"] = aggregate(doc["runs"])
    name = doc["config"]["name"]
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    slo = doc["slo"]
    head = (
        f"# Live CPU cluster: {doc['config']['decode']} decode + 1 prefill, {doc['config']['model']}\n\n"
        f"Commit `{doc['provenance']['commit'][:12]}`{' (dirty)' if doc['provenance']['dirty'] else ''}; "
        f"command `{doc['provenance']['command']}`; {doc['machine']['cpus']} CPUs, no GPU.\n"
        f"{doc['config']['num_requests']} requests per seed, seeds {doc['config']['seeds']}, R1 arrivals at "
        f"{doc['config']['rate']} req/s, KV pool {doc['config']['max_total_tokens']} tokens per decode server, "
        f"reserve {doc['config']['reserve_tokens']}.\n"
        f"SLO (fixed before the replays from one request alone: TTFT {doc['calibration']['ttft_s']:.2f} s, TPOT "
        f"{1e3 * doc['calibration']['tpot_s']:.0f} ms): TTFT <= {slo['ttft_s']:.1f} s and TPOT <= "
        f"{1e3 * slo['tpot_s']:.0f} ms. Goodput = requests meeting both / makespan. Means over seeds; ratios to "
        f"{base_policy(doc['runs'])} per seed (min-max).\n\n"
    )
    if "rate_pick" in doc:
        pick = doc["rate_pick"]
        ref = pick["reference"]
        head += (
            f"Load picked for this cluster (`--rate auto`): {pick['rate']} req/s = the reference {ref['rate']} req/s "
            f"(`{ref['from']}`: least_kv met the SLO for 94% of its requests there) x "
            f"{pick['speed_vs_reference']:.2f}, this cluster's single-request speed against the reference's.\n\n"
        )
    text = head + markdown(doc["aggregate"])
    stuck = [
        f"{policy} seed {r['seed']} ({r['leftovers_aborted']['kv_tokens_left']} KV tokens)"
        for policy, runs in doc["runs"].items()
        for r in runs
        if r.get("leftovers_aborted")
    ]
    if stuck:
        text += (
            "\nRequests still held by the servers after the replay (the client had given up on them) were aborted "
            f"on every server before the next replay: {'; '.join(stuck)}.\n"
        )
    if "simulator" in doc:
        text += sim_markdown(doc)
    (out / f"{name}.md").write_text(text)


def sim_markdown(doc: dict) -> str:
    """The simulator's prediction of each replay beside the live figures."""
    sim = doc["simulator"]
    prof, fit = sim["profile"], sim["fit"]
    how = "each seed predicted with a profile fitted to the other seeds" if sim["cross_fit"] else "in-sample fit"
    rows = [
        f"\n## Simulator vs live\n\nProfile `{prof['name']}` (all replays): "
        f"step = {1e3 * prof['step_base_s']:.1f} ms + "
        f"{1e3 * prof['step_per_request_s']:.2f} ms/request + {1e6 * prof['step_per_kv_token_s']:.1f} us/KV token "
        f"(R^2 {fit['r2']:.2f} over {fit['requests']} requests' TPOT); prefill {1e3 * prof['prefill_base_s']:.0f} ms + "
        f"{1e3 * prof['prefill_per_token_s']:.2f} ms/token; {how}. Target: sim/live within 0.75-1.25.\n",
        "| policy | seed | live P99 TPOT ms | sim P99 TPOT ms | sim/live | live goodput | sim goodput | sim/live "
        "| within 25% |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for policy, runs in sim["runs"].items():
        for r, live in zip(runs, doc["runs"][policy], strict=True):
            c = r["sim_over_live"]
            rows.append(
                f"| {policy} | {r['seed']} | {_f(live['p99_tpot_ms'], '.0f')} | {_f(r['sim']['p99_tpot_ms'], '.0f')} "
                f"| {_f(c['p99_tpot_ms'])} | {_f(live['goodput_rps'], '.3f')} | {_f(r['sim']['goodput_rps'], '.3f')} "
                f"| {_f(c['goodput_rps'])} | {'yes' if c['within_25pct'] else 'no'} |"
            )
    if sim.get("not_simulated"):
        rows.append(f"\nNot simulated (SGLang's router: its placement is not a simulator policy): "
                    f"{', '.join(sim['not_simulated'])}.")
    return "\n".join(rows) + "\n"


def _f(x, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)
