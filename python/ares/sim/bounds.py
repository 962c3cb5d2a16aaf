"""Pooled-capacity bound: what perfect placement could reach, simulated with the same engine.

The cluster's D decode instances are replaced by ONE decode instance holding all of their KV (D x C tokens) and
all of their compute: its step with batch N and K KV tokens takes a + (b N + c K) / D, the mean of the D
instances' step times (a + b n_i + c K_i) when the same requests are spread over them. It has their D NICs
(each KV transfer its own link: one NIC taking every P->D transfer of 256 instances capped the pool at 155 req/s
where the cluster served 350) and their D host links (a retraction's backup copy stalls the whole pooled batch, so
it runs at D x the bandwidth: the mean stall per request is one instance's). The prefill instances, retraction and
the workload (lengths clipped as one real instance clips them) are unchanged.
Admission is SGLang's reserve rule (free - need >= reserve x (running + 1)) with the reserve divided by D: the
rule is applied per instance and is not additive, so a cluster whose instance i admits when its own free KV
covers reserve x (n_i + 1) can run with far less total headroom than reserve x (N + 1); the pool with the full
reserve was measured stricter than least_kv on R1 (it queued where the cluster admitted). With reserve / D the
pool's headroom is that of an instance holding the average batch.

So the pool has no fragmentation (a request fits if the cluster's free KV adds up to it), perfect balance
(every request sees the cluster's mean step time) and no migration cost or delay: an upper reference for
placement and rebalancing, not a theorem. Goodput counts the rate at which 90% of requests meet the SLO, and
the fraction of requests under a threshold is not improved by averaging: with a TPOT SLO below the mean step
time, a cluster whose lightly loaded instances step faster than the mean meets more requests than the pool
(seen on R1 with `tpot_0.8x`). A policy above 100% of the bound says that, not that the bound is wrong. Its
per-instance numbers (KV spread, migrations) are meaningless: one instance.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .cost_model import CostModel
from .engine import SimConfig

POOLED_BOUND = "pooled_bound"  # the name the bound goes by beside the policies


def pooled_cost(cost: CostModel, n: int) -> CostModel:
    """One instance with the KV capacity and the per-step compute/bandwidth of `n` instances of `cost`."""
    return dataclasses.replace(
        cost,
        name=f"{cost.name} pooled x{n}",
        step_per_request_s=cost.step_per_request_s / n,
        step_per_kv_token_s=cost.step_per_kv_token_s / n,
        kv_capacity_tokens=cost.kv_capacity_tokens * n,
        host_bytes_per_s=cost.host_bytes_per_s * n,
    )


def pooled_config(cfg: SimConfig) -> SimConfig:
    """The pooled-bound run of cluster `cfg`: one decode instance, the same prefill instances (module docstring)."""
    n_prefill = cfg.n_prefill or max(1, cfg.n_decode // 2)
    reserve = math.ceil(cfg.reserve_tokens / cfg.n_decode)
    return dataclasses.replace(
        cfg,
        n_decode=1,
        n_prefill=n_prefill,
        cost=pooled_cost(cfg.cost, cfg.n_decode),
        policy="round_robin",  # one instance: nothing to decide
        link_contention=False,  # the cluster's D NICs: no transfer queues behind another on one link
        reserve_tokens=reserve,
        # lengths are clipped to capacity - reserve - 1: keep one real instance's limit
        clip_capacity=(cfg.clip_capacity or cfg.cost.kv_capacity_tokens) - cfg.reserve_tokens + reserve,
    )


# ---------------------------------------------------------------------------------------------------------------------
FLUID_BOUND = "fluid_bound"  # the provable bound's name beside the policies and the pooled bound


def clipped_lengths(work, cfg: SimConfig) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, output) tokens of `work` as the simulator serves them on cluster `cfg` (`ClusterSim` clips both so
    that one request fits one instance's pool beside the reserve)."""
    cap = cfg.clip_capacity or cfg.cost.kv_capacity_tokens
    limit = cap - cfg.reserve_tokens - 1
    prompt = np.minimum(work.prompt_tokens, limit // 2 if limit > 2 else 1).astype(np.float64)
    out = np.minimum(work.output_tokens, np.maximum(limit - prompt, 1)).astype(np.float64)
    if isinstance(cfg.max_tokens, int):
        out = np.minimum(out, max(cfg.max_tokens, 1))
    return prompt, out


def _sum_range(lo: np.ndarray, hi: np.ndarray, power: int) -> np.ndarray:
    """sum of x**power over integers lo <= x <= hi (0 where hi < lo), power 0, 1 or 2, elementwise."""

    def s(n: np.ndarray) -> np.ndarray:  # sum_{x=0}^{n} x**power, n >= -1
        return (n + 1) if power == 0 else n * (n + 1) / 2 if power == 1 else n * (n + 1) * (2 * n + 1) / 6

    hi = np.maximum(hi, lo - 1)
    return s(hi) - s(lo - 1)


def request_demands(prompt: np.ndarray, output: np.ndarray, cost: CostModel, thresholds: np.ndarray) -> dict:
    """Per request, what any schedule must spend on it (see `fluid_bound`): `kv_time`, the KV token-seconds of its
    decode steps, sum over x = p .. p + o - 2 of x (a + b + c x); and `above[j]`, the seconds of its decode steps
    while its KV exceeds thresholds[j], sum over those x > thresholds[j] of (a + b + c x)."""
    a1, c = cost.step_base_s + cost.step_per_request_s, cost.step_per_kv_token_s
    lo, hi = prompt, prompt + output - 2  # KV before each decode step (the first token comes from prefill)
    kv_time = a1 * _sum_range(lo, hi, 1) + c * _sum_range(lo, hi, 2)
    above, above_steps = [], []
    for th in thresholds:
        start = np.maximum(lo, np.floor(th) + 1)
        above.append(a1 * _sum_range(start, hi, 0) + c * _sum_range(start, hi, 1))
        above_steps.append(_sum_range(start, hi, 0))
    return {
        "kv_time": kv_time,
        "above": np.array(above),
        "steps": np.maximum(output - 1, 0),
        "kv_steps": _sum_range(lo, hi, 1),
        "above_steps": np.array(above_steps),
    }


def _cheapest_mean(w: np.ndarray, q: float) -> float:
    """The sum of the ceil(q n) smallest values of w, over n: what serving a fraction q of the requests costs at
    least, per arriving request."""
    k = max(1, math.ceil(q * w.size))
    return float(np.sort(w)[:k].sum() / w.size)


def _rate(capacity: float, cost_per_request: float) -> float:
    return math.inf if cost_per_request <= 0 else capacity / cost_per_request


def fluid_bound(work, cfg: SimConfig, attainment: float = 0.9, k_max: int = 32) -> dict:
    """A provable upper bound on goodput (the highest arrival rate at which a fraction `attainment` of requests
    meet their SLOs) that respects every instance's KV pool, valid for any placement, admission, retraction and
    migration policy on cluster `cfg` (D decode instances of C KV tokens, step time a + b n + c K).

    Facts used, each true of the simulator and of a real SGLang decode server:
    (1) a request with p prompt and o output tokens runs o - 1 decode steps (the first token is the prefill's); in
        the step that has x = p + g - 1 of its KV tokens written (g = 1 .. o - 1), those x tokens sit in one
        instance's pool for the whole step, and the step lasts at least a + b + c x (the instance's batch has
        n >= 1 requests and K >= x tokens; stalls only add). Retraction and migration never skip a step: a
        retracted request decodes its remaining steps later, with its KV back in a pool.
    (2) an instance holds at most C KV tokens at any instant, and runs one step at a time.
    So over any time window of length H' and for the requests S whose decode steps all fall in it:
    (KV)  sum over S of w_i <= D C H', where w_i = sum over its steps of x (a + b + c x) (its KV-time, fact 1;
          the left side is at most the integral of all instances' KV over the window, fact 2);
    (k)   for k = 1 .. k_max, with threshold theta_k = C / (k + 1): at most k requests of more than theta_k tokens
          fit one pool at once ((k + 1) theta_k = C), so at most k such steps run on an instance at any instant and
          sum over S of u_ik <= k D H', where u_ik = the duration bound of i's steps with x > theta_k;
    (T)   the instances' busy time is at most D H', and a step with n requests and K tokens lasts a + b n + c K:
          summed over steps, a (number of steps) + b (tokens) + c (KV-token-steps). One step holds at most C
          tokens and at most k requests above theta_k, so the number of steps is at least (KV-token-steps) / C and
          at least (steps above theta_k) / k: sum over S of (a X_i / C + b (o_i - 1) + c X_i) <= D H', X_i = sum
          of i's x, and the same with a X_i / C replaced by a (i's steps above theta_k) / k ("time_k<k>").
    Let requests arrive at rate lambda for a time H and let S be those that meet their SLOs, |S| >= q lambda H
    (q = `attainment`). Every SLO bounds TTFT and TPOT, so S's steps lie in [0, H + L] with L the longest SLO-
    meeting latency, independent of H. For each constraint, the sum over S is at least the sum of the cheapest
    q lambda H demands; as H grows (the request mix is the workload's sample, and L / H -> 0),
        lambda <= D C / m_q(w),   lambda <= k D / m_q(u_k) for every k,   and the same for (T),
    m_q(v) = (the sum of the ceil(q n) smallest of the sample's n values of v) / n. The bound is the smallest of
    these rates. The pooled bound (one instance of D C tokens) may exceed it or fall below it (it has latency SLOs
    and queues; this one counts resources only): where the pooled bound is higher, no policy can sustain it;
    neither bound says a policy can reach it. Constraint (k) is what the pooled instance lacks: there two requests
    of 0.6 C tokens each fit together. The step-time lower bound is the cost model's (a + b n + c K), so on a real
    server the bound holds as far as that model does. With q < 1 a schedule may give up the most expensive
    requests, which on heavy-tailed outputs carry most of the work: the bound is then far looser (it is a bound on
    any policy, including one that starves the longest tenth). Returns the bound and the rate of each constraint
    ("kv", "k1", ..., "time", "time_k1", ...), req/s. `slo_bound.slo_fluid_bound` tightens it with the SLOs and
    one selection of SLO-meeting requests for every constraint.
    """
    if not 0 < attainment <= 1:
        raise ValueError(f"attainment must be in (0, 1], got {attainment}")
    prompt, out = clipped_lengths(work, cfg)
    d, cap = cfg.n_decode, float(cfg.cost.kv_capacity_tokens)
    ks = np.arange(1, k_max + 1)
    dem = request_demands(prompt, out, cfg.cost, cap / (ks + 1))
    rates = {"kv": d * cap / _cheapest_mean(dem["kv_time"], attainment)}
    for k, u in zip(ks, dem["above"], strict=True):
        rates[f"k{k}"] = _rate(k * d, _cheapest_mean(u, attainment))
    # (T) instance time: every step costs a + b n + c K, so the steps' time sums to a x (steps) + b x (tokens) +
    # c x (KV-token-steps); an instance's step holds at most C KV tokens and at most k tokens-above-C/(k+1)
    # requests, so the number of steps is at least (KV-token-steps) / C and at least (steps above C/(k+1)) / k.
    a, b, c = cfg.cost.step_base_s, cfg.cost.step_per_request_s, cfg.cost.step_per_kv_token_s
    linear = b * dem["steps"] + c * dem["kv_steps"]
    rates["time"] = _rate(d, _cheapest_mean(a * dem["kv_steps"] / cap + linear, attainment))
    for k, n_above in zip(ks, dem["above_steps"], strict=True):
        rates[f"time_k{k}"] = _rate(d, _cheapest_mean(a * n_above / k + linear, attainment))
    binding = min(rates, key=rates.get)
    return {"rate": rates[binding], "binding": binding, "constraints": rates, "attainment": attainment}
