"""The offered load of a live run chosen from the cluster just started (`--rate auto`, the demo's default).

A fixed rate means something only on the machine it was tuned on: on a slower one it puts every policy deep in
overload, where the comparison says nothing. Instead, after the single-request calibration, the stored CPU cost
profile (`cpu-smollm2-135m-measured`, fitted to live replays) is rescaled to this machine: its decode-step terms by
the measured single-request TPOT over the profile's, its prefill terms by the measured TTFT over the profile's. The
simulator with that profile then replays the very request list the run will send (arrival process, prompts, and
each prompt's collected greedy answer length, capped at `max_new_tokens`) under `least_kv` placement, and the rate
is the highest at which least_kv meets the SLO for `target` of the requests (bisection on a log scale): a load where
placement matters but the best policy can still serve most requests.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ares.live.report import Slo
from ares.live.simcheck import simulate_policy
from ares.live.workload import live_workload
from ares.sim.cost_model import CostModel, get_cost_model
from ares.workloads.base import Workload

PROFILE = "cpu-smollm2-135m-measured"


def scaled_profile(calibration: dict, kv_capacity: int, base: CostModel | None = None) -> CostModel:
    """`base` (the stored CPU profile) rescaled to this machine's single-request TPOT and TTFT."""
    base = base or get_cost_model(PROFILE)
    reqs = calibration["requests"]
    prompt = float(np.mean([r["prompt_tokens"] for r in reqs]))
    kv = prompt + calibration["tokens"] / 2  # mean KV held during the calibration request's decode
    step = base.step_time(1, kv)
    prefill = base.prefill_time(prompt)
    fs = calibration["tpot_s"] / step if step > 0 else 1.0
    fp = calibration["ttft_s"] / prefill if prefill > 0 else 1.0
    return replace(
        base,
        name=f"{base.name} x{fs:.2f} step x{fp:.2f} prefill",
        step_base_s=base.step_base_s * fs,
        step_per_request_s=base.step_per_request_s * fs,
        step_per_kv_token_s=base.step_per_kv_token_s * fs,
        prefill_base_s=base.prefill_base_s * fp,
        prefill_per_token_s=base.prefill_per_token_s * fp,
        kv_capacity_tokens=kv_capacity,
    )


def _attainment(rate: float, cost: CostModel, slo: Slo, args, seeds: list[int]) -> float:
    """least_kv's simulated SLO attainment on the run's request lists at `rate`, mean over `seeds`."""
    att = []
    for seed in seeds:
        reqs = live_workload(args.num_requests, rate, seed, args.long_fraction, args.long_min)
        work = Workload(
            "live",
            np.array([r.arrival_s for r in reqs]),
            np.array([len(r.input_ids) for r in reqs], dtype=np.int64),
            np.array([max(min(r.collected_tokens, args.max_new_tokens), 1) for r in reqs], dtype=np.int64),
        )
        att.append(simulate_policy(work, "least_kv", cost, slo.ttft_s, slo.tpot_s, args)["slo_attainment"])
    return float(np.mean(att))


def pick_rate(
    calibration: dict, slo: Slo, args, target: float = 0.9, lo: float = 0.005, hi: float = 2.0, steps: int = 10
) -> dict:
    """The highest rate (req/s) at which the simulator, with the profile rescaled to this machine, gives least_kv
    SLO attainment >= `target` on the run's own request lists; with the profile and every probe, for the record."""
    cost = scaled_profile(calibration, args.max_total_tokens)
    probes = []

    def ok(rate: float) -> bool:
        a = _attainment(rate, cost, slo, args, args.seeds)
        probes.append({"rate": rate, "least_kv_attainment": a})
        return a >= target

    if not ok(lo):
        rate = lo  # even a trickle misses the SLO in the model: run at the floor, and the record says so
    elif ok(hi):
        rate = hi
    else:
        for _ in range(steps):  # invariant: ok(lo), not ok(hi)
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        rate = lo
    return {"rate": round(rate, 4), "target_attainment": target, "profile": cost.to_dict(), "probes": probes}
