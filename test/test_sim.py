"""Simulator: a hand-computed scenario, conservation, retraction, migration and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from ares.sim.cost_model import CostModel, get_cost_model
from ares.sim.engine import ClusterSim, SimConfig, simulate
from ares.sim.metrics import SLO, request_latencies, summarize
from ares.workloads import Workload, load_workload
from ares_router.policy import LeastKVDispatch, NoRebalance, Policy


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


@pytest.mark.parametrize("retraction", ["backup", "recompute"])
def test_retraction_conserves(retraction):
    cost = CostModel("tiny", 0.01, 0.0, 0.0, 0.0, 0.001, 200, 1.0, 1e30, 0.0)
    # max_tokens = the output length: with none given, SGLang's single-request term (4096 new tokens, capped by
    # the 200-token pool) would keep the second request out until the first finishes, and nothing would retract.
    cfg = SimConfig(
        n_decode=1,
        cost=cost,
        reserve_tokens=0,
        retract_steps=1,
        retraction=retraction,
        check_invariants=True,
        max_tokens="output",
    )
    res = simulate(wl([0.0, 0.0], [50, 50], [100, 100]), cfg)
    assert res.retractions.sum() >= 1
    assert np.all(res.generated == res.output)
    assert np.all(np.isfinite(res.t_finish))


@pytest.mark.parametrize(("contention", "first"), [(True, [0.1, 0.2]), (False, [0.1, 0.11])])
def test_prefill_transfers_share_the_decode_nic(contention, first):
    # Two prompts of 10 tokens prefill at once (no prefill time) on two prefill instances for one decode instance;
    # 100 B/s links, 1 B per token: each transfer takes 0.1 s. Sharing the decode NIC, the second waits for the
    # first (0.1 -> 0.2 s) and joins at once (the decode is idle again after req0's one 10 ms step); with a link
    # each, both arrive at 0.1 s and req1 joins at the next step boundary (0.11 s). (max_tokens = the output: with
    # none, SGLang's single-request term would hold req1's preallocation back until req0 is done.)
    cost = CostModel("toy", 0.01, 0.0, 0.0, 0.0, 0.0, 1000, 1.0, 100.0, 0.0)
    cfg = SimConfig(
        n_decode=1, n_prefill=2, cost=cost, reserve_tokens=0, link_contention=contention, max_tokens="output"
    )
    res = simulate(wl([0.0, 0.0], [10, 10], [2, 2]), cfg)
    assert res.t_first == pytest.approx(first)
    assert res.t_finish == pytest.approx([f + 0.01 for f in first])


def test_migration_queues_behind_transfers_on_both_nics():
    # A migration ready at 0.5 s from decode 0 to decode 1 (setup 0.05 s, pause 0.02 s, 10 tokens = 0.1 s):
    # decode 1's incoming side is busy until 1.0 s (a prefill transfer), so the copy runs 1.0-1.1 s and holds
    # decode 0's outgoing side until then; with its own link it would run 0.55-0.65 s.
    cost = CostModel("toy", 0.01, 0.0, 0.0, 0.0, 0.0, 1000, 1.0, 100.0, 0.02, migration_setup_s=0.05)
    for contention, end in [(True, 1.1), (False, 0.65)]:
        sim = ClusterSim(wl([0.0], [10], [2]), SimConfig(n_decode=2, cost=cost, link_contention=contention))
        sim.link_d_in[1] = 1.0
        assert sim._transfer(0.5 + cost.migration_setup_s, sim.link_d_out, 0, 1, 10) == pytest.approx(end)
        assert sim.link_d_out[0] == pytest.approx(1.1 if contention else 0.0)


def test_late_binding_waits_at_the_router_for_the_first_instance_with_room():
    # 10 ms steps, 1000-token pools, no max_tokens: SGLang's single-request term (4096 new tokens, capped by the
    # pool) admits nothing beside a running request. A (prompt 400, 500 tokens) and B (400, 50) start at 0 on
    # instances 0 and 1; B ends at 0.49 s, A at 4.99 s. C (300, 5 tokens) arrives at 0.1 s when neither admits.
    # least_kv sends it to the least used (a tie: instance 0), where it waits for A: first token 4.99 s. Holding
    # it, the router places it at the first poll that sees B's instance empty (0.5 s): first token 0.5 s, done
    # after 4 steps.
    cost = CostModel("toy", 0.01, 0.0, 0.0, 0.0, 0.0, 1000, 1.0, 1e30, 0.0)
    work = wl([0.0, 0.0, 0.1], [400, 400, 300], [500, 50, 5])
    hold = Policy("least_kv_hold", LeastKVDispatch(), NoRebalance(), hold_when_full=True)
    for policy, first_c in [("least_kv", 4.99), (hold, 0.5)]:
        cfg = SimConfig(n_decode=2, n_prefill=1, cost=cost, reserve_tokens=0, policy=policy, check_invariants=True)
        res = simulate(work, cfg)
        assert res.t_first[2] == pytest.approx(first_c)
        assert res.t_finish[:2] == pytest.approx([4.99, 0.49])
        assert res.t_finish[2] == pytest.approx(first_c + 0.04)


def _r1(rate=3.0, duration=600.0, seed=0):
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
