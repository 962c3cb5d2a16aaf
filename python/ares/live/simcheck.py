"""The simulator against the live cluster: a CPU cost profile measured from the live run's own servers, and the
simulator's prediction of each policy's P99 TPOT and goodput on the same request list, side by side.

The profile (`cpu-smollm2-135m-measured`):
- decode step time `a + b*batch + c*kv_tokens`: least squares of each live request's TPOT against the mean batch
  and KV of its server while it decoded (`request_loads`), over every policy's replays. It absorbs the CPU the
  other servers take meanwhile (they share 2 cores), which the simulator does not model otherwise. (SGLang's own
  `Decode batch` log lines were tried first: their throughput is averaged over 40 steps and idle gaps, and a fit
  to them explained 2% of the variance.);
- prefill: `base + per_token * prompt` fitted to the calibration requests' TTFT alone (prefill, KV transfer,
  bootstrap and the first step together);
- migration: the measured link profile `cpu-loopback-measured` (`benchmark/migration_bench.py`);
- KV capacity: the servers' `--max-total-tokens`.
The simulated workload is the live one: the same arrival times and prompt lengths, and as output lengths the
lengths each request actually had in that policy's replay (the model's own greedy answers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ares.cluster.router_proc import is_sglang
from ares.sim.cost_model import CPU_HOST_COPY_BYTES_PER_S, CostModel
from ares.sim.engine import SimConfig, simulate
from ares.sim.metrics import request_latencies
from ares.workloads.base import Workload
from ares_router.link_profile import get_link_profile

PROFILE_NAME = "cpu-smollm2-135m-measured"
KV_BYTES_SMOLLM2 = 2 * 30 * 3 * 64 * 2  # 30 layers x (K, V) x 3 KV heads x head dim 64 x bf16


def fit_linear_nonneg(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares `y ~ x @ coef` with coef >= 0 (a negative step-time term is dropped and the rest refitted)."""
    cols = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        coef[cols] = np.linalg.lstsq(x[:, cols], y, rcond=None)[0]
        neg = [j for j in cols if coef[j] < 0]
        if not neg:
            return coef
        cols.remove(min(neg, key=lambda j: coef[j]))


def live_as_workload(requests: list[dict], outputs: dict[str, int]) -> Workload:
    """The replay as a simulator workload: arrivals and prompt lengths, and each request's live output length."""
    reqs = [r for r in requests if outputs.get(r["rid"], 0) > 0]
    return Workload(
        "live",
        np.array([r["arrival_s"] for r in reqs], dtype=float),
        np.array([r["prompt_tokens"] for r in reqs], dtype=np.int64),
        np.array([outputs[r["rid"]] for r in reqs], dtype=np.int64),
    )


def simulate_policy(
    work: Workload, policy: str, cost: CostModel, slo_ttft_s: float, slo_tpot_s: float, args, error_model=None
) -> dict:
    """The simulator's figures for `policy` on the live workload, computed as the live ones are."""
    cfg = SimConfig(
        n_decode=args.decode,
        n_prefill=1,
        cost=cost,
        policy=policy,
        poll_interval_s=0.5,
        rebalance_every=2,  # the router's 1 s rebalancing interval
        reserve_tokens=args.reserve_tokens,
        max_tokens=args.max_new_tokens,
        warmup_frac=0.0,
        seed=0,
        **({"error_model": error_model} if error_model is not None else {}),
    )
    res = simulate(work, cfg)
    lat = request_latencies(res)
    done = ~np.isnan(res.t_finish)
    tpot = lat["tpot"][done & (res.output > 1)]
    met = done & (lat["ttft"] <= slo_ttft_s) & ((lat["tpot"] <= slo_tpot_s) | (res.output <= 1))
    end = float(np.nanmax(res.t_finish)) if done.any() else float("nan")
    return {
        "p99_tpot_ms": 1e3 * float(np.percentile(tpot, 99)) if tpot.size else None,
        "p50_tpot_ms": 1e3 * float(np.percentile(tpot, 50)) if tpot.size else None,
        "slo_attainment": float(met.mean()),
        "goodput_rps": float(met.sum() / end) if end > 0 else 0.0,
        "retractions": int(res.retractions.sum()),
        "migrations": int(res.migrations),
    }


def compare(live: dict, sim: dict) -> dict:
    """sim / live for the figures the issue asks the simulator to predict within 25%."""
    out = {}
    for key in ("p99_tpot_ms", "goodput_rps"):
        lv, sv = live.get(key), sim.get(key)
        out[key] = None if not lv or sv is None else sv / lv
    out["within_25pct"] = all(v is not None and abs(v - 1) <= 0.25 for v in out.values())
    return out


def request_loads(outcomes: list[dict], requests: list[dict], samples: int = 16) -> np.ndarray:
    """Per finished request: (mean batch, mean KV tokens of its decode server over its decode lifetime, its TPOT).

    The server's load is rebuilt from the replay's own outcomes: each request occupies the server it was placed on
    from its first token (arrival + TTFT) to its last (first + TPOT x (n - 1)), holding its prompt plus the tokens
    generated so far (linear in time)."""
    meta = {r["rid"]: r for r in requests}
    live = []  # (server, first token s, last token s, prompt tokens, output tokens)
    for o in outcomes:
        if o.get("error") or not o.get("tpot_s") or o["n_output"] < 2 or not o.get("decode"):
            continue
        first = meta[o["rid"]]["arrival_s"] + o["ttft_s"]
        last = first + o["tpot_s"] * (o["n_output"] - 1)
        live.append((o["decode"], first, last, meta[o["rid"]]["prompt_tokens"], o["n_output"]))
    rows = []
    for server, start, end, _, n_out in live:
        ts = np.linspace(start, end, samples)
        batch = np.zeros(samples)
        kv = np.zeros(samples)
        for other, a, b, prompt, m in live:
            if other == server:
                on = (ts >= a) & (ts <= b)
                batch += on
                kv += np.where(on, prompt + m * (ts - a) / max(b - a, 1e-9), 0.0)
        rows.append((batch.mean(), kv.mean(), (end - start) / (n_out - 1)))
    return np.array(rows, dtype=float).reshape(-1, 3)


def fit_from_requests(runs: list[tuple[list[dict], list[dict]]], calibration: list[dict], kv_capacity: int):
    """The cost model fitted to requests' TPOT against their servers' load (`request_loads`) over `runs`
    ((outcomes, requests) pairs); prefill from the calibration requests' TTFT; and the fit's statistics."""
    pts = np.vstack([request_loads(o, r) for o, r in runs] or [np.zeros((0, 3))])
    if len(pts) < 3:
        raise ValueError(f"only {len(pts)} finished requests: too few to fit the step time")
    x = np.column_stack([np.ones(len(pts)), pts[:, 0], pts[:, 1]])
    a, b, c = fit_linear_nonneg(x, pts[:, 2])
    resid = pts[:, 2] - x @ np.array([a, b, c])
    r2 = 1 - float(np.sum(resid**2) / max(np.sum((pts[:, 2] - pts[:, 2].mean()) ** 2), 1e-12))
    p = np.array([[1.0, c_["prompt_tokens"]] for c_ in calibration])
    ttft = np.array([c_["ttft_s"] for c_ in calibration])
    pre_base, pre_tok = fit_linear_nonneg(p, ttft) if len(calibration) >= 2 else (float(ttft.mean()), 0.0)
    link = get_link_profile("cpu-loopback-measured")
    cost = CostModel(
        name=PROFILE_NAME,
        step_base_s=float(a),
        step_per_request_s=float(b),
        step_per_kv_token_s=float(c),
        prefill_base_s=float(pre_base),
        prefill_per_token_s=float(pre_tok),
        kv_capacity_tokens=int(kv_capacity),
        kv_bytes_per_token=KV_BYTES_SMOLLM2,
        link_bytes_per_s=link.bytes_per_s,
        migration_pause_s=link.pause_s,
        migration_setup_s=link.setup_s,
        host_bytes_per_s=CPU_HOST_COPY_BYTES_PER_S,
        note="MEASURED on the live CPU cluster (ares.live.simcheck): decode step time fitted to the live requests' "
        "TPOT against their servers' batch and KV; prefill from single requests' TTFT; migration from "
        "cpu-loopback-measured; retraction backup copy estimated (CPU_HOST_COPY_BYTES_PER_S)",
    )
    stats = {
        "requests": len(pts),
        "r2": r2,
        "batch_range": [float(pts[:, 0].min()), float(pts[:, 0].max())],
        "kv_range": [float(pts[:, 1].min()), float(pts[:, 1].max())],
    }
    return cost, stats


def check(doc: dict) -> dict:
    """The simulator's prediction of every (policy, seed) replay of a live results document, beside the live figures.

    Each seed is predicted with a profile fitted to the other seeds' replays (every policy's), so no replay is
    predicted from its own timings; with one seed the fit is in-sample (said in `cross_fit`). The profile fitted to
    every replay is the one stored as the simulator's preset."""
    from types import SimpleNamespace

    from ares.sim.cli import DEFAULT_ACCURACY
    from ares.sim.predictor_model import load_error_model

    cfg = SimpleNamespace(**doc["config"])
    cal = doc["calibration"]["requests"]
    by_seed: dict[int, list[tuple[list[dict], list[dict]]]] = {}
    for runs in doc["runs"].values():
        for live in runs:
            by_seed.setdefault(live["seed"], []).append((live["outcomes"], doc["workloads"][str(live["seed"])]))
    every = [r for rs in by_seed.values() for r in rs]
    profile, stats = fit_from_requests(every, cal, cfg.max_total_tokens)
    per_seed = {}
    for seed in by_seed:
        others = [r for s, rs in by_seed.items() if s != seed for r in rs] or every
        per_seed[seed] = fit_from_requests(others, cal, cfg.max_total_tokens)
    err = load_error_model(DEFAULT_ACCURACY) if Path(DEFAULT_ACCURACY).exists() else None
    out_runs: dict = {}
    for policy, runs in doc["runs"].items():
        if is_sglang(policy):
            continue  # SGLang's router's placement is not a policy of the simulator: nothing to predict it with
        for live in runs:
            cost, fit = per_seed[live["seed"]]
            outputs = {o["rid"]: o["n_output"] for o in live["outcomes"]}
            work = live_as_workload(doc["workloads"][str(live["seed"])], outputs)
            sim = simulate_policy(work, policy, cost, doc["slo"]["ttft_s"], doc["slo"]["tpot_s"], cfg, err)
            out_runs.setdefault(policy, []).append(
                {"seed": live["seed"], "sim": sim, "sim_over_live": compare(live, sim), "fit_r2": fit["r2"]}
            )
    return {
        "profile": profile.to_dict(),
        "fit": stats,
        "cross_fit": len(by_seed) > 1,
        "per_seed_profiles": {str(s): c.to_dict() for s, (c, _) in per_seed.items()},
        "runs": out_runs,
        "not_simulated": [p for p in doc["runs"] if is_sglang(p)],
    }


def main(argv: list[str] | None = None) -> int:
    """Recompute the simulator check of a live results file (and its markdown); optionally store the profile."""
    import argparse
    import json

    from ares.live.report import write_results
    from ares.provenance import record
    from ares.sim.cost_model import write_measured

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results", help="a live_cluster.json / demo.json written by `ares bench live`")
    p.add_argument("--write-profile", action="store_true", help="store the profile as the simulator's preset")
    args = p.parse_args(argv)
    path = Path(args.results)
    doc = json.loads(path.read_text())
    root = Path(__file__).resolve().parents[3]
    doc["simulator"] = check(doc)
    doc["simulator"]["provenance"] = record(root, [path])
    if args.write_profile:
        write_measured(
            CostModel(**doc["simulator"]["profile"]), {"fit": doc["simulator"]["fit"], "from": doc["provenance"]}
        )
    write_results(path.parent, doc)
    print((path.parent / f"{doc['config']['name']}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
