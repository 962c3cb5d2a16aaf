"""Aging of held requests (`ares_router.policy.HoldRelease`, `SimConfig.hold_max_wait_s`): the pure rule, and a
large held request that a stream of small ones starves without aging and that aging releases."""

from __future__ import annotations

import numpy as np

from ares.sim.cost_model import CostModel
from ares.sim.engine import SimConfig, simulate
from ares.workloads import Workload
from ares_router.policy import HoldRelease


def test_release_is_first_fit_up_to_the_first_blocked_aged_request():
    rule = HoldRelease(max_wait_s=10.0)
    waited = np.array([30.0, 12.0, 5.0, 1.0])
    assert rule.aged(waited).tolist() == [True, True, False, False]
    # the oldest fits nowhere: nothing goes, and arrivals are held behind it
    go, blocked = rule.release(waited, np.array([False, True, True, True]))
    assert go.tolist() == [False] * 4 and blocked
    # an unaged request that fits nowhere does not block the ones behind it
    go, blocked = rule.release(waited, np.array([True, True, False, True]))
    assert go.tolist() == [True, True, False, True] and not blocked
    # no aging: plain first fit
    assert HoldRelease().release(waited, np.array([False, True, False, True]))[0].tolist() == [False, True, False, True]
    assert not HoldRelease().blocks(waited) and rule.blocks(waited)


def _stream(hold_max_wait_s):
    # One instance of 1000 KV tokens, no reserve, max_tokens = each output (so SGLang's rule counts true sizes),
    # 10 ms steps. Small requests (prompt 100, 200 tokens: 2 s each) arrive at 20/s for 10 s, far more than it
    # serves: a backlog of held ones refills every bit of KV that frees. A large one (prompt 400, 500 tokens)
    # arrives at 0.5 s; it needs 400 free tokens at a poll, and with a poll every 50 ms the backlog takes what
    # frees long before that much has.
    cost = CostModel("toy", 0.01, 0.0, 0.0, 0.0, 0.0, 1000, 1.0, 1e30, 0.0)
    small = np.arange(0.0, 10.0, 0.05)
    arrival = np.sort(np.append(small, 0.5 + 1e-6))
    big = int(np.flatnonzero(arrival == 0.5 + 1e-6)[0])
    prompt, out = np.full(arrival.size, 100), np.full(arrival.size, 200)
    prompt[big], out[big] = 400, 500
    cfg = SimConfig(
        n_decode=1, cost=cost, policy="ares_hold", reserve_tokens=0, max_tokens="output", poll_interval_s=0.05,
        hold_max_wait_s=hold_max_wait_s, check_invariants=True,
    )  # fmt: skip
    res = simulate(Workload("stream", arrival, prompt, out), cfg)
    assert np.all(np.isfinite(res.t_finish))
    return res.t_first[big]


def test_aging_releases_a_large_request_the_small_ones_starve():
    starved = _stream(None)
    aged = _stream(2.0)
    assert starved > 30.0  # it waits for the backlog to drain
    assert aged < 6.0  # aged at 2.5 s, then nothing passes it until it fits
