"""Policies on hand-made snapshots."""

from __future__ import annotations

import numpy as np
import pytest

from ares_router.policy import (
    POLICIES,
    InstanceState,
    LoadModel,
    NewRequest,
    NoHealthyInstance,
    PendingRequest,
    RunningRequest,
    build_snapshot,
    dispatch,
    get_policy,
    plan_rebalance,
)

CAP = 10_000


def inst(iid, reqs, cap=CAP, healthy=True, pending=()):
    """Instance from (length, predicted remaining or None) pairs."""
    rows = [RunningRequest(f"{iid}-{k}", length, 1, pred) for k, (length, pred) in enumerate(reqs)]
    return InstanceState.from_requests(iid, cap, None, rows, pending=pending, healthy=healthy)


def new(prompt=100, pred=None):
    return NewRequest("new", prompt, pred)


def test_registry_has_the_named_policies():
    assert set(POLICIES) >= {"round_robin", "random", "least_kv", "current_migrate", "ares", "oracle"}
    assert get_policy("oracle").needs_true_lengths and not get_policy("ares").needs_true_lengths
    with pytest.raises(KeyError):
        get_policy("nope")


@pytest.mark.parametrize("name", ["least_kv", "ares", "oracle"])
def test_ties_go_to_lowest_index_and_empty_instances_win(name):
    snap = build_snapshot([inst("a", [(500, 10)]), inst("b", []), inst("c", [])])
    assert dispatch(snap, new(), name) == "b"


def test_round_robin_follows_dispatch_count_and_skips_unhealthy():
    states = [inst("a", []), inst("b", [], healthy=False), inst("c", [])]
    snap = build_snapshot(states)
    picks = []
    for _ in range(4):
        picks.append(dispatch(snap, new(), "round_robin"))
        snap = snap.with_dispatch(snap.index_of(picks[-1]), new())
    assert picks == ["a", "c", "a", "c"]


def test_random_is_seeded_and_healthy_only():
    snap = build_snapshot([inst("a", []), inst("b", [], healthy=False), inst("c", [])])
    a = [dispatch(snap, new(), "random", rng=np.random.default_rng(3)) for _ in range(5)]
    b = [dispatch(snap, new(), "random", rng=np.random.default_rng(3)) for _ in range(5)]
    assert a == b and "b" not in a


def test_no_healthy_instance_raises():
    snap = build_snapshot([inst("a", [], healthy=False)])
    for name in POLICIES:
        with pytest.raises(NoHealthyInstance):
            dispatch(snap, new(), name)


def test_full_instance_is_avoided_even_if_predicted_to_drain():
    full = inst("full", [(9_950, 1)])  # frees everything next step, but cannot take 100 tokens now
    busy = inst("busy", [(6_000, 5_000)])
    snap = build_snapshot([full, busy])
    assert dispatch(snap, new(100), "ares") == "busy"
    assert dispatch(snap, new(100), "least_kv") == "busy"


def test_all_full_still_places_somewhere():
    snap = build_snapshot([inst("a", [(9_990, None)]), inst("b", [(9_995, None)])])
    assert dispatch(snap, new(100), "ares") == "a"


def test_no_predictions_falls_back_to_current_load():
    states = [
        inst("a", [(3_000, None)]),
        inst("b", [(1_000, None), (1_500, None)]),
        inst("c", [(2_000, None)]),
    ]
    snap = build_snapshot(states)
    assert dispatch(snap, new(), "ares") == dispatch(snap, new(), "least_kv") == "c"
    assert np.allclose(snap.demand[0], 3_000)  # flat: current load over the whole horizon


def test_ares_uses_predictions_where_least_kv_cannot():
    # a: lower now but its request grows for the whole horizon; b: higher now but finishing in 10 steps
    snap = build_snapshot([inst("a", [(2_000, 5_000)]), inst("b", [(3_000, 10)])], LoadModel(horizon_tokens=2048))
    assert dispatch(snap, new(), "least_kv") == "a"
    assert dispatch(snap, new(), "ares") == "b"


def test_demand_curve_bounds_the_peak_before_a_finish():
    lm = LoadModel(horizon_tokens=100, points=4)  # grid 0, 25, 50, 75, 100
    curve = lm.instance_curve(inst("a", [(1_000, 30), (500, 200)]))
    # interval (25, 50]: both alive at its start; sizes at most 1000+30 and 500+50
    assert curve[0] == 1_500 and curve[2] == 1_030 + 550
    assert curve[3] == 500 + 75  # the first one finished at 30


def test_pending_requests_spread_a_burst():
    snap = build_snapshot([inst("a", []), inst("b", [])])
    picks = []
    for k in range(4):
        r = NewRequest(k, 1_000)
        picks.append(dispatch(snap, r, "least_kv"))
        snap = snap.with_dispatch(snap.index_of(picks[-1]), r)
    assert picks == ["a", "b", "a", "b"]


def test_polled_pending_counts_as_load():
    a = inst("a", [], pending=[PendingRequest("p", 4_000)])
    snap = build_snapshot([a, inst("b", [(1_000, None)])])
    assert dispatch(snap, new(), "least_kv") == "b"
    assert dispatch(snap, new(), "ares") == "b"


def test_rebalance_moves_from_predicted_overload_and_respects_cost():
    hot = inst("hot", [(3_000, 4_000), (2_500, 4_000), (200, 5)])
    cold = inst("cold", [(500, 10)])
    snap = build_snapshot([hot, cold], LoadModel(horizon_tokens=4096))
    moves = plan_rebalance(snap, "ares")
    assert len(moves) == 1 and moves[0].source == 0 and moves[0].target == 1
    assert moves[0].request_id in ("hot-0", "hot-1")
    assert plan_rebalance(snap, "least_kv") == []
    # the same situation with no predictions: current load 5700 vs 500 -> current_migrate still acts
    assert plan_rebalance(build_snapshot([inst("h", [(3_000, None), (2_700, None)]), inst("c", [])]), "current_migrate")


def test_rebalance_does_nothing_when_balanced_or_single():
    snap = build_snapshot([inst("a", [(2_000, 100)]), inst("b", [(2_000, 100)])])
    assert plan_rebalance(snap, "ares") == [] and plan_rebalance(snap, "current_migrate") == []
    assert plan_rebalance(build_snapshot([inst("a", [(9_000, 9_000)])]), "ares") == []


def test_demand_matrix_equals_per_instance_curves():
    lm = LoadModel(horizon_tokens=500, points=8, default_output_tokens=120)
    states = [
        inst("a", [(1_000, 30), (500, None), (40, 480)], pending=[PendingRequest("p", 300, 50)]),
        inst("b", []),
        inst("c", [], pending=[PendingRequest("q", 200), PendingRequest("r", 10, 900)]),
        InstanceState.from_requests("d", CAP, 2_500, [RunningRequest("x", 700, 3, 12.0)]),  # unexplained tokens
    ]
    expected = np.stack([lm.instance_curve(s) for s in states])
    np.testing.assert_allclose(lm.demand_matrix(states), expected)
    np.testing.assert_allclose(build_snapshot(states, lm).demand, expected)


def test_ares_places_where_sglang_would_admit_now():
    # "busy": 990 tokens but 18 running requests -> 990 + 100 + 512 x 19 > 10,000; "calm" admits.
    busy = inst("busy", [(55, 5_000)] * 18)
    calm = inst("calm", [(4_000, 5_000)])
    snap = build_snapshot([busy, calm], LoadModel(horizon_tokens=100))
    assert dispatch(snap, new(100), "least_kv") == "busy"  # least current KV
    assert dispatch(snap, new(100), "ares") == "calm"


def test_ares_waits_where_admission_comes_soonest():
    # Neither admits now; "soon"'s requests finish within 10 steps, "late"'s hold on for the whole horizon.
    soon = inst("soon", [(4_500, 10), (4_500, 10)])
    late = inst("late", [(4_000, 5_000), (4_000, 5_000)])
    snap = build_snapshot([late, soon], LoadModel(horizon_tokens=100, points=10))
    assert dispatch(snap, new(500), "least_kv") == "late"
    assert dispatch(snap, new(500), "ares") == "soon"
