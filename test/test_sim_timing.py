"""Simulator per-token timing (ITL histogram, longest gap), SLO pairs, the pooled bound, the goodput search and the
relative predictor-error model: hand-computed cases."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ares.sim import sweep
from ares.sim.bounds import POOLED_BOUND, pooled_config, pooled_cost
from ares.sim.cost_model import CostModel, get_cost_model
from ares.sim.engine import SimConfig, simulate
from ares.sim.gaps import GapHistogram
from ares.sim.metrics import SLO, SLO_PAIRS, full_kv_step, request_latencies, slo_attainment, slo_pairs, summarize
from ares.sim.predictor_model import ErrorModel, load_error_model, relative_mae, sigma_for_relative_mae
from ares.workloads import Workload, load_workload


def wl(arrivals, prompts, outputs) -> Workload:
    return Workload("toy", np.array(arrivals, float), np.array(prompts), np.array(outputs))


# ---------------------------------------------------------------- histogram


def test_progression_lands_in_the_same_bins_as_single_adds():
    a, b = GapHistogram(), GapHistogram()
    for first, step, n, w in ((0.01, 3e-4, 50, 3.0), (5e-6, 2e-6, 40, 1.0), (0.02, 0.0, 7, 2.0)):
        a.add_progression(first, step, n, w)
        for i in range(n):
            b.add(first + step * i, w)
    assert a.count == b.count == 3 * 50 + 40 + 2 * 7
    assert a.total == pytest.approx(b.total) and a.max == pytest.approx(b.max) and a.min == b.min
    # a value exactly on a bin edge may fall either side by float rounding: compare up to one bin shift
    diff = np.abs(np.cumsum(a.counts) - np.cumsum(b.counts))
    assert diff.max() <= 3.0 and np.count_nonzero(diff) <= 3


def test_quantiles_within_the_stated_relative_error():
    rng = np.random.default_rng(0)
    x = rng.lognormal(np.log(0.03), 0.5, 20000)
    h = GapHistogram()
    for v in x:
        h.add(float(v))
    for q in (0.5, 0.9, 0.99):
        exact = float(np.quantile(x, q, method="inverted_cdf"))
        assert abs(h.quantile(q) / exact - 1) <= h.max_rel_error + 1e-12
    assert h.max_rel_error == pytest.approx(math.sqrt(1.01) - 1)
    assert h.mean == pytest.approx(x.mean())
    assert math.isnan(GapHistogram().quantile(0.5))


# ---------------------------------------------------------------- engine: token gaps


def test_token_gaps_of_two_requests_hand_computed():
    # step = 10 ms + 1 ms per running request (test_sim's scenario): req0's tokens at 11, 22, 34, 46 ms after its
    # first (0 ms); req1 (arrives at 5 ms, KV preallocated at 11 ms) joins at 22 ms, tokens at 34, 46 and 57 ms.
    # Gaps (ms): 11 11 12 12 | 12 12 11.
    cost = CostModel("toy", 0.01, 0.001, 0.0, 0.0, 0.0, 100_000, 1.0, 1e30, 0.0)
    res = simulate(
        wl([0.0, 0.005], [10, 10], [5, 4]), SimConfig(n_decode=1, cost=cost, reserve_tokens=0, warmup_frac=0)
    )
    g = res.gaps
    assert g.count == 7 and g.total == pytest.approx(0.081)
    assert g.min == pytest.approx(0.011) and g.max == pytest.approx(0.012)
    assert res.max_gap == pytest.approx([0.012, 0.012])
    assert g.quantile(0.99) == pytest.approx(0.012, rel=g.max_rel_error)


def _retraction_case(retraction: str = "recompute") -> tuple:
    """Capacity 45 tokens, 10 ms steps, prefill 1 ms/token, host copies 1 ms/token, retract until 1 step fits.

    A (prompt 10, out 20) prefills 0-10 ms and joins at 10 ms. B (prompt 15) prefills 10-25 ms, joins at the
    step boundary of 30 ms (KV 12 + 15 = 27). k_oom = (45 - 27) // 2 = 9 steps: at 120 ms the KV is full and B
    (fewest generated: 10 vs 12) is retracted. Recompute: A finishes its 19 steps at 200 ms; B is re-admitted,
    recomputes 15 + 10 - 1 = 24 tokens (24 ms) and steps from 200 + 24 ms: first token at 234 ms, last at 324 ms.
    B's gaps: 9 x 10 ms, one of 234 - 120 = 114 ms (queue + recompute + step), 9 x 10 ms; A's: 19 x 10 ms.
    """
    cost = CostModel("tiny", 0.01, 0.0, 0.0, 0.0, 0.001, 45, 1.0, 1e30, 0.0, host_bytes_per_s=1000.0)
    cfg = SimConfig(
        n_decode=1,
        cost=cost,
        reserve_tokens=0,
        retract_steps=1,
        retraction=retraction,
        warmup_frac=0,
        check_invariants=True,
        max_tokens="output",  # else SGLang's single-request term keeps B out until A is done: no retraction
    )
    return simulate(wl([0.0, 0.0], [10, 15], [20, 20]), cfg), cost


def test_retraction_stall_is_one_long_gap():
    res, _ = _retraction_case()
    assert list(res.retractions) == [0, 1]
    assert res.t_first == pytest.approx([0.010, 0.030])
    assert res.t_finish == pytest.approx([0.200, 0.324])
    assert res.max_gap == pytest.approx([0.010, 0.114])
    g = res.gaps
    assert g.count == 38 and g.total == pytest.approx(0.190 + 0.294)
    assert g.quantile(0.5) == pytest.approx(0.010, rel=g.max_rel_error)
    assert g.quantile(0.99) == pytest.approx(0.114, rel=g.max_rel_error)  # 38 gaps: P99 is the largest
    lat = request_latencies(res)
    assert lat["tpot"] == pytest.approx([0.010, 0.294 / 19])  # as sglang.benchmark.serving: (e2e - ttft) / (n - 1)


def test_backup_retraction_copies_out_and_back_in():
    # The same case with 0.5.23's PD decode backup: at 120 ms B's 15 + 9 = 24 KV tokens go to the host (24 ms,
    # stalling A's next step: A's gap 34 ms); A has 8 steps left: 154, 164, ..., 224 ms. Then B's 24 tokens come
    # back (24 ms) and it steps from 224 + 24 ms: first token at 258 ms (gap 138 ms), last (10 steps) at 348 ms.
    res, _ = _retraction_case("backup")
    assert list(res.retractions) == [0, 1]
    assert res.t_finish == pytest.approx([0.224, 0.348])
    assert res.max_gap == pytest.approx([0.034, 0.138])
    g = res.gaps
    assert g.count == 38 and g.total == pytest.approx(0.214 + 0.318)
    with pytest.raises(ValueError, match="retraction"):
        simulate(wl([0.0], [10], [5]), SimConfig(n_decode=1, retraction="swap"))


def test_slo_attainment_per_part_hand_computed():
    res, cost = _retraction_case()
    loose_ttft = dict(ttft_base_s=1.0, ttft_prefill_factor=0.0)
    assert slo_attainment(res, SLO(**loose_ttft), cost, 0.0) == 1.0
    assert slo_attainment(res, SLO(**loose_ttft, tpot_s=0.012), cost, 0.0) == 0.5  # B's TPOT 15.5 ms
    assert slo_attainment(res, SLO(**loose_ttft, tpot_s=0.016), cost, 0.0) == 1.0
    assert slo_attainment(res, SLO(**loose_ttft, itl_s=0.1), cost, 0.0) == 0.5  # B's 114 ms gap
    assert slo_attainment(res, SLO(**loose_ttft, tpot_s=0.016, itl_s=0.12), cost, 0.0) == 1.0
    # TTFT: A waits 10 ms, B 30 ms
    assert slo_attainment(res, SLO(0.02, 0.0), cost, 0.0) == 0.5
    s = summarize(res, {"t": SLO(**loose_ttft, tpot_s=0.012), "i": SLO(**loose_ttft, itl_s=0.2)}, cost, 0.0)
    assert s["attainment"] == {"t": 0.5, "i": 1.0} and s["slo_attainment"] == 0.5
    assert s["itl_p50"] == pytest.approx(0.010, rel=0.006) and s["itl_p99"] == pytest.approx(0.114, rel=0.006)
    assert s["token_gaps"] == 38
    with pytest.raises(ValueError):
        summarize(res, SLO(**loose_ttft), cost, 0.1)  # the histogram covers warm-up 0, not 0.1


def test_declared_slo_pairs():
    cost = get_cost_model("h100-llama2-7b")
    step = full_kv_step(cost)
    slos = slo_pairs(cost)
    assert list(slos) == [p.name for p in SLO_PAIRS]
    assert any(s.tpot_s is not None and s.tpot_s < step for s in slos.values())  # a TPOT SLO below the full step
    assert any(s.itl_s is not None for s in slos.values())  # an ITL SLO
    assert slos["tpot_1.25x"].tpot_s == pytest.approx(1.25 * step)
    assert list(slo_pairs(cost, "itl_5x,tpot_0.8x")) == ["itl_5x", "tpot_0.8x"]
    with pytest.raises(KeyError):
        slo_pairs(cost, "nope")


def _r1(rate=4.5, duration=600.0, seed=0):
    return load_workload("r1", rate, duration, seed=seed)


@pytest.mark.parametrize(("policy", "reserve"), [("round_robin", 0), ("ares_true_lengths", 512)])
def test_token_gaps_conserve_time_with_retraction_and_migration(policy, reserve):
    work = _r1()
    cost = get_cost_model("h100-llama2-7b")
    res = simulate(work, SimConfig(n_decode=4, cost=cost, policy=policy, reserve_tokens=reserve, warmup_frac=0))
    assert res.retractions.sum() > 0 if reserve == 0 else res.migrations > 0
    # every token gap is counted once and the gaps of a request add up to its decode time, stalls included
    assert res.gaps.count == np.sum(res.output - 1)
    assert res.gaps.total == pytest.approx(np.sum(res.t_finish - res.t_first), rel=1e-9)
    tpot = request_latencies(res)["tpot"]
    assert np.all(res.max_gap >= tpot * (1 - 1e-9))
    assert res.max_gap.max() == pytest.approx(res.gaps.max)


def test_warmup_requests_stay_out_of_the_histogram():
    work = _r1(rate=2.0)
    res = simulate(work, SimConfig(n_decode=4, policy="least_kv", warmup_frac=0.3))
    meas = work.arrival_s >= 0.3 * work.duration_s
    assert res.gaps.count == np.sum(res.output[meas] - 1)
    assert res.gaps.total == pytest.approx(np.sum((res.t_finish - res.t_first)[meas]), rel=1e-9)


# ---------------------------------------------------------------- pooled bound


def test_pooled_cost_is_the_mean_instance():
    cost = get_cost_model("h100-llama2-7b")
    pooled = pooled_cost(cost, 8)
    assert pooled.kv_capacity_tokens == 8 * cost.kv_capacity_tokens
    # batch 40 and 400k KV tokens spread as 5 requests / 50k tokens per instance: the same step time
    assert pooled.step_time(40, 400_000) == pytest.approx(cost.step_time(5, 50_000))
    assert pooled.prefill_time(1000) == cost.prefill_time(1000) and pooled.link_bytes_per_s == cost.link_bytes_per_s
    assert pooled.host_bytes_per_s == 8 * cost.host_bytes_per_s  # a backup stalls the whole pool: 1/8 as long
    cfg = pooled_config(SimConfig(n_decode=8, cost=cost, reserve_tokens=512))
    assert cfg.n_decode == 1 and cfg.n_prefill == 4 and cfg.reserve_tokens == 64  # an average instance's headroom
    assert not cfg.link_contention  # the cluster's 8 NICs, not one
    # lengths clipped to one real instance's capacity - reserve - 1
    assert cfg.clip_capacity - cfg.reserve_tokens == cost.kv_capacity_tokens - 512


def test_pooled_bound_clips_like_one_instance_and_takes_what_one_instance_cannot():
    # Two instances of 100 tokens, 10 ms steps; 3 requests of prompt 40, 20 tokens out (19 steps), arriving at 0.
    # Cluster (round robin): req0 and req2 share instance 0 (req2 joins at the 10 ms boundary); at 100 ms their
    # 99 KV tokens fill it, req2 (fewer generated) is retracted, rejoins when req0 finishes (190 ms) and ends
    # 10 steps later (290 ms). Pool (200 tokens): req1 and req2 join at 10 ms, nobody is retracted: 200 ms.
    # A 300-token output is clipped the same in both (to one instance's 100 - 10 - 1 = 89).
    cost = CostModel("toy", 0.01, 0.0, 0.0, 0.0, 0.0, 100, 1.0, 1e30, 0.0)
    work = wl([0.0, 0.0, 0.0, 50.0], [40, 40, 40, 10], [20, 20, 20, 300])
    # max_tokens = output: with none given, SGLang's single-request term would keep req2 out until req0 is done
    cfg = SimConfig(
        n_decode=2, n_prefill=1, cost=cost, reserve_tokens=0, policy="round_robin", warmup_frac=0, max_tokens="output"
    )
    cluster = sweep.simulate_policy(work, cfg, "round_robin")
    pool = sweep.simulate_policy(work, cfg, POOLED_BOUND)
    assert cluster.clipped == pool.clipped == 1 and np.array_equal(cluster.output, pool.output)
    assert cluster.output[3] == 89
    assert cluster.t_finish[:3] == pytest.approx([0.19, 0.19, 0.29]) and list(cluster.retractions) == [0, 0, 1, 0]
    assert pool.t_finish[:3] == pytest.approx([0.19, 0.20, 0.20]) and pool.retractions.sum() == 0


# ---------------------------------------------------------------- goodput search


@pytest.fixture
def fake_runs(monkeypatch):
    """run_point replaced: SLO `s` is met (attainment 1) iff rate <= thresholds[s]."""
    thresholds: dict[str, float] = {}
    calls: list[float] = []

    def run_point(spec, policy, rate, seed=None):
        calls.append(rate)
        att = {s: 1.0 if rate <= t else 0.0 for s, t in thresholds.items()}
        return {"attainment": att, "offered_rate": rate, "policy": policy, "seed": seed}

    monkeypatch.setattr(sweep, "run_point", run_point)
    return thresholds, calls


def _spec(names):
    return sweep.RunSpec(slos={n: SLO(1.0, 0.0, name=n) for n in names})


def test_goodput_search_reaches_one_percent_for_every_slo(fake_runs):
    thresholds, calls = fake_runs
    thresholds.update(a=3.0, b=7.3)
    found, runs = sweep.find_goodput(_spec(["a", "b"]), "p", start_rate=5.0)
    for s, t in thresholds.items():
        g = found[s]
        assert g.status == "ok" and g.lo <= t < g.hi <= g.lo * 1.01 * (1 + 1e-9)
        assert g.rate == g.lo and "req/s" in g.label()
    assert len(runs) == len(calls) < 2 * 12  # shared runs: fewer than two separate searches


def test_goodput_search_says_below_instead_of_zero(fake_runs):
    thresholds, calls = fake_runs
    thresholds.update(a=0.001)
    found, _ = sweep.find_goodput(_spec(["a"]), "p", start_rate=8.0, floor=0.01)
    g = found["a"]
    assert g.status == "below" and g.rate is None and g.lo is None and g.hi == pytest.approx(0.01)
    assert g.label() == "below 0.01 req/s"
    assert min(calls) == pytest.approx(0.01) and sorted(calls, reverse=True)[:4] == [8.0, 4.0, 2.0, 1.0]  # halving


def test_goodput_search_halves_then_bisects(fake_runs):
    thresholds, calls = fake_runs
    thresholds.update(a=1.5)
    found, _ = sweep.find_goodput(_spec(["a"]), "p", start_rate=8.0)
    assert calls[:4] == [8.0, 4.0, 2.0, 1.0] and found["a"].status == "ok"
    assert found["a"].lo == pytest.approx(1.5, rel=0.01)


def test_goodput_search_says_above_at_the_ceiling(fake_runs):
    thresholds, _ = fake_runs
    thresholds.update(a=1e9)
    found, _ = sweep.find_goodput(_spec(["a"]), "p", start_rate=1.0, ceiling=10.0)
    assert found["a"].status == "above" and found["a"].label() == "above 10 req/s"


def test_goodput_searched_per_seed(fake_runs):
    thresholds, _ = fake_runs
    thresholds.update(a=2.0)
    agg, runs = sweep.goodput_over_seeds(_spec(["a"]), "p", 3.0, seeds=[0, 1, 2])
    assert sorted({r["seed"] for r in runs}) == [0, 1, 2]
    assert agg["a"]["resolved"] == 3 and agg["a"]["mean"] == pytest.approx(2.0, rel=0.01)
    assert agg["a"]["ci95"] == pytest.approx(0.0, abs=1e-12)  # the fake ignores the seed: no spread


def test_goodput_over_seeds_mean_and_interval():
    ok = [sweep.Goodput(v, v * 1.01, "ok") for v in (1.0, 2.0, 3.0)]
    agg = sweep.aggregate_goodput(ok)
    # mean 2, sample sd 1, t(0.975, 2) = 4.303: half-width 4.303 / sqrt(3)
    assert agg["mean"] == pytest.approx(2.0) and agg["ci95"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert agg["status"] == "ok"
    below = sweep.aggregate_goodput([sweep.Goodput(None, 0.01, "below")] * 3)
    assert below["status"] == "below" and below["mean"] is None and below["label"].startswith("below 0.01")
    mixed = sweep.aggregate_goodput([ok[0], sweep.Goodput(None, 0.01, "below")])
    assert mixed["status"] == "mixed" and "1 below" in mixed["label"]


# ---------------------------------------------------------------- predictor error model


def test_relative_mae_closed_form():
    z = np.random.default_rng(0).standard_normal(2_000_000)
    for sigma in (0.2, 0.5, 1.3):
        assert relative_mae(sigma) == pytest.approx(np.mean(np.abs(np.exp(sigma * z) - 1)), rel=3e-3)
    assert relative_mae(0.01) == pytest.approx(0.01 * math.sqrt(2 / math.pi), rel=1e-3)  # small-sigma limit
    for rel in (0.1, 0.42, 2.1):
        assert relative_mae(sigma_for_relative_mae(rel)) == pytest.approx(rel, rel=1e-9)


def _accuracy_file(tmp_path, block_extra=None, top_extra=None, by_progress=None):
    by_progress = by_progress or {"0-50%": 50.0, "50-100%": 20.0}
    block = {"mae": 30.0, "mae_by_progress": by_progress, **(block_extra or {})}
    doc = {"mae": {"ours": 30.0, "other": 10.0}, "metrics": {"ours": block}, **(top_extra or {})}
    path = tmp_path / "acc.json"
    path.write_text(json.dumps(doc))
    return path


def test_error_model_is_relative_by_progress(tmp_path):
    # MAE 50 tokens where 100 remain on average, 20 where 20 remain: relative 0.5 then 1.0, knots at 25% / 75%
    path = _accuracy_file(tmp_path, {"mean_remaining_by_progress": {"0-50%": 100.0, "50-100%": 20.0}})
    m = load_error_model(path)
    assert m.progress == (0.25, 0.75)
    assert [relative_mae(s) for s in m.sigma] == pytest.approx([0.5, 1.0])
    assert "'ours'" in m.source and "MAE 30.00" in m.source
    # relative: the same error applies to a 10x longer workload as 10x the tokens
    z = np.array([0.7])
    assert m.predict(np.array([1000.0]), np.array([0.25]), z) == pytest.approx(
        10 * m.predict(np.array([100.0]), 0.25, z)
    )
    # an explicit profile wins; a file without a usable block is refused
    prof = {"log_sigma_by_progress": {"progress": [0, 1], "sigma": [0.3, 0.1]}}
    assert load_error_model(_accuracy_file(tmp_path, prof)).sigma == (0.3, 0.1)
    (tmp_path / "bad.json").write_text("[]")
    assert load_error_model(tmp_path / "bad.json") is None
    assert isinstance(ErrorModel.parametric(0.5), ErrorModel)


def test_error_model_denominator_from_the_test_split(tmp_path):
    from ares.predictor.features import split_of

    ids = [f"q{i}" for i in range(200) if split_of(f"q{i}") == "test"][:1]
    train = next(f"q{i}" for i in range(200) if split_of(f"q{i}") == "train")
    gen = tmp_path / "gens.jsonl.gz"
    with gzip.open(gen, "wt") as f:
        for i, n in ((ids[0], 10), (train, 50)):
            f.write(json.dumps({"id": i, "source": "x", "prompt": [1], "response": [2] * n, "finish": "eos",
                                "max_new_tokens": 99}) + "\n")  # fmt: skip
    # one 10-token test response: positions 0..9, progress 0.0..0.9, one per 10% bucket; remaining 10..1
    by_progress = {"0-10%": 5.0, "50-60%": 2.5, "90-100%": 2.0}
    path = _accuracy_file(tmp_path, top_extra={"n_test_requests": 1, "n_test_points": 10}, by_progress=by_progress)
    m = load_error_model(path, generations=gen)
    assert m.progress == pytest.approx((0.05, 0.55, 0.95))
    assert [relative_mae(s) for s in m.sigma] == pytest.approx([5.0 / 10, 2.5 / 5, 2.0 / 1])
    assert "test split" in m.source
    wrong = _accuracy_file(tmp_path, top_extra={"n_test_requests": 2, "n_test_points": 10}, by_progress=by_progress)
    assert load_error_model(wrong, generations=gen) is None  # not the split the file was scored on


def test_shipped_accuracy_file_gives_a_relative_model():
    from ares.sim.cli import DEFAULT_ACCURACY

    path = Path(__file__).resolve().parents[1] / DEFAULT_ACCURACY
    if not path.exists():
        pytest.skip("no predictor_accuracy.json")
    data = json.loads(path.read_text())
    m = load_error_model(path)
    if m is None:
        pytest.skip("generations file for the test split not available")
    mae = data["metrics"]["ours"]["mae"]
    assert f"MAE {mae:.2f}" in m.source and len(m.sigma) == 10 and all(s > 0 for s in m.sigma)
