"""Predictive decode admission in the simulator (`SimConfig.admission = "predictive"`): hand-computed cases on one
instance, the retraction safety net when the forecast undershoots, and the router's view of such servers."""

from __future__ import annotations

import numpy as np
import pytest

from ares.sim.cost_model import CostModel
from ares.sim.engine import ClusterSim, SimConfig, simulate
from ares.workloads import Workload
from ares_router.estimate import OutputEstimator

# One instance, 1000 KV tokens, no reserve (R = 0), 10 ms steps, instant prefill and transfer.
COST = CostModel("toy", 0.01, 0.0, 0.0, 0.0, 0.0, 1000, 1.0, 1e30, 0.0)


def _run(n: int, out: int, admission: str, policy: str = "least_kv", **kw):
    work = Workload("toy", np.zeros(n), np.full(n, 100), np.full(n, out))
    cfg = SimConfig(
        n_decode=1, cost=COST, reserve_tokens=0, admission=admission, policy=policy, check_invariants=True, **kw
    )
    return simulate(work, cfg)


def test_predictive_admits_what_sglangs_single_request_term_holds():
    # Two requests (prompt 100, 10 output tokens: 9 decode steps), no max_tokens. SGLang budgets 898 new tokens for
    # the first and holds the second until it finishes (test_admission's case). Predictive on oracle servers
    # (`ares_true_lengths`: planned = true remaining): rows (100, 9) + (100, 9) peak at 2 x 109 = 218 <= 1000: the
    # second joins at the first step boundary, as with max_tokens = its output under SGLang's rule.
    sg = _run(2, 10, "sglang", "ares_true_lengths")
    assert sg.t_finish == pytest.approx([0.09, 0.18])
    pr = _run(2, 10, "predictive", "ares_true_lengths")
    assert pr.t_finish == pytest.approx([0.09, 0.10])
    assert pr.retractions.sum() == 0


def test_predictive_holds_what_would_overflow():
    # Four requests of prompt 100 and 300 output tokens, oracle forecasts: each peaks at 100 + 299 = 399 tokens;
    # two fit (798), a third would make 1197 > 1000: at most two run at a time, and nothing is retracted.
    res = _run(4, 300, "predictive", "ares_true_lengths")
    assert res.retractions.sum() == 0
    starts = np.sort(res.t_first)
    assert starts[2] >= np.sort(res.t_finish)[0] - 1e-9  # the third starts only once one has finished
    # SGLang's rule (R = 0, no max_tokens: each budgets 898) runs them one at a time.
    assert np.all(np.diff(np.sort(_run(4, 300, "sglang").t_first)) > 2.9)


def test_retraction_is_the_safety_net_when_the_forecast_undershoots():
    # The prior says 60 tokens (base 10 + 0.5 x 100), the truth is 400: all four are admitted at once on the
    # prior (peak 4 x 160 = 640), grow to 4 x 500 > 1000 and SGLang's retraction steps in; all still finish.
    est = OutputEstimator(base_tokens=10.0, per_prompt_token=0.5, floor_tokens=1.0)
    res = _run(4, 400, "predictive", estimator=est)
    assert res.retractions.sum() > 0
    assert np.all(np.isfinite(res.t_finish)) and np.all(res.generated == 400)


def test_router_view_of_predictive_servers_uses_their_rule():
    work = Workload("toy", np.zeros(2), np.full(2, 100), np.full(2, 10))
    sim = ClusterSim(work, SimConfig(n_decode=2, cost=COST, reserve_tokens=0, admission="predictive"))
    snap = sim._build_snapshot(0.0)
    assert all(s.admission == "predictive" for s in snap.instances)
    assert all(f is not None and f.peak == 0 for f in snap.forecasts)
    with pytest.raises(ValueError, match="admission must be one of"):
        ClusterSim(work, SimConfig(admission="fancy"))


def test_a_prior_beyond_the_pool_is_capped_by_what_sglang_lets_it_generate():
    # The prior says 1,050 tokens (base 1000 + 0.5 x 100) beside a 100-token prompt in a 1000-token pool: planned
    # at that, the request would never fit even an empty pool. Predictive admission caps every planned length at
    # what SGLang lets the request generate (1000 - 100 - 2 = 898 tokens), so it runs.
    res = _run(1, 300, "predictive", estimator=OutputEstimator(base_tokens=1000.0))
    assert np.isfinite(res.t_finish).all() and res.retractions.sum() == 0
