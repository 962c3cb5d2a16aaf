"""The fluid bound (`ares.sim.bounds.fluid_bound`) and the SLO-aware bound (`ares.sim.slo_bound.slo_fluid_bound`):
hand-computed cases, and the facts they rest on checked on simulated runs (no schedule the simulator produced
spends less than the bounds say any schedule must)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ares.sim.bounds import clipped_lengths, fluid_bound, request_demands
from ares.sim.cost_model import CostModel
from ares.sim.engine import SimConfig, simulate
from ares.sim.metrics import SLO, meets_slo
from ares.sim.slo_bound import slo_fluid_bound, step_share_floor
from ares.workloads import Workload

# 10 ms per step whatever the batch (a = 0.01, b = c = 0), 1000 KV tokens per instance, no reserve.
FLAT = CostModel("flat", 0.01, 0.0, 0.0, 0.0, 0.0, 1000, 1.0, 1e30, 0.0)


def _work(prompts, outs) -> Workload:
    n = len(prompts)
    return Workload("toy", np.linspace(0, 1, n), np.array(prompts), np.array(outs))


def test_small_requests_are_bound_by_kv_time():
    # p = 100, o = 11: 10 decode steps with x = 100 .. 109 KV tokens, 10 ms each: 10.45 token-seconds. One
    # instance of 1000 tokens: lambda <= 1000 / 10.45 = 95.7 req/s; no step is above C / 2.
    # (With b = c = 0 the instance-time constraint says the same: 1045 KV-token-steps need 1.045 full steps.)
    b = fluid_bound(_work([100] * 4, [11] * 4), SimConfig(n_decode=1, cost=FLAT, reserve_tokens=0), attainment=1.0)
    assert b["constraints"]["kv"] == pytest.approx(1000 / 10.45) and b["rate"] == pytest.approx(1000 / 10.45)
    assert b["constraints"]["time"] == pytest.approx(1000 / 10.45) and b["constraints"]["k1"] == np.inf


def test_instance_time_binds_when_steps_cost_per_token():
    # a = 10 ms, b = 1 ms per request, c = 10 us per KV token. p = 100, o = 11: 10 steps, X = 1045 KV-token-steps.
    # Time: 0.01 x 1045 / 1000 + 0.001 x 10 + 1e-5 x 1045 = 0.0309 s per request: lambda <= 32.36. KV-time:
    # sum of x (0.011 + 1e-5 x) = 0.011 x 1045 + 1e-5 x 109285 = 12.588 token-s: lambda <= 79.4.
    cost = CostModel("lin", 0.01, 0.001, 1e-5, 0.0, 0.0, 1000, 1.0, 1e30, 0.0)
    b = fluid_bound(_work([100] * 4, [11] * 4), SimConfig(n_decode=1, cost=cost, reserve_tokens=0), attainment=1.0)
    assert b["constraints"]["time"] == pytest.approx(1 / 0.0309)
    assert b["constraints"]["kv"] == pytest.approx(1000 / 12.58785)
    assert b["binding"] == "time"


def test_per_instance_capacity_binds_where_the_pool_would_pack():
    # p = 400, o = 11: every step holds 400 .. 409 tokens > C / 3: at most two such requests per instance at a
    # time, each for 10 steps of 10 ms: lambda <= 2 x D / 0.1 s. KV-time alone allows D x 1000 / 40.45 (a pool of
    # D x 1000 tokens packs D x 2.44 of them).
    for d in (1, 2):
        b = fluid_bound(_work([400] * 4, [11] * 4), SimConfig(n_decode=d, cost=FLAT, reserve_tokens=0), 1.0)
        assert b["constraints"]["k2"] == pytest.approx(2 * d / 0.1)
        assert b["constraints"]["kv"] == pytest.approx(d * 1000 / 40.45)
        assert b["rate"] == pytest.approx(20 * d) and b["constraints"]["time_k2"] == pytest.approx(20 * d)


def test_attainment_counts_only_the_cheapest_requests():
    # Half the requests tiny (p = 10, o = 2: one step of 10 tokens = 0.1 token-s), half big (p = 400, o = 11).
    # With 50% attainment the big ones may all miss: half the arrivals cost 0.1 token-s each, so
    # lambda / 2 x 0.1 <= 1000: lambda <= 20,000 req/s. With full attainment the big ones count: 1000 / 20.275.
    work = _work([10, 400, 10, 400], [2, 11, 2, 11])
    b = fluid_bound(work, SimConfig(n_decode=1, cost=FLAT, reserve_tokens=0), attainment=0.5)
    assert b["constraints"]["kv"] == pytest.approx(20_000) and b["rate"] == pytest.approx(20_000)
    full = fluid_bound(work, SimConfig(n_decode=1, cost=FLAT, reserve_tokens=0), attainment=1.0)
    assert full["constraints"]["kv"] == pytest.approx(1000 / ((0.1 + 40.45) / 2))


@pytest.mark.parametrize("policy", ["least_kv", "round_robin", "ares"])
def test_simulated_schedules_respect_the_bounds_resource_facts(policy):
    # A loaded 2-instance cluster (step 10 ms + 2e-5 s per KV token, 6000 tokens each), requests of every size:
    # over the run, the finished requests' KV-time never exceeds D C x the run's length, and their time above
    # C / (k + 1) never exceeds k D x the run's length (the two facts the bound rests on).
    rng = np.random.default_rng(5)
    n = 120
    cost = CostModel("toy", 0.01, 0.0005, 2e-5, 0.01, 2e-5, 6000, 1.0, 1e5, 0.01)
    work = Workload("mix", np.sort(rng.uniform(0, 20, n)), rng.integers(50, 2500, n), rng.integers(2, 3000, n))
    cfg = SimConfig(n_decode=2, cost=cost, policy=policy, reserve_tokens=0)
    res = simulate(work, cfg)
    done = np.isfinite(res.t_finish)  # (the facts hold for any set of served requests)
    assert done.sum() > n // 2
    prompt, out = clipped_lengths(work, cfg)
    np.testing.assert_array_equal(prompt, res.prompt)
    np.testing.assert_array_equal(out, res.output)
    ks = np.arange(1, 9)
    dem = request_demands(prompt[done], out[done], cost, cost.kv_capacity_tokens / (ks + 1))
    span = res.end_time
    assert dem["kv_time"].sum() <= 2 * cost.kv_capacity_tokens * span
    assert np.all(dem["above"].sum(axis=1) <= ks * 2 * span)
    a, b, c, cap = cost.step_base_s, cost.step_per_request_s, cost.step_per_kv_token_s, cost.kv_capacity_tokens
    linear = b * dem["steps"].sum() + c * dem["kv_steps"].sum()
    assert a * dem["kv_steps"].sum() / cap + linear <= 2 * span
    assert np.all(a * dem["above_steps"].sum(axis=1) / ks + linear <= 2 * span)
    # and the bound's rate is a rate: finished requests per second over the run stay under it at full attainment
    assert done.sum() / span <= fluid_bound(work, cfg, attainment=1.0)["rate"]


# ---------------------------------------------------------------------------------------------------------------------
# The SLO-aware bound (`ares.sim.slo_bound.slo_fluid_bound`).

# a = 10 ms, b = 0, c = 10 us per KV token, 1000 tokens per instance: a step with K tokens lasts 10 ms + K x 10 us.
LIN = CostModel("lin", 0.01, 0.0, 1e-5, 0.0, 0.0, 1000, 1.0, 1e30, 0.0)


def test_slo_bound_tpot_limits_how_full_a_requests_steps_run():
    # p = 100, o = 11: steps with x = 100 .. 109 KV tokens (X = 1045). TPOT <= 15 ms allows its 10 steps a KV sum
    # of B = 10 x (0.015 - 0.01) / 1e-5 = 5000 tokens: K_g = sqrt(x_g) x 5000 / sum sqrt(x) minimises its share of
    # its steps, sum x_g / K_g = (sum sqrt(x_g))^2 / 5000 = 2.089 steps (vs 1045 / 1000 = 1.045 if every step ran
    # full). Instance time per request: 0.01 x 2.089 + 1e-5 x 1045 = 0.0314 s: lambda <= 31.9 req/s (fluid_bound's
    # time: 0.01 x 1.045 + 0.01045 = 0.0209 s, 47.8 req/s).
    work = _work([100] * 4, [11] * 4)
    cfg = SimConfig(n_decode=1, cost=LIN, reserve_tokens=0)
    share = sum(math.sqrt(x) for x in range(100, 110)) ** 2 / 5000
    slo = SLO(1.0, 3.0, tpot_s=0.015)
    b = slo_fluid_bound(work, cfg, slo, attainment=1.0)
    exact = 1 / (0.01 * share + 1e-5 * 1045)
    # (the bound's share is a lower bound on the exact minimum, so its rate is at least the exact one's)
    assert b["binding"] == "time" and exact <= b["rate"] <= exact * (1 + 1e-4)
    assert fluid_bound(work, cfg, attainment=1.0)["rate"] == pytest.approx(1 / 0.0209)
    # a TPOT limit that lets every step run full adds nothing: 10 ms + 1000 x 10 us = 20 ms per full step
    loose = slo_fluid_bound(work, cfg, SLO(1.0, 3.0, tpot_s=0.0201), attainment=1.0)
    assert loose["rate"] == pytest.approx(1 / 0.0209)


def test_slo_bound_leaves_out_requests_that_miss_the_slo_alone():
    # Half the requests p = 100, o = 11 (mean step alone 11.05 ms), half p = 900, o = 11 (mean x = 904.5: 19.05 ms
    # alone > TPOT 15 ms: they meet it under no schedule). At 50% attainment only the small ones can count: the
    # bound is the previous test's, per arriving request halved: 2 x 31.9. Above 50% no schedule reaches it: 0.
    work = _work([100, 900] * 2, [11, 11] * 2)
    cfg = SimConfig(n_decode=1, cost=LIN, reserve_tokens=0)
    slo = SLO(1.0, 3.0, tpot_s=0.015)
    half = slo_fluid_bound(work, cfg, slo, attainment=0.5)
    share = sum(math.sqrt(x) for x in range(100, 110)) ** 2 / 5000
    assert half["infeasible_alone"] == 0.5
    assert half["rate"] == pytest.approx(2 / (0.01 * share + 1e-5 * 1045), rel=1e-3)
    assert slo_fluid_bound(work, cfg, slo, attainment=0.75)["rate"] == 0.0
    # fluid_bound counts resources only: at 50% it may keep the big ones' steps as cheap as the small ones'
    assert fluid_bound(work, cfg, attainment=0.5)["rate"] > half["rate"]


def test_slo_bound_one_selection_for_every_constraint():
    # One instance, FLAT steps (10 ms, 1000 tokens). Type A: p = 450, o = 4: 3 steps of 450 .. 452 tokens, all above
    # C / 3 (at most 2 such per instance): KV-time 13.53 token-s (0.01353 of the pool's second), k2 and time_k2
    # 0.015 each. Type B: p = 10, o = 201: KV-time 219 token-s (0.219), nothing above C / 3. Two of each, 50%
    # attainment. fluid_bound takes A for its KV row (2 x 13.53 / 4 per arrival: 147.8 req/s) and B for k2 (free).
    # One selection, t of B and 2 - t of A: z = max(0.02706 + 0.20547 t, 0.03 - 0.015 t), least at t = 0.013335:
    # z = 0.0298, lambda <= 4 / z = 134.2 req/s.
    work = _work([450, 10] * 2, [4, 201] * 2)
    cfg = SimConfig(n_decode=1, cost=FLAT, reserve_tokens=0)
    fb = fluid_bound(work, cfg, attainment=0.5)
    sb = slo_fluid_bound(work, cfg, SLO(1.0, 3.0), attainment=0.5)
    assert fb["rate"] == pytest.approx(1000 / (2 * 13.53 / 4))
    t = (0.03 - 0.02706) / (0.20547 + 0.015)
    assert sb["rate"] == pytest.approx(4 / (0.03 - 0.015 * t), rel=1e-6)
    # every constraint at the program's selection allows at least its rate
    assert all(r >= sb["rate"] * (1 - 1e-6) for r in sb["constraints"].values())


@pytest.mark.parametrize("tpot", [0.05, 0.08, None])
def test_slo_bound_is_below_the_fluid_bound(tpot):
    rng = np.random.default_rng(11)
    n = 200  # q n = 180: fluid_bound's ceil(q n) is q n
    cost = CostModel("toy", 0.01, 0.0005, 2e-5, 0.01, 2e-5, 6000, 1.0, 1e5, 0.01)
    work = Workload("mix", np.sort(rng.uniform(0, 20, n)), rng.integers(50, 2500, n), rng.integers(2, 3000, n))
    for d in (1, 3):
        cfg = SimConfig(n_decode=d, cost=cost, reserve_tokens=0)
        for q in (0.9, 1.0):
            sb = slo_fluid_bound(work, cfg, SLO(1.0, 3.0, tpot_s=tpot), attainment=q)
            assert sb["rate"] <= fluid_bound(work, cfg, attainment=q)["rate"] * (1 + 1e-7)
            every = slo_fluid_bound(work, cfg, SLO(1.0, 3.0, tpot_s=tpot), attainment=q, serve_all=True)
            assert every["rate"] <= sb["rate"] * (1 + 1e-7)


def test_step_share_floor_is_below_the_exact_minimum():
    # the closed-form dual bound against the exact optimum (K = clip(sqrt(x / nu), x, C), nu by bisection)
    rng = np.random.default_rng(2)
    p, o, cap = rng.integers(1, 3000, 40), rng.integers(2, 2000, 40), 6000.0
    budget = (o - 1) * 0.6 * cap
    floor = step_share_floor(p, o, cap, budget)
    for i in range(p.size):
        x = np.arange(p[i], p[i] + o[i] - 1, dtype=float)
        if x.sum() > budget[i]:
            continue  # infeasible alone: the bound leaves the request out
        lo, hi = 1e-300, 1.0
        for _ in range(200):
            nu = math.sqrt(lo * hi)
            lo, hi = (nu, hi) if np.clip(np.sqrt(x / nu), x, cap).sum() > budget[i] else (lo, nu)
        exact = (x / np.clip(np.sqrt(x / hi), x, cap)).sum()
        assert x.sum() / cap <= floor[i] <= exact * (1 + 1e-9)
        assert floor[i] >= exact * 0.99


def _toy_run(policy: str, rate_scale: float = 1.0, n: int = 100, seed: int = 5):
    rng = np.random.default_rng(seed)
    cost = CostModel("toy", 0.01, 0.0005, 2e-5, 0.01, 2e-5, 6000, 1.0, 1e5, 0.01)
    work = Workload("mix", np.sort(rng.uniform(0, 20 / rate_scale, n)), rng.integers(50, 2500, n),
                    rng.integers(2, 1500, n))  # fmt: skip
    cfg = SimConfig(n_decode=2, cost=cost, policy=policy, reserve_tokens=0)
    return work, cfg, simulate(work, cfg)


@pytest.mark.parametrize("policy", ["least_kv", "ares"])
def test_simulated_slo_meeting_requests_fit_the_bounds_constraints(policy):
    # The requests a simulated run served within TPOT 80 ms (steps: 10 ms + 0.5 ms per request + 20 us per KV token,
    # 6000 tokens: a full step is >= 130 ms, so they cannot run full) spend at least what the bound charges them:
    # their step shares (S2) and tokens fit the instances' time over the run, and their KV-time the pools'.
    slo = SLO(1e9, 0.0, tpot_s=0.08)  # TTFT unbounded: any finished request within the TPOT limit is in S
    work, cfg, res = _toy_run(policy)
    cost = cfg.cost
    ok = meets_slo(res, slo, cost)
    assert ok.sum() > 10
    p, o = res.prompt[ok].astype(float), res.output[ok].astype(float)
    a, b, c, cap = cost.step_base_s, cost.step_per_request_s, cost.step_per_kv_token_s, cost.kv_capacity_tokens
    dem = request_demands(p, o, cost, np.array([cap / 2]))
    share = step_share_floor(p, o, float(cap), (o - 1) * (slo.tpot_s - a - b) / c)
    assert share.sum() > 1.05 * dem["kv_steps"].sum() / cap  # the TPOT limit binds in this run
    assert (a * share + b * dem["steps"] + c * dem["kv_steps"]).sum() <= 2 * res.end_time
    assert dem["kv_time"].sum() <= 2 * cap * res.end_time


@pytest.mark.parametrize("policy", ["least_kv", "round_robin"])
def test_simulated_attainment_above_the_bound_is_short(policy):
    # Arrivals faster than the bound (q = 0.9, TPOT 80 ms): the run's attainment stays under 0.9.
    slo = SLO(1.0, 3.0, tpot_s=0.08)
    work, cfg, _ = _toy_run(policy)
    bound = slo_fluid_bound(work, cfg, slo, attainment=0.9)["rate"]
    assert bound < fluid_bound(work, cfg, attainment=0.9)["rate"]
    scale = 1.2 * bound / work.rate
    fast, _, res = _toy_run(policy, rate_scale=scale)
    assert fast.rate > bound
    ok = meets_slo(res, slo, cfg.cost)
    assert ok.mean() < 0.9
