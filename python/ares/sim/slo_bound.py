"""An SLO-aware fluid bound on goodput: `bounds.fluid_bound`'s resource constraints with ONE selection of SLO-meeting
requests for all of them at once (a linear program), the requests that cannot meet the SLO even alone left out,
and the TPOT and ITL limits turned into a floor on the number of decode steps the SLO-meeting requests need.

What it can and cannot tighten (measured on R1, `slo_fluid_bound`'s docstring and issue 18's report): a TPOT limit
above the step time of a full instance (the headline `tpot_1.25x`: 1.25 x the full-KV step at batch 64) adds
nothing: every step may then run full. Only `tpot_0.8x` (0.8 x) binds, and by a few percent. With attainment
q < 1 any bound over ALL policies must let a schedule defer its most expensive requests past the measured window
(they miss their SLO and take nothing from the others), which on heavy-tailed outputs removes most of the work;
`serve_all=True` instead counts every request's resources (a bound on schedules that serve every request within
the window, up to an o(H) backlog), not a bound on every policy.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linprog

from .bounds import _sum_range, clipped_lengths, request_demands
from .engine import SimConfig
from .metrics import SLO

SLO_FLUID_BOUND = "slo_fluid_bound"  # the bound's name beside the policies and the other bounds


def _alone_feasible(prompt: np.ndarray, out: np.ndarray, dem: dict, cfg: SimConfig, slo: SLO) -> np.ndarray:
    """Per request: could it meet the TPOT and ITL parts of `slo` on an instance of its own? Its decode step with
    x tokens lasts at least a + b + c x (`fluid_bound`'s fact 1), so TPOT >= a + b + c X / (o - 1) and the gap
    before its last token >= a + b + c (p + o - 2). (TTFT's limit, 1 s + 3 x the prompt's own prefill time, is
    never below that prefill time: no request is ruled out by it alone.)"""
    a1, c = cfg.cost.step_base_s + cfg.cost.step_per_request_s, cfg.cost.step_per_kv_token_s
    ok = np.ones(prompt.size, dtype=bool)
    many = out >= 2  # a one-token output has no decode step: TPOT 0, no token gap
    if slo.tpot_s is not None:
        ok &= ~many | (a1 * dem["steps"] + c * dem["kv_steps"] <= slo.tpot_s * dem["steps"] * (1 + 1e-12))
    if slo.itl_s is not None:
        ok &= ~many | (a1 + c * (prompt + out - 2) <= slo.itl_s * (1 + 1e-12))
    return ok


def _share_dual(lo: np.ndarray, hi: np.ndarray, cap: float, budget: np.ndarray, nu: np.ndarray) -> np.ndarray:
    """A lower bound on sum over integers x in [lo, hi] of h(x) = min_{K in [x, cap]} (x / K + nu K), minus
    nu budget (elementwise). h(x) = 2 sqrt(nu x) where x < min(nu cap^2, 1 / nu) (K = sqrt(x / nu)), x / cap + nu cap
    where nu cap^2 <= x < 1 / nu (K = cap), 1 + nu x where x >= 1 / nu (K = x); sums of the linear pieces are exact,
    the sum of sqrt(x) over lo .. e is bounded below by the integral of sqrt over [lo - 1/2, e + 1/2] (sqrt is
    concave: sqrt(x) >= its mean over [x - 1/2, x + 1/2], Jensen)."""
    nu = np.maximum(nu, 1e-300)
    s1 = np.minimum(nu * cap * cap, 1.0 / nu)  # below: the square-root piece
    e1 = np.minimum(np.ceil(s1) - 1, hi)  # last integer of the square-root piece
    e2 = np.minimum(np.ceil(1.0 / nu) - 1, hi)  # last integer below 1 / nu (K = cap between e1 and e2)
    a1 = np.maximum(lo - 0.5, 0.0)
    sq = np.where(e1 >= lo, (2.0 / 3.0) * (np.maximum(e1 + 0.5, 0.0) ** 1.5 - a1**1.5), 0.0)
    mid_lo = np.maximum(lo, e1 + 1)
    mid = _sum_range(mid_lo, e2, 1) / cap + nu * cap * _sum_range(mid_lo, e2, 0)
    top_lo = np.maximum(lo, e2 + 1)
    top = _sum_range(top_lo, hi, 0) + nu * _sum_range(top_lo, hi, 1)
    return 2.0 * np.sqrt(nu) * sq + mid + top - nu * budget


def step_share_floor(
    prompt: np.ndarray, out: np.ndarray, cap: float, budget: np.ndarray, iters: int = 60
) -> np.ndarray:
    """Per request i, a lower bound on m_i = min sum_g x_g / K_g over K_g in [x_g, cap] with sum_g K_g <= budget_i,
    x_g = p_i .. p_i + o_i - 2 (its KV in its decode steps): its share of the decode steps of its instance, each
    step split among its requests by KV (`slo_fluid_bound`, step (S2)). A convex problem: for any nu >= 0, weak
    duality gives m_i >= sum_g min_{K in [x_g, cap]} (x_g / K + nu K) - nu budget_i (`_share_dual` bounds that
    below in closed form). That function of nu is concave; a golden-section search over nu in [0, 1 / p_i] finds
    its maximum up to tolerance (past 1 / p_i every K is x_g and it does not increase where the request is
    feasible alone), and whatever nu it stops at, the value is a valid lower bound. nu = 0 gives X_i / cap, the
    bound without the budget. Where budget_i >= (o_i - 1) cap (every step may run full) X_i / cap is exact."""
    lo, hi = prompt.astype(np.float64), (prompt + out - 2).astype(np.float64)
    steps = np.maximum(out - 1, 0)
    res = _sum_range(lo, hi, 1) / cap  # X_i / cap
    todo = np.flatnonzero((steps > 0) & (budget < steps * cap))
    if todo.size == 0:
        return res
    lo_t, hi_t, bud = lo[todo], hi[todo], budget[todo]

    def dual(nu: np.ndarray) -> np.ndarray:
        return _share_dual(lo_t, hi_t, cap, bud, nu)

    g = (math.sqrt(5) - 1) / 2
    a_, b_ = np.zeros(todo.size), 1.0 / np.maximum(lo_t, 1.0)
    c_, d_ = b_ - g * (b_ - a_), a_ + g * (b_ - a_)
    fc, fd = dual(c_), dual(d_)
    best = np.maximum(res[todo], np.maximum(fc, fd))
    for _ in range(iters):
        left = fc >= fd  # the maximum lies in [a, d]: d becomes b, c becomes d
        a_, b_ = np.where(left, a_, c_), np.where(left, d_, b_)
        new_c, new_d = b_ - g * (b_ - a_), a_ + g * (b_ - a_)
        probe = np.where(left, new_c, new_d)
        fp = dual(probe)
        fc, fd = np.where(left, fp, fd), np.where(left, fc, fp)
        c_, d_ = np.where(left, new_c, d_), np.where(left, c_, new_d)
        best = np.maximum(best, fp)
    res[todo] = best
    return res


def slo_fluid_bound(
    work,
    cfg: SimConfig,
    slo: SLO,
    attainment: float = 0.9,
    k_max: int = 32,
    serve_all: bool = False,
    sample: int | None = None,
    seed: int = 0,
) -> dict:
    """An upper bound on goodput under `slo` (the highest arrival rate at which a fraction q = `attainment` of
    requests meet it), valid for any placement, admission, retraction and migration policy on cluster `cfg` (D
    decode instances of C KV tokens, step time a + b n + c K); <= `bounds.fluid_bound(work, cfg, attainment)`.

    Facts used: those of `fluid_bound` (F1: a request's o - 1 decode steps, in the g-th of which its KV holds
    x = p + g - 1 tokens, on one instance, the step lasting at least a + b n + c K, n >= 1 its batch and K >= x the
    KV of the batch's requests; F2: an instance holds at most C KV tokens and runs one step at a time), and
    (F3) a request's decode steps lie between its first token and its last, one after another (one instance at a
    time, one step at a time), each ending in one of its tokens: sum of its step times <= (o - 1) TPOT, and each
    step time <= its token gap, so <= its max ITL.
    Let S be the requests meeting the SLO; for i in S, with tau the TPOT limit and I the ITL limit (infinite if
    the SLO has none):
    (S1) i alone: (o - 1)(a + b) + c X_i <= (o - 1) tau and a + b + c (p + o - 2) <= I (F1, F3; X_i = sum of
         its x). A request failing this is in no S: its selection variable is 0.
    (S2) step count. Every step s of every instance has K_s > 0 KV tokens, the sum of its requests' x, so it
         counts 1 = sum over its requests j of x_js / K_s; the number of steps M is at least the sum over i in S
         and over i's steps of x_is / K_s. For i in S, K_s lies in [x_is, C_I], C_I = min(C, (I - a - b) / c)
         (F2; F3 with ITL), and sum over i's steps of K_s <= B_i = (o - 1)(tau - a - b) / c (F3: sum of
         (a + b n_s + c K_s) <= (o - 1) tau, n_s >= 1). So i's share is at least m_i = min of sum_g x_g / K_g
         under those constraints, bounded below by `step_share_floor` (weak duality; m_i >= X_i / C_I, which is
         all fluid_bound's "time" uses).
    (T)  an instance's steps take at most its time, and sum over its steps of (a + b n_s + c K_s) >= a M +
         b (sum of n_s) + c (sum of K_s) >= sum over its S requests of a m_i + b (o_i - 1) + c X_i (steps with
         requests outside S only add). Summed over instances: sum over S of t_i <= D H', t_i that bracket.
    (Tk) as fluid_bound's time_k: a step holding a request of S has K_s <= C_I, so at most k of its requests hold
         more than C_I / (k + 1) tokens; summed: sum over S of (a (i's steps above C_I / (k + 1)) / k + b (o - 1) +
         c X_i) <= D H'.
    (KV), (k) as fluid_bound (its constraints, with C_I in (k) by the same argument as (Tk)).
    Selection. Let requests arrive at rate lambda for a time H, their mix the sample's n requests (each request
    i of the sample standing for a type arriving at rate lambda / n), and let y_i in [0, 1] be the fraction of
    type i's arrivals in S. Then sum y_i >= q n, and for every constraint r (capacity R_r: D C for (KV), k D for
    (k), D for (T) and (Tk); demand d_ri per request), lambda / n x sum_i y_i d_ri <= R_r (1 + L / H), L the
    longest SLO-meeting latency (S's steps lie in [0, H + L]). As H grows, lambda <= n / z for the SAME y in
    every constraint, z = max_r sum_i y_i d_ri / R_r. The bound is n / z*, z* the least z over y in [0, 1]^n with
    sum y_i >= q n and y_i = 0 where (S1) fails: a linear program (scipy's HiGHS), a relaxation of the integral
    choice of S. It is <= fluid_bound (equal at most): each row's demands here are at least fluid_bound's (S2 and
    C_I only raise them), and one y for all rows costs each row at least its own cheapest q-fraction, which is
    what fluid_bound charges it (fluid_bound rounds q n up to whole requests; the program does not, so where
    q n is not whole the program may exceed it by less than one request's share).
    serve_all=True: an ASSUMPTION, not any policy: every request is decoded within the window (the backlog is
    o(H)), so requests outside S are counted too, with their plain demands (S1 and S2 do not apply to them); the
    bound is then one on such schedules only.
    `sample`: the number of requests drawn (without replacement, `seed`) from `work` to build the program; the
    bound is then that of the sample's mix (a statistic of the workload's, not a bound on it). None: all.
    The cost model's step-time floor (a + b n + c K) is the simulator's; on a real server the bound holds as far
    as that model does. Returns {"rate", "binding", "constraints": the rate each constraint alone would allow
    with the program's selection, "attainment", "slo", "infeasible_alone": the fraction of requests (S1) rules
    out, "serve_all", "requests": requests in the program}, req/s.
    """
    if not 0 < attainment <= 1:
        raise ValueError(f"attainment must be in (0, 1], got {attainment}")
    prompt, out = clipped_lengths(work, cfg)
    if sample is not None and sample < prompt.size:
        pick = np.sort(np.random.default_rng(seed).choice(prompt.size, sample, replace=False))
        prompt, out = prompt[pick], out[pick]
    n = prompt.size
    d, cap = cfg.n_decode, float(cfg.cost.kv_capacity_tokens)
    a, b, c = cfg.cost.step_base_s, cfg.cost.step_per_request_s, cfg.cost.step_per_kv_token_s
    itl = math.inf if slo.itl_s is None else slo.itl_s
    cap_i = min(cap, (itl - a - b) / c) if c > 0 and math.isfinite(itl) else cap
    ks = np.arange(1, k_max + 1)
    plain = request_demands(prompt, out, cfg.cost, cap / (ks + 1))
    dem = request_demands(prompt, out, cfg.cost, max(cap_i, 0.0) / (ks + 1))
    ok = _alone_feasible(prompt, out, plain, cfg, slo)
    steps = plain["steps"]
    if slo.tpot_s is not None and c > 0:
        budget = steps * (slo.tpot_s - a - b) / c
    else:
        budget = np.full(n, np.inf)
    share = np.zeros(n)
    share[ok] = step_share_floor(prompt[ok], out[ok], max(cap_i, 1.0), budget[ok])
    linear = b * steps + c * plain["kv_steps"]
    # rows: (name, capacity, demand if in S, demand if served outside S)
    rows = [("kv", d * cap, plain["kv_time"], plain["kv_time"]), ("time", d, a * share + linear,
            a * plain["kv_steps"] / cap + linear)]  # fmt: skip
    for j, k in enumerate(ks):
        rows.append((f"k{k}", k * d, dem["above"][j], plain["above"][j]))
        rows.append((f"time_k{k}", d, a * dem["above_steps"][j] / k + linear, a * plain["above_steps"][j] / k + linear))
    rows = [r for r in rows if np.any(r[2][ok] > 0) or (serve_all and np.any(r[3] > 0))]
    need = math.ceil(attainment * n - 1e-9)
    if ok.sum() < need:
        return {"rate": 0.0, "binding": "alone", "constraints": {}, "attainment": attainment, "slo": slo.name,
                "infeasible_alone": float(1 - ok.mean()), "serve_all": serve_all, "requests": n}  # fmt: skip
    # variables: y_i (i in S-able), z. Row r: sum_i y_i (in_i - out_i) / R + sum out / R - z <= 0
    idx = np.flatnonzero(ok)
    a_ub, b_ub = [], []
    for _, cap_r, d_in, d_out in rows:
        base = d_out.sum() / cap_r if serve_all else 0.0
        coef = (d_in[idx] - (d_out[idx] if serve_all else 0.0)) / cap_r
        a_ub.append(np.append(coef, -1.0))
        b_ub.append(-base)
    a_ub.append(np.append(-np.ones(idx.size), 0.0))  # |S| >= q lambda H: sum y >= q n
    b_ub.append(-attainment * n)
    scale = max(1.0, max(np.abs(r).max() for r in a_ub[:-1]))
    cost_vec = np.zeros(idx.size + 1)
    cost_vec[-1] = 1.0
    lp = linprog(cost_vec, A_ub=np.array(a_ub) / scale, b_ub=np.array(b_ub) / scale,
                 bounds=[(0, 1)] * idx.size + [(0, None)], method="highs")  # fmt: skip
    if lp.status != 0:
        raise RuntimeError(f"slo_fluid_bound: linear program failed: {lp.message}")
    y = np.zeros(n)
    y[idx] = np.clip(lp.x[:-1], 0, 1)
    z_lp = lp.fun * 1.0
    rates = {}
    for name, cap_r, d_in, d_out in rows:
        used = (y * d_in).sum() + (((1 - y) * d_out).sum() if serve_all else 0.0)
        rates[name] = math.inf if used <= 0 else n * cap_r / used
    binding = min(rates, key=rates.get)
    # the bound is n / z*; of the solver's z and the z its y gives, the smaller (the solver's tolerances, ~1e-7)
    rate = max(n / z_lp if z_lp > 0 else math.inf, rates[binding])
    return {
        "rate": rate,
        "binding": binding,
        "constraints": rates,
        "attainment": attainment,
        "slo": slo.name,
        "infeasible_alone": float(1 - ok.mean()),
        "serve_all": serve_all,
        "requests": n,
    }
