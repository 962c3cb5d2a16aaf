"""Unit tests of the live benchmark's pieces (`ares.live`): the request list, the client's per-request figures,
the summary against hand-computed values, the servers' retraction lines, and a cluster spec without a router.
The benchmark itself runs real servers (`benchmark/live_cluster.py`); these check its arithmetic."""

from __future__ import annotations

import json

import pytest

from ares.cluster.spec import ClusterSpec
from ares.live.client import Outcome, generate_body
from ares.live.monitor import Trace, retractions
from ares.live.report import Slo, aggregate, attainment_ratio, head_mae, kv_imbalance, markdown, summarize
from ares.live.workload import live_workload
from ares.predictor.features import split_of
from ares.predictor.generations import read_generations


def test_workload_is_held_out_long_tailed_and_seeded():
    reqs = live_workload(20, rate=0.5, seed=3, long_fraction=0.25, long_min=400)
    by_id = {g.id: g for g in read_generations()}
    assert len(reqs) == 20 and len({r.rid for r in reqs}) == 20
    assert all(split_of(r.prompt_id) == "test" for r in reqs)  # never trained on
    assert sum(r.collected_tokens >= 400 for r in reqs) == 5
    assert all(tuple(by_id[r.prompt_id].prompt) == r.input_ids for r in reqs)
    arrivals = [r.arrival_s for r in reqs]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    assert [r.prompt_id for r in live_workload(20, 0.5, 3, 0.25, 400)] == [r.prompt_id for r in reqs]
    assert [r.prompt_id for r in live_workload(20, 0.5, 4, 0.25, 400)] != [r.prompt_id for r in reqs]


def test_replayed_requests_carry_no_length_hint():
    req = live_workload(1, 1.0, 0, long_fraction=0.0)[0]
    body = generate_body(req, 1024)
    assert body["sampling_params"] == {"max_new_tokens": 1024, "temperature": 0}  # the model's own end
    assert body["input_ids"] == list(req.input_ids) and body["stream"]
    assert "rid" not in body  # the router names it and says so in X-Request-Id: the servers' reports use that id


def _outcome(rid, sent, events, tokens, finish="stop", decode="d0"):
    return Outcome(rid, sent, sent, list(events), list(tokens), finish, None, decode, rid, list(range(tokens[-1])))


def test_outcome_figures_match_the_serving_benchmarks_definitions():
    o = _outcome("a", 1.0, [1.5, 1.7, 2.3], [1, 2, 5])
    assert o.ttft_s == pytest.approx(0.5)
    assert o.tpot_s == pytest.approx((2.3 - 1.5) / 4)  # (last - first) / (tokens - 1)
    assert o.itl_s() == pytest.approx([0.2, 0.6, 0.0, 0.0])  # three tokens arrived in one event


def test_summary_slo_goodput_and_losses_by_hand():
    good = _outcome("a", 0.0, [1.0, 2.0], [1, 11])  # TTFT 1, TPOT 0.1
    slow = _outcome("b", 0.0, [1.0, 5.0], [1, 11])  # TPOT 0.4: misses
    lost = Outcome("c", 0.0, 0.0, error="HTTP 502: x")
    trace = Trace(t_s=[0, 1], used=[[10, 30], [20, 20]], running=[[1, 1], [1, 1]], capacity=[100, 100])
    s = summarize([good, slow, lost], trace, Slo(ttft_s=2.0, tpot_s=0.2), [2, 1], {"committed": 3}, 6.0)
    assert (s["completed"], s["lost"], s["duplicated"]) == (2, 1, 0)
    assert s["slo_attainment"] == pytest.approx(1 / 3)  # a lost request misses its SLO
    assert s["goodput_rps"] == pytest.approx(1 / 5.0)  # one met, makespan = last token at 5 s
    assert s["retractions"] == 3 and s["migrations"] == {"committed": 3}
    assert s["kv_peak_frac"] == [0.2, 0.3]
    assert kv_imbalance(trace) == pytest.approx((30 + 20) / (20 + 20))


def test_head_mae_uses_the_final_length_of_finished_requests_only():
    outs = [_outcome("a", 0, [1, 2], [1, 100]), Outcome("b", 0, 0, error="x")]
    trace = Trace(predictions={"a": [(10, 80.0), (50, 60.0)], "b": [(5, 1.0)]})
    h = head_mae(outs, trace)
    assert h["mae_tokens"] == pytest.approx((10 + 10) / 2) and h["samples"] == 2  # true: 90 and 50 remaining
    assert h["mae_tokens_eos"] == pytest.approx(10)
    cut = [_outcome("a", 0, [1, 2], [1, 100], finish="length")]
    assert head_mae(cut, trace)["mae_tokens_eos"] is None  # cut at max_new_tokens: not an end of its own


def test_aggregate_ratios_are_per_seed_against_round_robin():
    def run(g, t):
        return {"goodput_rps": g, "requests": 24, "slo_met": 12, "slo_attainment": 0.5, "p50_tpot_ms": t,
                "p99_tpot_ms": t, "p99_ttft_s": 1.0, "p99_itl_ms": 1.0, "retractions": 0, "lost": 0, "duplicated": 0,
                "migrations": {}, "head": {"mae_tokens": None}}  # fmt: skip

    agg = aggregate({"round_robin": [run(1.0, 100), run(2.0, 100)], "ares": [run(1.5, 50), run(2.0, 80)]})
    r = agg["ares"]["goodput_rps_vs_base"]
    assert (r["mean"], r["min"], r["max"]) == pytest.approx((1.25, 1.0, 1.5))
    assert agg["ares"]["p99_tpot_ms_vs_base"]["mean"] == pytest.approx(0.65)
    assert "| ares |" in markdown(agg)
    assert "- ares: 24/48 vs 24/48, 1.00x" in markdown(agg) and "too few requests to tell" in markdown(agg)


def test_attainment_ratio_interval_by_hand():
    # Katz: ratio (20/24)/(10/24) = 2, se = sqrt(1/20 - 1/24 + 1/10 - 1/24) = 0.2582, 2 exp(+-1.96 se) = 1.206..3.317
    r = attainment_ratio(20, 24, 10, 24)
    assert (r["ratio"], r["low"], r["high"], r["tells"]) == pytest.approx((2.0, 1.2057, 3.3175, True), abs=1e-3)
    small = attainment_ratio(12, 24, 10, 24)  # se = sqrt(0.1): 0.646..2.23, spans 1
    assert small["ratio"] == pytest.approx(1.2) and small["low"] < 1 < small["high"] and not small["tells"]
    assert attainment_ratio(0, 24, 3, 24)["ratio"] == pytest.approx((0.5 / 24.5) / (3.5 / 24.5))  # 0.5 added


def test_retractions_are_counted_from_the_servers_own_log_lines(tmp_path):
    log = tmp_path / "decode0.log"
    log.write_bytes(b"old: KV cache pool is full. Retract requests. #retracted_reqs: 7, #new_tokens_gained: 1\n")
    offset = log.stat().st_size
    with open(log, "ab") as f:
        f.write(b"[x] KV cache pool is full. Retract requests. #retracted_reqs: 2, #new_tokens_gained: 30\n")
        f.write(b"Testing retraction. #retracted_reqs: 5\n")  # SGLang's test mode, not a full pool
        f.write(b"[y] KV cache pool is full. Retract requests. #retracted_reqs: 1, #new_tokens_gained: 9\n")
    assert retractions([log], [offset]) == [3]


def test_a_cluster_without_a_router_needs_no_router_port():
    spec = ClusterSpec(model_path="m", n_decode=2, start_router=False)
    servers = spec.servers(list(range(11000, 11000 + spec.n_ports)))
    assert spec.n_ports == 4 and [s.role for s in servers] == ["prefill", "decode", "decode"]


def test_a_negative_term_is_dropped_not_kept():
    import numpy as np

    from ares.live.simcheck import fit_linear_nonneg

    x = np.column_stack([np.ones(4), [1.0, 2.0, 3.0, 4.0]])
    assert fit_linear_nonneg(x, np.array([4.0, 3.0, 2.0, 1.0]))[1] == 0.0  # a falling "cost" is not a cost


def test_measured_cost_profiles_are_found_by_name(tmp_path, monkeypatch):
    from ares.sim import cost_model

    path = tmp_path / "cost_profiles.json"
    measured = cost_model.CostModel("cpu-x-measured", 0.03, 0.004, 1e-4, 0.4, 0.004, 2048, 23040, 8e7, 0.3, 0.6)
    cost_model.write_measured(measured, {"commit": "abc"}, path)
    monkeypatch.setattr(cost_model, "MEASURED_FILE", path)
    assert cost_model.measured_profiles(path)["cpu-x-measured"] == measured
    with pytest.raises(KeyError, match="cpu-x-measured"):
        cost_model.get_cost_model("nope")


def test_request_loads_rebuild_each_servers_batch_and_kv_from_the_outcomes():
    from ares.live.simcheck import request_loads

    requests = [
        {"rid": "a", "arrival_s": 0.0, "prompt_tokens": 10},
        {"rid": "b", "arrival_s": 0.5, "prompt_tokens": 10},
        {"rid": "c", "arrival_s": 0.0, "prompt_tokens": 20},
        {"rid": "x", "arrival_s": 0.0, "prompt_tokens": 5},
    ]
    outcomes = [
        {"rid": "a", "decode": "decode0", "n_output": 11, "ttft_s": 1.0, "tpot_s": 0.1, "error": None},
        {"rid": "b", "decode": "decode0", "n_output": 11, "ttft_s": 0.5, "tpot_s": 0.1, "error": None},
        {"rid": "c", "decode": "decode1", "n_output": 6, "ttft_s": 1.0, "tpot_s": 0.2, "error": None},
        {"rid": "x", "decode": "decode1", "n_output": 0, "ttft_s": None, "tpot_s": None, "error": "HTTP 502"},
    ]
    rows = request_loads(outcomes, requests, samples=101)
    # a and b share decode0 over the same second (tokens 1 to 2 s): batch 2, KV 2 x (10 + 11 x 0.5) on average.
    assert rows[0] == pytest.approx([2.0, 31.0, 0.1], rel=1e-2) and rows[1] == pytest.approx(rows[0])
    assert rows[2] == pytest.approx([1.0, 23.0, 0.2], rel=1e-2)  # c alone on decode1; the failed x is left out
    assert len(rows) == 3


def test_the_live_view_shows_requests_done_and_each_servers_kv():
    from rich.console import Console

    from ares.live.monitor import Monitor
    from ares.live.run import Display

    display = Display(n=24, enabled=False)
    mon = Monitor(["http://127.0.0.1:1", "http://127.0.0.1:2"])  # never started: only its last sample is read
    mon.trace.used.append([640, 1280])
    mon.trace.capacity = [1280, 1280]
    display.begin("ares (seed 1)", mon)
    display.request_done(_outcome("a", 0.0, [1.0, 2.0], [1, 5]))
    display.request_done(Outcome("b", 0.0, 0.0, error="HTTP 502"))
    console = Console(width=100, record=True)
    console.print(display._render())
    text = console.export_text()
    assert "ares (seed 1)" in text and "2/24 done" in text and "1 failed" in text
    assert "decode0 KV" in text and " 50% (640/1280)" in text and "100% (1280/1280)" in text


def test_a_request_the_server_never_answers_is_given_up_after_the_request_timeout():
    """The replay's client gives up on a request after `request_timeout_s` (lost, with the reason) instead of holding
    the whole replay; the others are unaffected. An in-process aiohttp server that answers one prompt never."""
    import asyncio

    from aiohttp import web

    from ares.live.client import replay
    from ares.live.workload import LiveRequest

    release = asyncio.Event()

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["input_ids"] == [1]:
            await release.wait()  # stuck, as a request in a wedged KV transfer, until the test ends
        resp = web.StreamResponse()
        await resp.prepare(request)
        meta = {"completion_tokens": 1, "finish_reason": {"type": "stop"}}
        await resp.write(b"data: " + json.dumps({"meta_info": meta, "output_ids": [7]}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def main():
        app = web.Application()
        app.router.add_post("/generate", generate)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        reqs = [LiveRequest("stuck", "p", (1,), 0.0, 1, "eos"), LiveRequest("fine", "p", (2,), 0.0, 1, "eos")]
        try:
            return await replay(f"http://127.0.0.1:{port}", reqs, 4, request_timeout_s=1.0)
        finally:
            release.set()
            await runner.cleanup()

    stuck, fine = asyncio.run(main())
    assert not stuck.ok and stuck.error == "no answer within 1 s (client gave up)"
    assert fine.ok and fine.n_output == 1


def test_auto_rate_scales_the_reference_load_by_the_slower_of_decode_and_prefill():
    from ares.live.autorate import pick_rate

    assert pick_rate({"tpot_s": 0.027, "ttft_s": 0.62})["rate"] == pytest.approx(0.12)  # the reference machine
    assert pick_rate({"tpot_s": 0.054, "ttft_s": 0.62})["rate"] == pytest.approx(0.06)  # decode twice as slow
    slow_prefill = pick_rate({"tpot_s": 0.027, "ttft_s": 2.48})  # prefill 4x slower: it sets the scale
    assert slow_prefill["rate"] == pytest.approx(0.03) and slow_prefill["speed_vs_reference"] == pytest.approx(0.25)
