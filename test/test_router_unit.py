"""The ARES router's pure parts: request validation, poll parsing, output estimate, snapshot bookkeeping."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import orjson
import pytest
from aiohttp import web

from ares_router.cli import config_from_args, configure_parser
from ares_router.estimate import OutputEstimator
from ares_router.metrics import RouterMetrics
from ares_router.poller import BadPayload, Poller, parse_ares_state, parse_v1_loads
from ares_router.protocol import APIError, parse_request
from ares_router.state import DecodeLoad, ReportedRequest, RouterState

CHAT = "/v1/chat/completions"


def _parse(endpoint: str, body) -> object:
    return parse_request(endpoint, json.dumps(body).encode() if not isinstance(body, bytes) else body)


# -- protocol ----------------------------------------------------------------------------------------------------
def test_valid_requests_parse_with_prompt_and_output_caps():
    chat = _parse(CHAT, {"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 7, "stream": True})
    assert chat.stream and chat.max_tokens == 7 and chat.prompt_tokens == 10 + 4
    comp = _parse("/v1/completions", {"prompt": [1, 2, 3], "unknown_field": {"kept": True}})
    assert comp.prompt_tokens == 3 and comp.max_tokens == 16 and comp.body["unknown_field"] == {"kept": True}
    gen = _parse("/generate", {"input_ids": [5] * 9, "sampling_params": {"max_new_tokens": 3}})
    assert (gen.prompt_tokens, gen.max_tokens, gen.stream) == (9, 3, False)


@pytest.mark.parametrize(
    "endpoint, body, fragment",
    [
        (CHAT, b"{not json", "not valid JSON"),
        (CHAT, b"[1, 2]", "must be a JSON object"),
        (CHAT, {"max_tokens": 4}, "'messages' is required"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"},
            "'max_tokens' must be an integer",
        ),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "'stream' must be a boolean"),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "n": 2}, "'n' = 2 is not supported"),
        (CHAT, {"messages": [{"content": "hi"}]}, "string 'role'"),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "'temperature' must be"),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "bootstrap_room": 1}, "set by the router"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "batched prompts"),
        ("/v1/completions", {"prompt": "a", "best_of": 3}, "'best_of' = 3"),
        ("/v1/completions", {"prompt": "a", "max_tokens": -1}, ">= 0"),
        ("/generate", {"text": "a", "input_ids": [1]}, "exactly one of"),
        ("/generate", {"text": ["a", "b"]}, "batched"),
        ("/generate", {"text": "a", "sampling_params": {"n": 4}}, "'sampling_params.n' = 4"),
        ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 1.5}}, "max_new_tokens' must be an integer"),
    ],
)
def test_invalid_requests_get_openai_style_400(endpoint, body, fragment):
    with pytest.raises(APIError) as info:
        _parse(endpoint, body)
    err = info.value
    assert err.status == 400 and fragment in err.message
    payload = orjson.loads(err.body())["error"]
    assert payload["type"] == "invalid_request_error" and payload["message"] == err.message


# -- poll parsing ------------------------------------------------------------------------------------------------
V1_LOADS = {
    "loads": [
        {
            "dp_rank": 0,
            "num_running_reqs": 3,
            "num_waiting_reqs": 1,
            "num_used_tokens": 900,
            "max_total_num_tokens": 4096,
            "disaggregation": {"decode_prealloc_queue_reqs": 2, "decode_transfer_queue_reqs": 1},
        }
    ]
}


def test_parse_v1_loads_and_ares_state():
    load = parse_v1_loads(V1_LOADS)
    assert (load.capacity_tokens, load.used_tokens, load.running_reqs, load.queued_reqs) == (4096, 900, 3, 4)
    assert load.source == "v1_loads" and load.rids == ()
    state = parse_ares_state(
        {
            "version": 1,
            "capacity_tokens": 1000,
            "used_tokens": 120,
            "requests": [
                {"rid": "a", "prompt_tokens": 50, "generated_tokens": 10, "predicted_remaining": 30.5},
                {
                    "rid": "b",
                    "prompt_tokens": 50,
                    "generated_tokens": 10,
                    "predicted_remaining": None,
                    "predicted_p90": 9,
                },
            ],
        }
    )
    assert state.source == "ares_state" and state.running_reqs == 2 and state.queued_reqs == 0
    assert state.rids == ("a", "b") and state.prompt_tokens.tolist() == [50, 50]
    assert state.predicted_remaining[0] == 30.5 and np.isnan(state.predicted_remaining[1])
    assert np.isnan(state.predicted_p90[0]) and state.predicted_p90[1] == 9.0
    with pytest.raises(BadPayload):
        parse_v1_loads({"loads": [{"num_running_reqs": 1}]})
    with pytest.raises(BadPayload):
        parse_ares_state({"capacity_tokens": 1, "used_tokens": 0, "requests": [{"rid": "x"}]})


# -- estimate ----------------------------------------------------------------------------------------------------
def test_output_estimate_grows_with_prompt_and_respects_max_tokens():
    est = OutputEstimator(base_tokens=100, per_prompt_token=0.5, floor_tokens=10, cap_tokens=1000)
    assert est.total(100, None) == 150 and est.total(10_000, None) == 1000 and est.total(100, 20) == 20
    assert est.remaining(100, None, 50) == 100  # before the estimate: what is left of it
    assert est.remaining(100, None, 400) == 400  # past it: as long again, not "finishing now"
    assert est.remaining(100, 410, 400) == 10  # never beyond max_tokens


# -- state -------------------------------------------------------------------------------------------------------
def _state(policy: str = "least_kv", n: int = 2) -> RouterState:
    s = RouterState.create([("http://p0", 8998)], [f"http://d{i}" for i in range(n)], policy, seed=0)
    for b in s.prefills:
        s.poll_ok(b, None, now=0.0)
    for d in s.decodes:
        s.poll_ok(d, DecodeLoad(capacity_tokens=1000, used_tokens=0, running_reqs=0), now=0.0)
    s.refresh(now=0.0)
    return s


def test_burst_between_polls_spreads_over_instances():
    s = _state("least_kv")
    chosen = [s.choose_decode(prompt_tokens=100, max_tokens=10) for _ in range(6)]
    assert sorted(chosen) == [0, 0, 0, 1, 1, 1]  # pending prompts count, so the burst alternates
    s2 = _state("ares")
    chosen = [s2.choose_decode(prompt_tokens=100, max_tokens=10) for _ in range(4)]
    assert sorted(chosen) == [0, 0, 1, 1]


def test_snapshot_counts_tracked_requests_and_unexplained_load():
    s = _state("ares")
    # decode0 carries 600 tokens of requests this router does not relay; the router relays one running request on it
    s.poll_ok(s.decodes[0], DecodeLoad(1000, 600, 3), now=0.0)
    t = s.start("r1", decode=0, prefill=0, prompt_tokens=50, max_tokens=100)
    t.started, t.generated = True, 20
    s.start("r2", decode=1, prefill=0, prompt_tokens=30, max_tokens=10)  # not running yet: pending
    snap = s.refresh(now=0.5)
    d0, d1 = snap.instances
    assert list(d0.request_ids) == ["r1"] and d0.lengths[0] == 70 and d0.used_tokens == 600
    assert d0.predicted_remaining[0] == pytest.approx(80)  # min(estimate, max_tokens) - generated
    assert list(d1.pending_ids) == ["r2"] and snap.used[1] == 30
    assert s.choose_decode(prompt_tokens=10, max_tokens=10) == 1  # the lightly loaded one
    s.finish("r1")
    s.finish("r1")  # idempotent
    assert s.decodes[0].inflight == 0 and "r1" not in s.requests


def test_ares_state_reports_override_router_bookkeeping():
    s = _state("ares")
    s.start("r1", decode=0, prefill=0, prompt_tokens=10, max_tokens=None)
    reported = (ReportedRequest("r1", 100, 40, 7.0, 12.0), ReportedRequest("other", 10, 1, None, None))
    s.poll_ok(s.decodes[0], DecodeLoad.from_reports(1000, 160, reported), now=0.0)
    inst = s.refresh(now=0.0).instances[0]
    assert list(inst.request_ids) == ["r1", "other"]
    assert inst.lengths.tolist() == [140, 11] and inst.predicted_remaining[0] == 7.0
    assert inst.predicted_upper[0] == 12.0 and np.isnan(inst.predicted_upper[1])


def test_failed_and_stale_instances_are_not_chosen_until_they_recover():
    s = _state("round_robin")
    s.mark_failed(s.decodes[0], "connection refused")
    assert {s.choose_decode(10, 10) for _ in range(4)} == {1}
    s.refresh(now=s.stale_after_s + 1)  # no successful poll for that long: everything is stale
    assert not any(d.healthy for d in s.decodes)
    with pytest.raises(Exception, match="no healthy"):
        s.choose_decode(10, 10)
    s.poll_ok(s.decodes[0], DecodeLoad(1000, 0, 0), now=s.stale_after_s + 1)
    s.refresh(now=s.stale_after_s + 1)
    assert {s.choose_decode(10, 10) for _ in range(3)} == {0}
    assert s.cluster_json()["decode"][1]["healthy"] is False


def test_round_robin_alternates_and_excluded_instance_is_skipped():
    s = _state("round_robin", n=3)
    assert [s.choose_decode(10, 10) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert s.choose_decode(10, 10, exclude=[0]) != 0


def test_cli_flags_build_a_config():
    args = configure_parser(__import__("argparse").ArgumentParser()).parse_args(
        ["--prefill", "http://p:1", "8998", "--prefill", "http://p:2", "--decode", "http://d:1", "--policy", "random"]
    )
    cfg = config_from_args(args)
    assert cfg.prefill == [("http://p:1", 8998), ("http://p:2", None)] and cfg.decode == ["http://d:1"]
    assert cfg.policy == "random" and cfg.host == "127.0.0.1"


def test_metrics_expose_per_instance_load_and_counters():
    s = _state("ares")
    s.poll_ok(s.decodes[1], DecodeLoad(1000, 250, 2, queued_reqs=1), now=0.0)
    s.mark_failed(s.decodes[0], "down")
    s.refresh(now=0.0)
    m = RouterMetrics(s)
    m.dispatches.labels("decode1", "ares").inc()
    m.latency.labels("/generate").observe(0.2)
    text = m.render().decode()
    for line in (
        'ares_decode_healthy{instance="decode0",url="http://d0"} 0.0',
        'ares_decode_used_tokens{instance="decode1",url="http://d1"} 250.0',
        'ares_decode_running_requests{instance="decode1",url="http://d1"} 2.0',
        'ares_decode_queued_requests{instance="decode1",url="http://d1"} 1.0',
        'ares_dispatch_total{instance="decode1",policy="ares"} 1.0',
        'ares_request_latency_seconds_bucket{endpoint="/generate",le="0.25"} 1.0',
    ):
        assert line in text, line


def test_poller_prefers_ares_state_falls_back_to_v1_loads_and_tracks_health():
    """Against in-process HTTP servers: an ARES decode server (/ares/state), a plain one (404 -> /v1/loads, the
    404 remembered), and a server that goes away (unhealthy) and comes back (healthy again)."""
    hits: list[tuple[str, str]] = []

    def make_app(name: str, ares: bool) -> web.Application:
        async def ares_state(request: web.Request) -> web.Response:
            hits.append((name, "/ares/state"))
            if not ares:
                return web.Response(status=404)
            req = {"rid": "x1", "prompt_tokens": 10, "generated_tokens": 5, "predicted_remaining": 42.0}
            return web.json_response({"capacity_tokens": 500, "used_tokens": 15, "requests": [req]})

        async def loads(request: web.Request) -> web.Response:
            hits.append((name, "/v1/loads"))
            return web.json_response(
                {"loads": [{"num_running_reqs": 0, "num_used_tokens": 7, "max_total_num_tokens": 900}]}
            )

        app = web.Application()
        app.router.add_get("/ares/state", ares_state)
        app.router.add_get("/v1/loads", loads)
        return app

    async def serve(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]

    async def main() -> None:
        ares_runner, ares_port = await serve(make_app("ares", True))
        plain_runner, plain_port = await serve(make_app("plain", False))
        pre_runner, pre_port = await serve(make_app("prefill", False))
        urls = [f"http://127.0.0.1:{p}" for p in (ares_port, plain_port)]
        state = RouterState.create([(f"http://127.0.0.1:{pre_port}", 1)], urls, "ares")
        poller = Poller(state, interval_s=0.05, timeout_s=1.0, reprobe_s=60.0)
        await poller.start()
        await asyncio.sleep(0.3)
        d_ares, d_plain = state.decodes
        assert d_ares.load.source == "ares_state" and d_ares.load.rids == ("x1",) and d_ares.healthy
        assert d_plain.load.source == "v1_loads" and d_plain.load.capacity_tokens == 900 and d_plain.healthy
        assert state.prefills[0].healthy
        assert hits.count(("plain", "/ares/state")) == 1 and hits.count(("plain", "/v1/loads")) >= 3
        inst = state.snapshot.instances[0]
        assert inst.predicted_remaining.tolist() == [42.0] and inst.capacity_tokens == 500
        await plain_runner.cleanup()  # the plain server goes away ...
        await asyncio.sleep(0.3)
        assert not d_plain.healthy and d_plain.last_error and not state.snapshot.healthy[1]
        plain_runner, _ = await serve(make_app("plain", False), plain_port)  # ... and comes back
        await asyncio.sleep(0.3)
        assert d_plain.healthy and state.snapshot.healthy[1]
        await poller.stop()
        for r in (ares_runner, plain_runner, pre_runner):
            await r.cleanup()

    asyncio.run(main())


def test_poller_tolerates_missed_polls_but_not_a_refused_connection():
    """A busy server may miss a poll (here: answers 503) without leaving rotation; `failure_threshold` misses in a
    row take it out; a refused connection (the process is gone) takes it out at once."""
    failing = {"n": 0}

    async def loads(request: web.Request) -> web.Response:
        if failing["n"] > 0:
            failing["n"] -= 1
            return web.Response(status=503)
        return web.json_response({"loads": [{"num_running_reqs": 0, "num_used_tokens": 0, "max_total_num_tokens": 9}]})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/v1/loads", loads)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        state = RouterState.create([(url, 1)], [url], "least_kv")
        poller = Poller(state, interval_s=3600, timeout_s=1.0, failure_threshold=3)  # rounds run by hand below
        await poller.start()
        d = state.decodes[0]
        assert d.healthy
        failing["n"] = 4  # the decode's poll and the prefill's (same server) each take one
        await poller.poll_once()
        assert d.healthy and d.consecutive_failures == 1 and "503" in d.last_error
        await poller.poll_once()
        assert d.healthy and state.snapshot.healthy[0]
        await poller.poll_once()
        assert d.healthy and d.consecutive_failures == 0  # recovered before the third miss
        failing["n"] = 6
        for _ in range(3):
            await poller.poll_once()
        assert not d.healthy and not state.prefills[0].healthy and not state.snapshot.healthy[0]
        await poller.poll_once()
        assert d.healthy
        await runner.cleanup()  # the server goes away: one refused poll is enough
        await poller.poll_once()
        assert not d.healthy and d.consecutive_failures == 1 and "Connect" in d.last_error
        await poller.stop()

    asyncio.run(main())
