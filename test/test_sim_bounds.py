"""The fluid bound (`ares.sim.bounds.fluid_bound`): hand-computed cases, and its two resource facts checked on
simulated runs (no schedule the simulator produced spends less than the bound says any schedule must)."""

from __future__ import annotations

import numpy as np
import pytest

from ares.sim.bounds import clipped_lengths, fluid_bound, request_demands
from ares.sim.cost_model import CostModel
from ares.sim.engine import SimConfig, simulate
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
