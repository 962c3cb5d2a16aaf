"""One brain, enforced: fed the same server state, the router (`RouterState`) and the simulator (`ClusterSim`) build
the same snapshot and take the same dispatch and rebalance decisions, for every policy the router offers.

The simulator is run to a poll and stopped there; what its decode servers would report then (`ClusterSim._reports`)
goes to a `RouterState` as poll results, and what a router would have recorded of the requests it sent (where to,
prompt, max_tokens, tokens relayed) as its bookkeeping. Both then go through their own code paths: the router's
`refresh` / `choose_decode` / the rebalancer's `plan_rebalance`, the simulator's `_build_snapshot` / `_dispatch` /
`policy.rebalancer.plan`. Any second copy of the admission rule, the assembler or the estimator in either body shows
up here as a difference. The migration gate (`ares_router.policy.RebalanceGate`) is one too: the same default
limits, and fed the same proposals and history, the router's gate and the simulator's start the same moves; the
simulator reports every started move's end to it as the router does.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import math

import numpy as np
import pytest

from ares.sim.cost_model import CostModel
from ares.sim.engine import ClusterSim, SimConfig
from ares.workloads import Workload
from ares_router.cli import config_from_args, configure_parser
from ares_router.config import ROUTER_POLICIES, RouterConfig
from ares_router.held import HeldQueue
from ares_router.policy import (
    POLICIES,
    ClusterSnapshot,
    HoldRelease,
    Migration,
    RebalanceGate,
    RebalanceLimits,
    holds,
    new_request,
    plan_rebalance,
)
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


# -- the migration gate: one gate, one set of limits, fed alike ----------------------------------------------------


def _router_config_from_flags(*flags: str) -> RouterConfig:
    args = configure_parser(argparse.ArgumentParser()).parse_args(
        ["--prefill", "http://p0", "--decode", "http://d0", *flags]
    )
    return config_from_args(args)


def test_the_simulator_gates_with_the_routers_default_limits():
    # One default: the router's flags, its config and the simulator's config give the gate the same limits.
    assert SimConfig().gate == _router_config_from_flags().rebalance_limits == RebalanceLimits()


def _history(gate: RebalanceGate) -> dict:
    return {k: copy.deepcopy(getattr(gate, k)) for k in ("in_flight", "moves", "pair_moved", "streak", "backoff")}


@pytest.mark.parametrize(("max_tokens", "reserve", "poll"), [*SCENARIOS, (2500, 128, 6), ("output", 0, 4)])
@pytest.mark.parametrize("policy", [p for p in ROUTER_POLICIES if POLICIES[p]().rebalances])
def test_router_and_simulator_gate_alike_on_the_same_state_and_history(policy, max_tokens, reserve, poll):
    # The simulator, stopped at a rebalancing poll with its gate's history so far (moves in flight, streaks,
    # cooldowns, back-offs); the router fed the same server state, its gate built from its own config with that
    # history. Each body's proposals through its gate give the same moves.
    sim = _sim_stopped_at_poll(policy, max_tokens, reserve, poll)
    assert poll % sim.cfg.rebalance_every == 0  # the stopped poll is a rebalancing one
    router = _router_fed_from(sim)
    sim.snapshot = sim._build_snapshot(sim.t_stop)
    proposed = sim.policy.rebalancer.plan(sim.snapshot)
    sim_gate = copy.deepcopy(sim.gate)
    by_sim = sim_gate.choose(proposed, [m.request_id for m in proposed], sim.t_stop)

    router_gate = RebalanceGate(_router_config_from_flags().rebalance_limits)
    for name, value in _history(sim.gate).items():
        setattr(router_gate, name, value)
    by_router = router_gate.choose(plan_rebalance(router.snapshot, router.policy), list(router.requests), sim.t_stop)
    assert by_sim == by_router
    assert _history(sim_gate) == _history(router_gate)


def test_the_gate_decides_something_in_the_parity_states():
    # Not vacuous: on these states the gate starts a proposed move (its pair proposed the round before too), and
    # holds one back (its pair not confirmed: proposed for the first time).
    for (max_tokens, reserve, poll), starts in (((2500, 128, 6), True), (("output", 0, 4), False)):
        sim = _sim_stopped_at_poll("ares", max_tokens, reserve, poll)
        proposed = sim.policy.rebalancer.plan(sim._build_snapshot(sim.t_stop))
        chosen = copy.deepcopy(sim.gate).choose(proposed, [m.request_id for m in proposed], sim.t_stop)
        assert len(proposed) == 1 and chosen == (proposed if starts else [])


class _GateLog(ClusterSim):
    """A simulation that records every call it makes to its gate."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple] = []
        gate, log = self.gate, self.calls

        class Logged(RebalanceGate):
            def choose(self, proposed, eligible, now):
                out = super().choose(proposed, eligible, now)
                log.append(("choose", list(proposed), list(eligible), now, out))
                return out

            def done(self, m, committed, now, reason=None):
                log.append(("done", m, committed, now, reason))
                super().done(m, committed, now, reason)

        self.gate = Logged(gate.limits)


def test_the_simulator_reports_every_moves_end_to_the_gate_and_a_router_gate_replays_it():
    # A loaded run with migrations: every move the gate started ends in a `done` (committed, the target's rejection,
    # the request finishing or being retracted first), nothing is left in flight; a gate built as the router builds
    # its own, fed the same calls, chooses the same moves every round.
    cost = CostModel("toy", 0.02, 0.0005, 0.0, 0.01, 2e-5, 6000, 1.0, 1e5, 0.01)
    cfg = SimConfig(n_decode=4, n_prefill=2, cost=cost, policy="ares", max_tokens="output", reserve_tokens=0, seed=3)
    sim = _GateLog(_workload(), cfg)
    res = sim.run()
    assert np.all(np.isfinite(res.t_finish))
    chosen = [m for call in sim.calls if call[0] == "choose" for m in call[4]]
    ended = [call for call in sim.calls if call[0] == "done"]
    assert chosen and res.migrations > 0
    assert sorted(str(c[1]) for c in ended) == sorted(str(m) for m in chosen)  # each started move ended once
    assert not sim.gate.in_flight and not sim.gated
    assert any(c[2] for c in ended)  # committed moves ...
    router_gate = RebalanceGate(_router_config_from_flags().rebalance_limits)
    for call in sim.calls:
        if call[0] == "choose":
            assert router_gate.choose(call[1], call[2], call[3]) == call[4]
        else:
            router_gate.done(call[1], call[2], call[3], call[4])


def test_a_target_rejection_in_the_simulator_backs_the_pair_off():
    # The target refuses a started move (it fills up between the snapshot and the move): the simulator tells the
    # gate so, with a server's reason, and the gate skips the pair for its back-off, as it does live.
    sim = _sim_stopped_at_poll("ares", "output", 0, 14)
    run = next(j for j, d in enumerate(sim.decode) if d.running)
    target = next(j for j in range(len(sim.decode)) if j != run)
    rid = next(iter(sim.decode[run].running))
    m = Migration(rid, run, target, 1)
    sim.gate = RebalanceGate(RebalanceLimits(confirm_rounds=1))
    assert sim.gate.choose([m], [rid], sim.t_stop) == [m]
    sim.gated[rid] = m
    dst = sim.decode[target]
    dst.held += dst.cap - dst.K - dst.held  # full: the target's admission refuses
    rejected = sim.migrations_rejected
    sim._start_migration(sim.t_stop, rid, run, target)
    assert sim.migrations_rejected == rejected + 1
    assert not sim.gate.in_flight and (run, target, "no_memory") in sim.gate.backoff
    assert sim.gate.choose([m], [rid], sim.t_stop + 1.0) == []  # backing off
    assert sim.gate.choose([m], [rid], sim.t_stop + sim.gate.limits.backoff_s + 0.1) == [m]


# -- releasing held requests: one rule, router and simulator -------------------------------------------------------


# (max_tokens, reserve, poll, the servers' admission, aging): states where the release pass lets several requests go
# first fit (skipping ones that fit nowhere), and, with aging, the oldest (aged, fits) goes and the next (aged, fits
# nowhere) blocks the rest.
RELEASE_STATES = [
    ("output", 0, 16, "sglang", 3.0),
    (2500, 128, 16, "sglang", 4.0),
    (None, 512, 24, "predictive", 6.5),
    ("output", 0, 16, "predictive", 3.0),
]


@pytest.mark.parametrize(("max_tokens", "reserve", "poll", "admission", "aging"), RELEASE_STATES)
@pytest.mark.parametrize("aged", [False, True])
def test_router_and_simulator_release_the_same_held_requests(max_tokens, reserve, poll, admission, aging, aged):
    # The simulator stopped at a poll with requests held at its router; a router fed the same state holds the same
    # requests (in arrival order, held since they arrived) in its `HeldQueue`. The poll's release pass lets the
    # same requests go, in the same order, to the same servers (with aging: the same aged request blocks).
    sim = _sim_stopped_at_poll("ares_hold", max_tokens, reserve, poll, admission)
    assert sim.held
    router = _router_fed_from(sim)
    sim.snapshot = sim._build_snapshot(sim.t_stop)
    rule = HoldRelease(aging if aged else None)
    sim.hold_rule = rule
    held = list(sim.held)
    sim._release_held(sim.t_stop)
    still = {r.i for r in sim.held}
    by_sim = [(r.i, int(sim.col_tracked[r.i])) for r in held if r.i not in still]  # sent in arrival order

    async def live() -> list[tuple[int, int]]:
        now = [0.0]
        queue = HeldQueue(rule, lambda p, m: not router.holds(p, m), interval_s=1e6, clock=lambda: now[0])
        out: list[tuple[int, int]] = []

        async def handler(req) -> None:  # as `Dispatch._serve`: held, then placed before any other await
            m = sim.col_max_new[req.i]
            m = None if math.isnan(m) else int(m)
            await queue.wait(req.prompt, m)
            out.append((req.i, router.choose_decode(req.prompt, m)))

        tasks = []
        for req in held:
            now[0] = req.arrival
            tasks.append(asyncio.create_task(handler(req)))
            await asyncio.sleep(0)  # held in arrival order
        assert len(queue) == len(held)
        now[0] = sim.t_stop
        await queue.release_pass()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert len(queue) == 0
        return out

    assert asyncio.run(live()) == by_sim
    if not aged:
        assert len(by_sim) >= 3  # first fit: several go, past ones that fit nowhere
    else:
        plain = _sim_stopped_at_poll("ares_hold", max_tokens, reserve, poll, admission)
        plain.snapshot = plain._build_snapshot(plain.t_stop)
        plain._release_held(plain.t_stop)
        assert len(by_sim) < len(held) - len(plain.held)  # an aged request that fits nowhere holds the rest back


@pytest.mark.parametrize(
    ("max_tokens", "reserve", "poll", "admission"), [(2500, 128, 16, "sglang"), ("output", 0, 16, "predictive")]
)
def test_router_and_simulator_plan_the_same_defragmenting_moves(max_tokens, reserve, poll, admission):
    # With requests held, a defragmenting policy's plan for the request held longest (as each body passes it: the
    # simulator's `_new`, the router's `Dispatch.held_longest`, i.e. `new_request` with the shared estimator) is
    # the same in both bodies, and on these states it moves something.
    sim = _sim_stopped_at_poll("ares_hold_defrag", max_tokens, reserve, poll, admission)
    assert sim.held
    router = _router_fed_from(sim)
    sim.snapshot = sim._build_snapshot(sim.t_stop)
    head = sim.held[0]
    m = sim.col_max_new[head.i]
    by_sim = plan_rebalance(sim.snapshot, sim.policy, sim._new(head))
    held = new_request("", head.prompt, None if math.isnan(m) else int(m), router.estimator)
    by_router = plan_rebalance(router.snapshot, router.policy, held)
    assert [(x.request_id, x.source, x.target) for x in by_sim] == [
        (x.request_id, x.source, x.target) for x in by_router
    ]
    defrag = sim.policy.defragmenter.plan(sim.snapshot, sim._new(head))
    assert defrag and by_sim[: len(defrag)] == defrag  # the defragmenting moves first
