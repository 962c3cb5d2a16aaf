"""One brain, enforced: fed the same server state, the router (`RouterState`) and the simulator (`ClusterSim`) build
the same snapshot and take the same dispatch and rebalance decisions, for every policy the router offers.

The simulator is run to a poll and stopped there; what its decode servers would report then (`ClusterSim._reports`)
goes to a `RouterState` as poll results, and what a router would have recorded of the requests it sent (where to,
prompt, max_tokens, tokens relayed) as its bookkeeping. Both then go through their own code paths: the router's
`refresh` / `choose_decode` / the rebalancer's `plan_rebalance`, the simulator's `_build_snapshot` / `_dispatch` /
`policy.rebalancer.plan`. Any second copy of the admission rule, the assembler or the estimator in either body shows
up here as a difference.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from ares.sim.cost_model import CostModel
from ares.sim.engine import ClusterSim, SimConfig
from ares.workloads import Workload
from ares_router.config import ROUTER_POLICIES
from ares_router.policy import ClusterSnapshot, holds, plan_rebalance
from ares_router.state import RouterState

# (max_tokens the clients send, --reserve-tokens, poll to stop at): retractions and requests in every queue; no
# max_tokens (SGLang budgets 4096 new tokens each); early on, with a fixed max_tokens, SGLang's single-request term
# binding (the router looks the max_tokens of reported requests up in its bookkeeping).
SCENARIOS = [("output", 0, 14), (None, 512, 16), (2500, 128, 4)]


class _Stop(Exception):
    pass


def _workload() -> Workload:
    rng = np.random.default_rng(1)
    n = 160
    out = np.minimum(rng.lognormal(5.5, 1.0, n).astype(int) + 2, 3000)
    return Workload("parity", np.sort(rng.uniform(0, 16, n)), rng.integers(50, 1500, n), out)


def _sim_stopped_at_poll(
    policy: str, max_tokens, reserve: int, poll: int = 16, admission: str = "sglang"
) -> ClusterSim:
    """A simulation of 4 small decode instances (6000 KV tokens each), stopped just before its `poll`-th poll;
    `admission`: the decode servers' rule."""
    cost = CostModel("toy", 0.02, 0.0005, 0.0, 0.01, 2e-5, 6000, 1.0, 1e5, 0.01)
    cfg = SimConfig(
        n_decode=4,
        n_prefill=2,
        cost=cost,
        policy=policy,
        max_tokens=max_tokens,
        reserve_tokens=reserve,
        seed=3,
        admission=admission,
    )

    class Probe(ClusterSim):
        def _poll(self, t: float) -> None:
            if len(self.kv_times) + 1 == poll:
                self.t_stop = t
                raise _Stop
            super()._poll(t)

    sim = Probe(_workload(), cfg)
    with pytest.raises(_Stop):
        sim.run()
    return sim


def _router_fed_from(sim: ClusterSim) -> RouterState:
    """A router that polled the simulated servers at `sim.t_stop` and had sent every request the simulator sent."""
    cfg = sim.cfg
    s = RouterState.create(
        [("http://p0", 8998)],
        [f"http://d{j}" for j in range(cfg.n_decode)],
        sim.policy,
        load_model=cfg.load_model,
        estimator=cfg.estimator,
        admission=sim.admission,
        migration_cost=sim.cost.migration_cost(),
    )
    s.rng = copy.deepcopy(sim.rng)  # the random policy's generator, in the same state
    for b in s.prefills:
        s.poll_ok(b, None, now=0.0)
    for d, load in zip(s.decodes, sim._reports(sim.t_stop), strict=True):
        s.poll_ok(d, load, now=0.0)
    for i in np.flatnonzero(sim.col_tracked >= 0):  # sent, not finished; in dispatch order
        m = sim.col_max_new[i]
        t = s.start(int(i), int(sim.col_tracked[i]), 0, int(sim.col_prompt[i]), None if math.isnan(m) else int(m))
        t.started, t.generated = bool(sim.col_started[i]), int(sim.col_gen_now[i])
    s.dispatch_count = sim.dispatched
    s.refresh(now=0.0)
    return s


def _assert_same(a: ClusterSnapshot, b: ClusterSnapshot) -> None:
    for name in ("capacity", "used", "healthy", "count", "running_tokens", "single_need", "demand", "alive"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.dispatch_count == b.dispatch_count and a.admission == b.admission
    for x, y in zip(a.instances, b.instances, strict=True):
        assert (x.capacity_tokens, x.used_tokens, x.healthy) == (y.capacity_tokens, y.used_tokens, y.healthy)
        assert tuple(x.request_ids) == tuple(y.request_ids) and tuple(x.pending_ids) == tuple(y.pending_ids)
        for col in ("lengths", "generated", "predicted_remaining", "predicted_upper", "max_new_tokens"):
            np.testing.assert_array_equal(getattr(x, col), getattr(y, col), err_msg=col)
        for col in ("pending_prompt", "pending_predicted"):
            np.testing.assert_array_equal(getattr(x, col), getattr(y, col), err_msg=col)
        assert x.admission == y.admission
    assert len(a.forecasts) == len(b.forecasts)
    for x, y in zip(a.forecasts, b.forecasts, strict=True):  # predictive servers' KV forecasts, as the router sees
        assert (x is None) == (y is None)
        if x is not None:
            assert x.base == y.base
            np.testing.assert_array_equal(x.r, y.r, err_msg="forecast r")
            np.testing.assert_array_equal(x.lengths, y.lengths, err_msg="forecast lengths")


@pytest.mark.parametrize(
    ("max_tokens", "reserve", "poll", "admission"),
    [
        *((*sc, "sglang") for sc in SCENARIOS),
        ("output", 0, 14, "predictive"),
        (None, 512, 16, "predictive"),
        (None, 512, 16, "predictive_point"),
    ],
)
@pytest.mark.parametrize("policy", ROUTER_POLICIES)
def test_router_and_simulator_decide_alike_on_the_same_state(policy, max_tokens, reserve, poll, admission):
    sim = _sim_stopped_at_poll(policy, max_tokens, reserve, poll, admission)
    router = _router_fed_from(sim)
    sim.snapshot = sim._build_snapshot(sim.t_stop)
    _assert_same(sim.snapshot, router.snapshot)

    # rebalancing: the simulator's call and the router's rebalance loop's call
    assert sim.policy.rebalancer.plan(sim.snapshot) == plan_rebalance(router.snapshot, router.policy)

    # a burst of the next arrivals, placed one after another on each body's updated snapshot
    burst = [r for r in sim.reqs if r.arrival > sim.t_stop][:12]
    # (and whether a late-binding policy would keep each one at the router instead)
    by_sim, held_sim = [], []
    for r in burst:
        held_sim.append(holds(sim.snapshot, sim._new(r), sim.policy))
        by_sim.append(sim._dispatch(r))
    by_router, held_router = [], []
    for r in burst:
        m = sim.col_max_new[r.i]
        held_router.append(router.holds(r.prompt, None if math.isnan(m) else int(m)))
        by_router.append(router.choose_decode(r.prompt, None if math.isnan(m) else int(m)))
    assert by_sim == by_router and held_sim == held_router
    _assert_same(sim.snapshot, router.snapshot)


def test_the_parity_states_cover_what_they_claim():
    # Scenario 1 has requests in every place a router must account for (running, retracted, prealloc queue).
    sim = _sim_stopped_at_poll("ares", "output", 0, 14)
    own = (sim.col_tracked >= 0) & (sim.col_running < 0)
    assert (sim.col_running >= 0).sum() and (own & sim.col_started).sum() and (own & ~sim.col_started).sum()
    assert any(d.retracted for d in sim.decode) and any(d.prealloc for d in sim.decode)
    # Scenario 3: the single-request term binds, on rows whose max_tokens the router had to look up.
    sim = _sim_stopped_at_poll("ares", 2500, 128, 4)
    snap = _router_fed_from(sim).snapshot
    binds = snap.single_need - snap.running_tokens > 128 * snap.count
    assert binds.any()
    for j in np.flatnonzero(binds):
        reported = len(sim._reports(sim.t_stop)[j].rids)
        assert reported and np.all(snap.instances[j].max_new_tokens[:reported] == 2500)


def test_predictive_parity_states_decide_differently_from_sglangs_rule():
    # With predictive servers the router's view answers by their forecast: on the parity state, for some of the
    # next arrivals, some instance's answer differs from what SGLang's rule says on the same numbers.
    sim = _sim_stopped_at_poll("ares_hold", None, 512, 16, "predictive")
    snap = _router_fed_from(sim).snapshot
    assert all(f is not None for f in snap.forecasts)
    plain = ClusterSnapshot(**{**snap.__dict__, "forecasts": ()})
    burst = [sim._new(r) for r in sim.reqs if r.arrival > sim.t_stop][:12]
    assert any((snap.admits(r) != plain.admits(r)).any() for r in burst)
