"""Simulator: a hand-computed scenario, conservation, retraction, migration and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from ares.sim.cost_model import CostModel, get_cost_model
from ares.sim.engine import SimConfig, simulate
from ares.sim.metrics import SLO, request_latencies, summarize
from ares.workloads import Workload, load_workload, traces_dir


def toy_cost(a=0.01, b=0.0, c=0.0, cap=100_000) -> CostModel:
    """No prefill time, an infinitely fast link: only decode steps take time."""
    return CostModel("toy", a, b, c, 0.0, 0.0, cap, 1.0, 1e30, 0.0)


def wl(arrivals, prompts, outputs) -> Workload:
    return Workload("toy", np.array(arrivals, float), np.array(prompts), np.array(outputs))


def test_hand_computed_two_requests():
    # step = 10 ms + 1 ms per running request. req0 (out 5 = 1 prefill token + 4 steps) starts at 0 alone
    # (11 ms steps: 11, 22, ...). req1 arrives at 5 ms, mid step 1: as in SGLang's PD decode, its KV is
    # preallocated at the next step boundary (11 ms), only then prefill and transfer run (instant here), and it
    # joins the batch at the boundary after that (22 ms). With both running steps take 12 ms (34, 46): req0
    # finishes at 46 ms; req1 (out 4: 3 steps) needs a third step alone (11 ms): 57 ms.
    res = simulate(wl([0.0, 0.005], [10, 10], [5, 4]), SimConfig(n_decode=1, cost=toy_cost(b=0.001), reserve_tokens=0))
    assert res.t_first == pytest.approx([0.0, 0.022], abs=1e-12)
    assert res.t_finish == pytest.approx([0.046, 0.057])
    lat = request_latencies(res)
    assert lat["tpot"] == pytest.approx([0.046 / 4, 0.035 / 3])
    assert lat["ttft"] == pytest.approx([0.0, 0.017], abs=1e-12)


def test_kv_term_is_integrated_in_closed_form():
    # step = 10 ms + 0.1 ms per KV token; the KV grows 100 -> 101 -> 102 over the 3 steps
    res = simulate(wl([0.0], [100], [4]), SimConfig(n_decode=1, cost=toy_cost(c=1e-4), reserve_tokens=0))
    assert res.t_finish[0] == pytest.approx(0.020 + 0.0201 + 0.0202)


def test_retraction_recomputes_and_conserves():
    cost = CostModel("tiny", 0.01, 0.0, 0.0, 0.0, 0.001, 200, 1.0, 1e30, 0.0)
    # max_tokens = the output length: with none given, SGLang's single-request term (4096 new tokens, capped by
    # the 200-token pool) would keep the second request out until the first finishes, and nothing would retract.
    cfg = SimConfig(
        n_decode=1, cost=cost, reserve_tokens=0, retract_steps=1, check_invariants=True, max_tokens="output"
    )
    res = simulate(wl([0.0, 0.0], [50, 50], [100, 100]), cfg)
    assert res.retractions.sum() >= 1
    assert np.all(res.generated == res.output)
    assert np.all(np.isfinite(res.t_finish))


def _r1(rate=3.0, duration=600.0, seed=0):
    if not (traces_dir() / "servegen" / "deepseek-r1").is_dir():
        pytest.skip("shared trace data not available")
    return load_workload("r1", rate, duration, seed=seed)


@pytest.mark.parametrize(
    "policy", ["round_robin", "random", "least_kv", "current_migrate", "ares", "ares_true_lengths"]
)
def test_conservation_on_r1(policy):
    work = _r1()
    cost = get_cost_model("h100-llama2-7b")
    res = simulate(work, SimConfig(n_decode=4, cost=cost, policy=policy, check_invariants=True))
    assert np.all(np.isfinite(res.t_finish))  # every request finished ...
    assert len(res.t_finish) == len(work)  # ... exactly once (one slot per request)
    assert np.all(res.generated == res.output)  # tokens generated = requested
    assert np.all(res.t_first >= res.arrival) and np.all(res.t_finish >= res.t_first)
    s = summarize(res, SLO.for_cost(cost), cost)
    assert 0.0 <= s["slo_attainment"] <= 1.0 and s["finished_frac"] == 1.0


def test_migrations_happen_and_are_counted():
    work = _r1(rate=4.5)
    cost = get_cost_model("h100-llama2-7b")
    res = simulate(work, SimConfig(n_decode=4, cost=cost, policy="ares_true_lengths", check_invariants=True))
    assert res.migrations > 0 and res.bytes_moved > 0 and res.bytes_moved % cost.kv_bytes_per_token == 0
    assert res.migrations_per_request.sum() == res.migrations
    assert np.all(res.generated == res.output)


def test_same_seed_same_result_and_seed_matters():
    a = simulate(_r1(seed=1), SimConfig(n_decode=4, policy="random", seed=7))
    b = simulate(_r1(seed=1), SimConfig(n_decode=4, policy="random", seed=7))
    c = simulate(_r1(seed=1), SimConfig(n_decode=4, policy="random", seed=8))
    assert np.array_equal(a.t_finish, b.t_finish) and a.migrations == b.migrations
    assert not np.array_equal(a.t_finish, c.t_finish)
