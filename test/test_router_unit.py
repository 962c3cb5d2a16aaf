"""The ARES router without SGLang: request validation, error shapes, poll parsing (both `/ares/state` versions),
output estimate, snapshot bookkeeping, metrics, and the whole router in-process against stand-in servers.

Nothing here waits a fixed time and then counts: every wait is for a condition, with a generous deadline
(`wait_for` / `async_wait_for`), because CI machines are busy.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web

from ares_router.cli import config_from_args, configure_parser
from ares_router.estimate import OutputEstimator
from ares_router.metrics import RouterMetrics
from ares_router.policy import NewRequest
from ares_router.poller import Poller
from ares_router.protocol import APIError, check_model, model_accepted, parse_request
from ares_router.reports import BadPayload, parse_ares_state, parse_v1_loads
from ares_router.state import DecodeLoad, ReportedRequest, RouterState

CHAT = "/v1/chat/completions"
DEADLINE_S = 30.0  # generous: a condition that needs longer than this on a busy machine is a real failure


def wait_for(predicate: Callable[[], Any], timeout: float = DEADLINE_S, what: str = "the condition") -> Any:
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return value


async def async_wait_for(predicate: Callable[[], Any], timeout: float = DEADLINE_S, what: str = "the condition") -> Any:
    """`wait_for` inside an event loop: the loop keeps running (pollers, servers) while the test waits."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return value


def test_wait_helpers_return_the_value_and_fail_after_the_deadline():
    assert wait_for(lambda: [1]) == [1]
    with pytest.raises(AssertionError, match="waiting for never"):
        wait_for(lambda: 0, timeout=0.05, what="never")
    flag = {"n": 0}

    async def main() -> None:
        asyncio.get_running_loop().call_later(0.05, flag.update, {"n": 3})
        assert await async_wait_for(lambda: flag["n"]) == 3
        with pytest.raises(AssertionError, match="timed out"):
            await async_wait_for(lambda: False, timeout=0.05)

    asyncio.run(main())


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
def test_invalid_requests_get_400_in_sglangs_shape(endpoint, body, fragment):
    with pytest.raises(APIError) as info:
        _parse(endpoint, body)
    err = info.value
    assert err.status == 400 and fragment in err.message
    payload = orjson.loads(err.body(endpoint))
    if endpoint == "/generate":  # SGLang's /generate: {"error": {"message": ...}}
        assert payload == {"error": {"message": err.message}}
    else:  # SGLang's ErrorResponse, at the top level
        assert payload == {
            "object": "error",
            "message": err.message,
            "type": "BadRequestError",
            "param": err.param,
            "code": 400,
        }


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
    assert cfg.admission.reserve_tokens == 512  # SGLang's default --num-reserved-decode-tokens


def test_reserve_tokens_flag_reaches_the_policys_admission():
    args = configure_parser(__import__("argparse").ArgumentParser()).parse_args(
        ["--prefill", "http://p:1", "--decode", "http://d:1", "--reserve-tokens", "64", "--policy", "least_kv"]
    )
    cfg = config_from_args(args)
    assert cfg.admission.reserve_tokens == 64
    request = NewRequest("r", 400, 10.0, 10)

    def admits(**kwargs) -> list[bool]:
        s = RouterState.create(cfg.prefill, cfg.decode * 2, cfg.policy, seed=0, **kwargs)
        s.start("a", decode=0, prefill=0, prompt_tokens=300, max_tokens=10)  # relayed: its max_tokens is known
        for d in s.decodes:
            s.poll_ok(d, DecodeLoad(1000, 0, 0), now=0.0)
        s.poll_ok(s.decodes[0], DecodeLoad.from_reports(1000, 300, [ReportedRequest("a", 300, 1, 5.0)]), now=0.0)
        return [bool(x) for x in s.refresh(now=0.0).admits(request)]

    # decode0: 1000 - 301 = 699 free, one running request that may reach 310 tokens. A 400-token prompt (max_tokens
    # 10) needs 400 + R <= 699 - R: yes with the flag's R = 64, no with SGLang's default 512.
    assert admits(admission=cfg.admission) == [True, True]
    assert admits() == [False, True]


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
        await async_wait_for(lambda: hits.count(("plain", "/v1/loads")) >= 3, what="three polls of the plain server")
        await async_wait_for(lambda: poller.rounds >= 3, what="three whole poll rounds")
        d_ares, d_plain = state.decodes
        assert d_ares.load.source == "ares_state" and d_ares.load.rids == ("x1",) and d_ares.healthy
        assert d_plain.load.source == "v1_loads" and d_plain.load.capacity_tokens == 900 and d_plain.healthy
        assert state.prefills[0].healthy
        assert hits.count(("plain", "/ares/state")) == 1  # the 404 is remembered (reprobe after 60 s)
        inst = state.snapshot.instances[0]
        assert inst.predicted_remaining.tolist() == [42.0] and inst.capacity_tokens == 500
        await plain_runner.cleanup()  # the plain server goes away ...
        await async_wait_for(
            lambda: not d_plain.healthy and not state.snapshot.healthy[1], what="the gone server to be unhealthy"
        )
        assert d_plain.last_error
        plain_runner, _ = await serve(make_app("plain", False), plain_port)  # ... and comes back
        await async_wait_for(
            lambda: d_plain.healthy and state.snapshot.healthy[1], what="the server to be healthy again"
        )
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


# -- error shapes and the served-model check -----------------------------------------------------------------------
def test_router_errors_have_sglangs_shape_per_endpoint_and_in_streams():
    err = APIError(503, "no healthy decode server is available; retry later")
    assert orjson.loads(err.body(CHAT)) == {
        "object": "error",
        "message": err.message,
        "type": "ServiceUnavailableError",
        "param": None,
        "code": 503,
    }
    assert orjson.loads(err.body("/generate")) == {"error": {"message": err.message}}
    assert orjson.loads(APIError(404, "x").body("/v1/models"))["type"] == "NotFoundError"
    # A stream that already started ends with the error event and [DONE], as SGLang's streams do.
    events = APIError(502, "decode server stream failed").stream_event(CHAT).split(b"\n\n")
    assert events[1:] == [b"data: [DONE]", b""]
    assert orjson.loads(events[0][len(b"data: ") :]) == {
        "error": orjson.loads(APIError(502, "decode server stream failed").body(CHAT))
    }
    gen = orjson.loads(APIError(502, "broke").stream_event("/generate").split(b"\n\n")[0][len(b"data: ") :])
    assert gen == {"error": {"message": "broke", "type": "BadGatewayError", "code": 502, "retryable": True}}


@pytest.mark.parametrize(
    "model, accepted",
    [
        (None, True),  # no model: whatever is loaded
        ("default", True),  # SGLang's placeholder when a request names none
        ("org/served-model", True),
        ("my-lora", True),  # an adapter /v1/models lists
        ("org/served-model:my-lora", True),  # base:adapter form (SGLang resolves the adapter)
        ("s3://bucket/m:v1", True),  # a served id that itself contains ':'
        ("s3://bucket/m:v1:adapter", True),
        ("org/other-model", False),
        ("org/served-model-2", False),
        ("other:my-lora", False),
        ("", False),
    ],
)
def test_model_names_are_accepted_as_sglang_reads_them(model, accepted):
    served = frozenset({"org/served-model", "my-lora", "s3://bucket/m:v1"})
    assert model_accepted(model, served) is accepted
    named = {} if model is None else {"model": model}
    parsed = _parse(CHAT, {"messages": [{"role": "user", "content": "hi"}], **named})
    if accepted:
        check_model(parsed, served)
    else:
        with pytest.raises(APIError) as info:
            check_model(parsed, served)
        e = info.value
        assert (e.status, e.err_type, e.param) == (404, "model_not_found", "model")
        assert f"The model '{model}' does not exist" in e.message and "org/served-model" in e.message
    check_model(_parse("/generate", {"text": "x", "model": "anything"}), served)  # /generate has no model field


# -- /ares/state version 2 (columns) -------------------------------------------------------------------------------
V2_STATE = {
    "version": 2,
    "capacity_tokens": 1000,
    "used_tokens": 130,
    "queued_reqs": 2,
    "rids": ["a", "b", "c"],
    "prompt_tokens": [50, 20, 10],
    "generated_tokens": [10, 0, 40],
    "predicted_remaining": [30.5, None, 7],
    "predicted_p90": None,
    "smoothed_remaining": [1, 2, 3],  # unknown keys are ignored
}


def _b64(values: list, dtype: str) -> str:
    import base64

    return base64.b64encode(np.asarray([np.nan if v is None else v for v in values], dtype=dtype).tobytes()).decode()


def _binary(state: dict) -> dict:
    """`state` with its numeric columns in the binary form (base64 little-endian int32 / float32)."""
    out = dict(state)
    for key, dtype in (("prompt_tokens", "<i4"), ("generated_tokens", "<i4"), ("predicted_remaining", "<f4")):
        out[key] = _b64(state[key], dtype)
    return out


@pytest.mark.parametrize("encode", [lambda st: st, _binary], ids=["json-arrays", "base64-binary"])
def test_parse_ares_state_version_2_columns_equals_version_1_rows(encode):
    v2 = parse_ares_state(encode(V2_STATE))
    rows = [
        {"rid": r, "prompt_tokens": p, "generated_tokens": g, "predicted_remaining": q}
        for r, p, g, q in zip(V2_STATE["rids"], [50, 20, 10], [10, 0, 40], [30.5, None, 7], strict=True)
    ]
    v1 = parse_ares_state(
        {"version": 1, "capacity_tokens": 1000, "used_tokens": 130, "queued_reqs": 2, "requests": rows}
    )
    for load in (v1, v2):
        assert (load.source, load.running_reqs, load.queued_reqs, load.rids) == ("ares_state", 3, 2, ("a", "b", "c"))
        assert load.prompt_tokens.tolist() == [50, 20, 10] and load.generated_tokens.tolist() == [10, 0, 40]
        assert load.predicted_remaining[0] == 30.5 and np.isnan(load.predicted_remaining[1])
        assert load.predicted_remaining[2] == 7.0 and load.predicted_remaining.dtype == np.float64
        assert load.predicted_p90.shape == (3,) and np.isnan(load.predicted_p90).all()
    empty = {**V2_STATE, "rids": [], "prompt_tokens": [], "generated_tokens": [], "predicted_remaining": []}
    assert parse_ares_state(encode(empty)).running_reqs == 0
    assert parse_ares_state(encode(empty)).predicted_remaining.shape == (0,)
    no_head = {k: v for k, v in encode(V2_STATE).items() if k not in ("predicted_remaining", "predicted_p90")}
    assert np.isnan(parse_ares_state(no_head).predicted_remaining).all()


def test_the_poller_reads_each_servers_admission_rule_from_its_report():
    """A server started with `--ares-admission predictive` says so in `/ares/state`; the router's view of it then
    admits by that rule (`DecodeLoad.admission` -> the snapshot). Silent or older servers run SGLang's."""
    assert parse_ares_state(V2_STATE).admission == "sglang"
    for mode in ("predictive", "predictive_point"):
        v2 = parse_ares_state({**V2_STATE, "admission": {"mode": mode, "retractions": 0}})
        v1 = parse_ares_state(
            {"version": 1, "capacity_tokens": 10, "used_tokens": 0, "requests": [], "admission": {"mode": mode}}
        )
        assert v2.admission == v1.admission == mode
    with pytest.raises(BadPayload, match="unknown admission mode"):
        parse_ares_state({**V2_STATE, "admission": {"mode": "guess"}})


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"version": 3}, "unsupported version 3"),
        ({"rids": ["a", 2, "c"]}, "version 2"),  # a rid that is not a string
        ({"rids": "abc"}, "'rids' must be a list"),
        ({"prompt_tokens": [50, 20]}, "'prompt_tokens' must be a base64 string or a list of 3"),
        ({"generated_tokens": [10, None, 40]}, "non-negative"),
        ({"generated_tokens": [10, -1, 40]}, "non-negative"),
        ({"predicted_remaining": [1.0, "x", 2.0]}, "version 2"),
        ({"predicted_remaining": [1.0, 2.0]}, "'predicted_remaining' must be a base64 string or a list of 3"),
        ({"capacity_tokens": None}, "version 2"),
        ({"prompt_tokens": _b64([50, 20], "<i4")}, "must hold 3 int32 values \\(12 bytes\\), got 8"),
        ({"predicted_remaining": _b64([1.0, 2.0, 3.0], "<f8")}, "must hold 3 float32 values"),  # float64: 24 bytes
        ({"generated_tokens": "A"}, "not valid base64"),
        ({"generated_tokens": _b64([1, -5, 2], "<i4")}, "non-negative"),
        ({"predicted_remaining": 7}, "a base64 string or a list of 3 numbers"),
    ],
)
def test_bad_version_2_bodies_are_bad_polls(change, fragment):
    with pytest.raises(BadPayload, match=fragment):
        parse_ares_state({**V2_STATE, **change})
    with pytest.raises(BadPayload, match="unsupported version"):
        parse_ares_state(["not", "an", "object"])


# -- state: own rows, last prediction, demand at the horizon -------------------------------------------------------
def test_router_rows_are_the_unreported_requests_in_dispatch_order():
    s = _state("ares")
    for i in range(5):
        s.start(f"r{i}", decode=0, prefill=0, prompt_tokens=10 * (i + 1), max_tokens=100)
    s.requests["r3"].started, s.requests["r3"].generated = True, 4  # running, not reported yet
    reported = (ReportedRequest("r1", 20, 3, 9.0), ReportedRequest("r4", 50, 1, None), ReportedRequest("x", 5, 5, 1))
    s.poll_ok(s.decodes[0], DecodeLoad.from_reports(1000, 90, reported), now=0.0)
    inst = s.refresh(now=0.0).instances[0]
    assert list(inst.request_ids) == ["r1", "r4", "x", "r3"]  # the server's rows, then the router's running one
    assert list(inst.pending_ids) == ["r0", "r2"]  # dispatched, not running: in dispatch order
    # r4 has no prediction yet: the estimate from its prompt, capped by its max_tokens (100), minus generated
    assert inst.predicted_remaining[1] == pytest.approx(min(s.estimator.total(50, 100), 100) - 1)
    assert inst.predicted_remaining[0] == 9.0 and inst.lengths.tolist() == [23, 51, 10, 44]
    assert "r4" in s.decodes[0].tracked
    s.finish("r4")
    assert "r4" not in s.decodes[0].tracked and s.decodes[0].inflight == 4


def test_last_prediction_comes_from_the_latest_poll_that_reported_the_request():
    s = _state("ares")
    s.start("r1", decode=1, prefill=0, prompt_tokens=10, max_tokens=None)
    assert s.last_prediction("r1") is None and s.last_prediction("unknown") is None
    s.poll_ok(s.decodes[1], DecodeLoad.from_reports(1000, 20, (ReportedRequest("r1", 10, 3, None),)), now=0.0)
    assert s.last_prediction("r1") is None  # reported, but no prediction yet
    s.poll_ok(s.decodes[1], DecodeLoad.from_reports(1000, 20, (ReportedRequest("r1", 10, 5, 40.0),)), now=0.0)
    assert s.last_prediction("r1") == (5.0, 40.0)
    s.poll_ok(s.decodes[1], DecodeLoad.from_reports(1000, 20, (ReportedRequest("r1", 10, 9, 33.5),)), now=0.0)
    assert s.last_prediction("r1") == (9.0, 33.5)
    s.poll_ok(s.decodes[1], DecodeLoad.from_reports(1000, 0, ()), now=0.0)  # finished just before this poll
    assert s.last_prediction("r1") == (9.0, 33.5)  # the poll before still has it


def test_predicted_demand_at_the_horizon_counts_only_requests_still_running_then():
    s = _state("ares")
    lm = s.load_model
    reqs = (ReportedRequest("long", 100, 0, 5000.0), ReportedRequest("short", 300, 0, 10.0))
    s.poll_ok(s.decodes[0], DecodeLoad.from_reports(1000, 400, reqs), now=0.0)
    s.refresh(now=0.0)
    at_h = s.predicted_tokens_at_horizon()
    assert at_h[0] == pytest.approx(100 + lm.horizon_tokens)  # the long one, grown by the horizon; short is done
    assert s.predicted_peak_tokens()[0] >= at_h[0] and at_h[1] == 0.0


# -- the whole router in-process, against stand-in SGLang servers --------------------------------------------------
MODEL = "org/served-model"
TOO_LONG = "The input (5000 tokens) is longer than the model's context length (4096 tokens)."
# SGLang 0.5.23's own error bodies, byte for byte (create_error_response / http_server._create_error_response).
SGLANG_400 = orjson.dumps({"object": "error", "message": TOO_LONG, "type": "BadRequest", "param": None, "code": 400})
SGLANG_400_GENERATE = orjson.dumps({"error": {"message": TOO_LONG}})
SGLANG_500 = orjson.dumps(
    {"object": "error", "message": "Internal server error: boom", "type": "InternalServerError", "param": None,
     "code": 500}
)  # fmt: skip


class FakeSGLang:
    """One stand-in SGLang PD server (prefill or decode) on 127.0.0.1: `/v1/loads`, `/v1/models`, `/abort_request`,
    `/ares/state` (version 2 when asked with `?format=columns`) and the three generation endpoints, answering like
    SGLang (chat streams: a role chunk, one chunk per token, a finish chunk, `[DONE]`).

    `mode`: "ok"; "reject" (400, SGLang's body); "fail" (500, SGLang's body); "break" (a stream that dies after two
    events). A decode in mode "ok" holds each request until two `/ares/state` answers listed it, so the router has
    its prediction (generated 2, `predicted`) before the answer comes."""

    def __init__(self, role: str, mode: str = "ok", output_tokens: int = 10, predicted: float = 5.0):
        self.role, self.mode = role, mode
        self.output_tokens, self.predicted = output_tokens, predicted
        self.foreign_tokens = 0  # KV in use by requests this router did not send (a full server: 4096)
        self.posts: list[tuple[str, dict]] = []
        self.listed: dict[str, int] = {}  # rid -> /ares/state answers that listed it
        self.running: set[str] = set()
        self.aborted: set[str] = set()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> FakeSGLang:
        app = web.Application()
        app.router.add_get("/v1/loads", self._loads)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/ares/state", self._state)
        app.router.add_post("/abort_request", self._abort)
        for path in ("/v1/chat/completions", "/v1/completions", "/generate"):
            app.router.add_post(path, self._generate)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def generation_posts(self) -> list[str]:
        return [p for p, _ in self.posts if p != "/abort_request"]

    async def _loads(self, request: web.Request) -> web.Response:
        load = {"num_running_reqs": len(self.running), "num_used_tokens": 0, "max_total_num_tokens": 4096}
        return web.json_response({"loads": [load]})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model", "root": MODEL}]})

    async def _state(self, request: web.Request) -> web.Response:
        if self.role != "decode":
            return web.Response(status=404)
        rids = sorted(self.running)
        for rid in rids:
            self.listed[rid] = self.listed.get(rid, 0) + 1
        assert request.query.get("format") == "columns"  # the router asks for version 2
        n = len(rids)
        used = 12 * n + self.foreign_tokens
        state = {"version": 2, "capacity_tokens": 4096, "used_tokens": used, "rids": rids, "prompt_tokens": [10] * n,
                 "generated_tokens": [2] * n, "predicted_remaining": [self.predicted] * n}  # fmt: skip
        return web.json_response(_binary(state))  # the fast form; a NaN prediction = none yet

    async def _abort(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.posts.append((request.path, body))
        self.aborted.add(body["rid"])
        return web.json_response({})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        path, rid = request.path, body["rid"]
        self.posts.append((path, body))
        if self.mode == "reject":
            return web.Response(body=SGLANG_400_GENERATE if path == "/generate" else SGLANG_400, status=400,
                                content_type="application/json")  # fmt: skip
        if self.mode == "fail":
            return web.Response(body=SGLANG_500, status=500, content_type="application/json")
        if self.role == "prefill":
            return web.json_response({"id": rid, "text": "", "meta_info": {"completion_tokens": 1}})
        self.running.add(rid)
        try:  # until the router has seen the prediction twice, or aborts the request (as SGLang stops it then)
            await async_wait_for(lambda: self.listed.get(rid, 0) >= 2 or rid in self.aborted, what="two polls")
        finally:
            self.running.discard(rid)
        if rid in self.aborted:
            return web.json_response({"meta_info": {"id": rid, "finish_reason": {"type": "abort"}}})
        n = self.output_tokens
        if not body.get("stream"):
            if path == "/generate":
                return web.json_response({"text": "t" * n, "output_ids": list(range(n)),
                                          "meta_info": {"id": rid, "completion_tokens": n}})  # fmt: skip
            usage = {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}
            return web.json_response({"id": rid, "object": "chat.completion", "choices": [], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events = self._events(path, rid, n, body)
        if self.mode == "break":
            await resp.write(b"".join(events[:2]))
            request.transport.close()  # the decode dies mid-stream
            return resp
        for e in events:
            await resp.write(e)
        await resp.write_eof()
        return resp

    @staticmethod
    def _events(path: str, rid: str, n: int, body: dict) -> list[bytes]:
        def ev(obj: object) -> bytes:
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        if path == "/generate":
            out = [ev({"text": "t" * (k + 1), "meta_info": {"id": rid, "completion_tokens": k + 1}}) for k in range(n)]
        elif path == CHAT:
            chunk = {"id": rid, "object": "chat.completion.chunk"}
            out = [ev({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
            out += [ev({**chunk, "choices": [{"index": 0, "delta": {"content": "t"}}]}) for _ in range(n)]
            out += [ev({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})]
            if (body.get("stream_options") or {}).get("include_usage"):
                out += [ev({**chunk, "choices": [], "usage": {"completion_tokens": n}})]
        else:
            out = [ev({"id": rid, "choices": [{"index": 0, "text": "t"}]}) for _ in range(n)]
        return [*out, b"data: [DONE]\n\n"]


async def _run_router(prefills: list[FakeSGLang], decodes: list[FakeSGLang], **config: Any):
    """The ARES router (app.Router) in this event loop, on a free port: (router, runner, url)."""
    from ares_router.app import Router
    from ares_router.config import RouterConfig

    cfg = RouterConfig(
        prefill=[(p.url, 8998) for p in prefills], decode=[d.url for d in decodes], poll_interval_s=0.02, **config
    )
    router = Router(cfg)
    runner = web.AppRunner(router.build_app(), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return router, runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


def _with_router(
    test: Callable[..., Awaitable[None]], prefills: list[FakeSGLang], decodes: list[FakeSGLang], **config: Any
) -> None:
    """Run `test(router, url, session)` against a router in front of the given stand-in servers."""
    import aiohttp

    async def main() -> None:
        for f in (*prefills, *decodes):
            await f.start()
        router, runner, url = await _run_router(prefills, decodes, **config)
        try:
            async with aiohttp.ClientSession() as session:
                await test(router, url, session)
        finally:
            await runner.cleanup()
            for f in (*prefills, *decodes):
                await f.stop()

    asyncio.run(main())


def _samples(text: bytes) -> dict[str, dict[tuple[str, ...], float]]:
    """Prometheus exposition -> {sample name: {label values (in the family's label order, `le` last): value}}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple[str, ...], float]] = {}
    for fam in text_string_to_metric_families(text.decode()):
        for smp in fam.samples:
            keys = [k for k in ("instance", "url", "actual_from", "phase", "endpoint", "status") if k in smp.labels]
            keys += ["le"] if "le" in smp.labels else []
            out.setdefault(smp.name, {})[tuple(smp.labels[k] for k in keys)] = smp.value
    return out


async def _post(session, url: str, body: dict) -> tuple[int, bytes]:
    async with session.post(url, json=body) as r:
        return r.status, await r.read()


def _chat_body(**kw: Any) -> dict:
    return {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 10, **kw}


def test_unknown_model_gets_404_model_not_found_and_reaches_no_server():
    prefill, decode = FakeSGLang("prefill"), FakeSGLang("decode")

    async def test(router, url: str, session) -> None:
        await async_wait_for(lambda: router.state.served_models() == {MODEL}, what="the model lists")
        for endpoint in (CHAT, "/v1/completions"):
            body = _chat_body(model="gpt-4o") if endpoint == CHAT else {"prompt": "hi", "model": "gpt-4o"}
            status, raw = await _post(session, url + endpoint, body)
            err = orjson.loads(raw)
            assert status == 404 and set(err) == {"object", "message", "type", "param", "code"}, raw
            assert (err["type"], err["param"], err["code"]) == ("model_not_found", "model", 404)
            assert "The model 'gpt-4o' does not exist" in err["message"] and MODEL in err["message"]
        assert decode.generation_posts() == [] and prefill.generation_posts() == []
        assert router.state.dispatch_count == 0
        # No model, SGLang's default name, the served name and an adapter of it all go through.
        for extra in ({}, {"model": "default"}, {"model": MODEL}, {"model": f"{MODEL}:my-lora"}):
            status, raw = await _post(session, url + CHAT, _chat_body(**extra))
            assert status == 200, (extra, raw)
        status, _ = await _post(session, url + "/generate", {"text": "hi", "model": "gpt-4o"})  # not a field there
        assert status == 200 and len(decode.generation_posts()) == 5

    _with_router(test, [prefill], [decode])


def test_routerstate_holds_only_for_hold_policies_and_only_when_no_server_admits():
    for policy, held in [("ares_hold", True), ("current_migrate_hold", True), ("ares", False), ("least_kv", False)]:
        s = _state(policy)
        s.poll_ok(s.decodes[0], DecodeLoad(1000, 990, 3), now=0.0)
        s.poll_ok(s.decodes[1], DecodeLoad(1000, 995, 4), now=0.0)
        s.refresh(now=0.0)
        assert s.holds(prompt_tokens=100, max_tokens=10) is held, policy
        s.poll_ok(s.decodes[1], DecodeLoad(1000, 0, 0), now=0.0)  # one server emptied: placed at once
        s.refresh(now=0.0)
        assert not s.holds(prompt_tokens=100, max_tokens=10)


def test_a_hold_policy_keeps_the_request_at_the_router_until_a_server_admits_it():
    prefill, decode = FakeSGLang("prefill"), FakeSGLang("decode")
    decode.foreign_tokens = 4096  # full: SGLang's rule admits nothing

    async def test(router, url: str, session) -> None:
        await async_wait_for(lambda: router.state.snapshot is not None and router.state.snapshot.used[0] >= 4096)
        task = asyncio.ensure_future(_post(session, url + CHAT, _chat_body()))
        await async_wait_for(lambda: _samples(router.metrics.render())["ares_held_requests"][()] == 1, what="held")
        assert decode.generation_posts() == [] and prefill.generation_posts() == []  # nothing sent anywhere
        decode.foreign_tokens = 0  # the server frees its KV: the next poll lets the request go
        status, raw = await task
        assert status == 200, raw
        assert len(decode.generation_posts()) == 1
        assert _samples(router.metrics.render())["ares_held_requests"][()] == 0

    _with_router(test, [prefill], [decode], policy="ares_hold")


def test_backend_errors_reach_the_client_unchanged():
    """A context-length 400 (from the decode, or from the prefill first) and the 500 of the last retry come back
    with the server's own status and body, byte for byte."""

    async def decode_rejects(router, url: str, session) -> None:
        assert await _post(session, url + CHAT, _chat_body()) == (400, SGLANG_400)
        assert await _post(session, url + CHAT, _chat_body(stream=True)) == (400, SGLANG_400)
        assert await _post(session, url + "/generate", {"text": "x"}) == (400, SGLANG_400_GENERATE)

    _with_router(decode_rejects, [FakeSGLang("prefill")], [FakeSGLang("decode", "reject")])

    decode = FakeSGLang("decode")

    async def prefill_rejects(router, url: str, session) -> None:
        assert await _post(session, url + CHAT, _chat_body()) == (400, SGLANG_400)
        rid = decode.posts[0][1]["rid"]
        await async_wait_for(lambda: ("/abort_request", {"rid": rid}) in decode.posts, what="the decode's abort")

    _with_router(prefill_rejects, [FakeSGLang("prefill", "reject")], [decode])

    failing = [FakeSGLang("decode", "fail"), FakeSGLang("decode", "fail")]

    async def all_fail(router, url: str, session) -> None:
        async with session.post(url + CHAT, json=_chat_body()) as r:
            assert (r.status, await r.read()) == (500, SGLANG_500)  # decode1's answer, after the retry on it
            assert r.headers["X-Ares-Decode"] in ("decode0", "decode1")
        assert [len(d.generation_posts()) for d in failing] == [1, 1]

    _with_router(all_fail, [FakeSGLang("prefill")], failing)

    single = FakeSGLang("decode", "fail")

    async def nothing_left_to_retry(router, url: str, session) -> None:
        assert await _post(session, url + CHAT, _chat_body()) == (500, SGLANG_500)

    _with_router(nothing_left_to_retry, [FakeSGLang("prefill")], [single])


def test_router_made_errors_have_sglangs_shape():
    async def test(router, url: str, session) -> None:
        status, raw = await _post(session, url + CHAT, _chat_body(max_tokens="ten"))
        assert status == 400 and orjson.loads(raw)["type"] == "BadRequestError"
        status, raw = await _post(session, url + "/generate", {"text": 1})
        assert (
            status == 400 and set(orjson.loads(raw)) == {"error"} and "'text'" in orjson.loads(raw)["error"]["message"]
        )
        async with session.get(url + "/no/such/path") as r:
            err = orjson.loads(await r.read())
            assert r.status == 404 and err["code"] == 404 and "no such endpoint: GET /no/such/path" in err["message"]
            assert err["object"] == "error" and r.headers["X-Request-Id"]
        async with session.get(url + CHAT) as r:
            assert r.status == 405 and orjson.loads(await r.read())["type"] == "MethodNotAllowedError"
        router.state.mark_failed(router.state.decodes[0], "down")
        router.poller.interval_s = 3600  # keep it down: no poll brings it back during the test
        await async_wait_for(lambda: not router.state.snapshot.healthy[0], what="decode0 out of rotation")
        status, raw = await _post(session, url + CHAT, _chat_body())
        assert status == 503 and orjson.loads(raw)["message"] == "no healthy decode server is available; retry later"
        status, raw = await _post(session, url + "/generate", {"text": "x"})
        assert status == 503 and orjson.loads(raw) == {
            "error": {"message": "no healthy decode server is available; retry later"}
        }
        async with session.get(url + "/health") as r:
            err = orjson.loads(await r.read())
            assert r.status == 503 and err["type"] == "ServiceUnavailableError" and "decode 0/1" in err["message"]
        text = await (await session.get(url + "/metrics")).text()
        assert 'ares_requests_total{endpoint="unmatched",status="404"} 1.0' in text

    _with_router(test, [FakeSGLang("prefill")], [FakeSGLang("decode")])


def test_a_broken_decode_stream_ends_with_an_in_band_error_in_sglangs_shape():
    async def test(router, url: str, session) -> None:
        for endpoint, body in ((CHAT, _chat_body(stream=True)), ("/generate", {"text": "x", "stream": True})):
            status, raw = await _post(session, url + endpoint, body)
            events = [e for e in raw.split(b"\n\n") if e]
            assert status == 200 and len(events) == 4 and events[-1] == b"data: [DONE]", raw
            err = orjson.loads(events[-2][len(b"data: ") :])["error"]
            assert err["code"] == 502 and "decode server stream failed" in err["message"]
            assert set(err) == ({"message", "type", "code", "retryable"} if endpoint == "/generate" else
                                {"object", "message", "type", "param", "code"})  # fmt: skip

    _with_router(test, [FakeSGLang("prefill")], [FakeSGLang("decode", "break")])


def test_head_error_is_recorded_when_a_request_finishes():
    """The decode reports generated 2 and predicted remaining 5 for every request; each answer has 10 output
    tokens, so the actual remaining is 8: absolute error 3, signed (predicted - actual) -3."""
    decode = FakeSGLang("decode", output_tokens=10, predicted=5.0)

    async def test(router, url: str, session) -> None:
        cases = [
            (CHAT, _chat_body()),  # usage.completion_tokens
            ("/generate", {"text": "x"}),  # meta_info.completion_tokens
            ("/generate", {"text": "x", "stream": True}),  # the last event's meta_info
            (CHAT, _chat_body(stream=True, stream_options={"include_usage": True})),  # the usage chunk
            (CHAT, _chat_body(stream=True)),  # no usage: counted events minus role and finish chunks
            ("/v1/completions", {"prompt": "x", "stream": True}),  # one event per token
        ]
        for endpoint, body in cases:
            status, raw = await _post(session, url + endpoint, body)
            assert status == 200, raw
        m = _samples(router.metrics.render())
        usage, events = ("decode0", "usage"), ("decode0", "events")
        assert m["ares_head_abs_error_tokens_count"][usage] == 4 and m["ares_head_abs_error_tokens_sum"][usage] == 12
        assert m["ares_head_abs_error_tokens_count"][events] == 2 and m["ares_head_abs_error_tokens_sum"][events] == 6
        assert m["ares_head_signed_error_tokens_total"][usage] == -12
        assert m["ares_head_signed_error_tokens_total"][events] == -6
        buckets = {le: v for (inst, src, le), v in m["ares_head_signed_error_tokens_bucket"].items() if src == "usage"}
        assert buckets["-4.0"] == 0 and buckets["-2.0"] == 4 and buckets["+Inf"] == 4  # all four at -3
        assert (
            m["ares_poll_round_seconds_count"][("refresh",)] >= 1
            and m["ares_poll_round_seconds_count"][("fetch",)] >= 1
        )
        assert ("decode0", decode.url) in m["ares_decode_predicted_tokens_at_horizon"]
        assert m["ares_load_model_horizon_steps"][()] == router.state.load_model.horizon_tokens

    _with_router(test, [FakeSGLang("prefill")], [decode])


def test_no_head_error_without_a_prediction_or_for_a_failed_request():
    decode = FakeSGLang("decode", predicted=float("nan"))  # NaN -> JSON null: no prediction

    async def test(router, url: str, session) -> None:
        assert (await _post(session, url + CHAT, _chat_body()))[0] == 200
        assert "ares_head_abs_error_tokens_count" not in router.metrics.render().decode()

    _with_router(test, [FakeSGLang("prefill")], [decode])


# -- default policies: the ARES router places by predicted load unless told otherwise ------------------------------
def test_ares_router_defaults_to_the_ares_policy_everywhere():
    import argparse

    import ares_router.cli
    from ares.cluster import cli as cluster_cli
    from ares.cluster.cli import spec_from_args
    from ares.cluster.spec import ClusterSpec
    from ares.demo import add_parser as add_demo
    from ares.live.run import POLICY_ARGS
    from ares_router.config import ROUTER_POLICIES

    parser = argparse.ArgumentParser(prog="ares")  # the `ares` command's parser, without importing every command
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (cluster_cli.add_parser, add_demo, ares_router.cli.add_parser):
        add(sub)

    def router_argv(spec: ClusterSpec) -> list[str]:
        return list(spec.servers(list(range(20000, 20005)))[-1].argv)

    def policy_of(argv: list[str]) -> str:
        return argv[argv.index("--policy") + 1]

    parse = parser.parse_args
    spec = spec_from_args(parse(["cluster", "up", "--router", "ares"]), "m")
    assert spec.router_policy == "ares" and policy_of(router_argv(spec)) == "ares"
    assert "ares_router" in router_argv(spec)
    spec = spec_from_args(parse(["cluster", "up"]), "m")  # SGLang's router keeps its round robin
    assert (spec.router, spec.router_policy) == ("sglang", "round_robin")
    assert "sglang_router.launch_router" in router_argv(spec) and policy_of(router_argv(spec)) == "round_robin"
    spec = spec_from_args(parse(["cluster", "up", "--router", "ares", "--router-policy", "least_kv"]), "m")
    assert policy_of(router_argv(spec)) == "least_kv"
    with pytest.raises(ValueError, match="'cache_aware' is not one of the ares router's"):
        spec_from_args(parse(["cluster", "up", "--router", "ares", "--router-policy", "cache_aware"]), "m")
    # The demo compares SGLang's own router (what a user would otherwise run) with an ARES router running `ares`.
    demo = parse(["demo"])
    assert demo.policies == "sglang_power_of_two,ares" and demo.output_dir == ".ares/demo" and demo.rate == "auto"
    # every live-benchmark policy is an ARES router policy, or SGLang's router with one of its own policies
    from ares.cluster.router_proc import SGLANG_PREFIX, is_sglang
    from ares.cluster.spec import SGLANG_ROUTER_POLICIES

    assert {p for p in POLICY_ARGS if not is_sglang(p)} <= set(ROUTER_POLICIES)
    assert {p.removeprefix(SGLANG_PREFIX) for p in POLICY_ARGS if is_sglang(p)} <= set(SGLANG_ROUTER_POLICIES)
    # `python -m ares_router` / `ares router` and RouterConfig.
    cfg = config_from_args(parse(["router", "--prefill", "http://p", "1", "--decode", "http://d"]))
    assert cfg.policy == "ares"
    assert configure_parser(__import__("argparse").ArgumentParser()).parse_args([]).policy == "ares"


# -- the load model's binned demand equals the dense definition ----------------------------------------------------
@pytest.mark.parametrize("points, horizon", [(16, 2048), (4, 100), (1, 7)])
def test_binned_demand_equals_the_dense_contributions(points, horizon):
    from ares_router.policy import LoadModel

    lm = LoadModel(horizon_tokens=horizon, points=points)
    grid = lm.grid()
    rng = np.random.default_rng(points)
    n_req, n = 5000, 37
    lengths = rng.integers(1, 5000, n_req).astype(np.float64)
    remaining = rng.uniform(-5, 2.5 * horizon, n_req)
    remaining[rng.random(n_req) < 0.1] = np.nan  # no prediction
    on_grid = rng.random(n_req) < 0.1
    remaining[on_grid] = rng.choice(grid, on_grid.sum())  # exactly on a grid point (0 and the horizon included)
    remaining[:4] = [0.0, horizon, horizon + 1e-9, -1.0]
    owner = np.sort(rng.integers(0, n, n_req))
    owner[-1] = n - 2  # the last instance has no request
    dense = lm.contributions(lengths, remaining)
    expected = np.stack([dense[owner == j].sum(axis=0) for j in range(n)])
    demand, alive = lm.binned(lengths, remaining, owner, n)
    np.testing.assert_allclose(demand, expected, rtol=1e-12)
    np.testing.assert_array_equal(alive, np.stack([(dense[owner == j] > 0).sum(axis=0) for j in range(n)]))
    none = np.zeros(0)
    assert all(x.shape == (3, points + 1) for x in lm.binned(none, none, none.astype(int), 3))


# -- the poller's HTTP client --------------------------------------------------------------------------------------
class _RawServer:
    """A TCP server answering each request on a connection with the next of `answers` (raw bytes; None: close the
    connection without answering; "hang": never answer). Counts connections."""

    def __init__(self, answers: list[bytes | str | None]):
        self.answers = list(answers)
        self.connections = 0
        self.requests: list[bytes] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                answer = self.answers.pop(0)
                if answer is None:
                    break
                if answer == "hang":
                    await asyncio.sleep(3600)
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer or b"Content-Length" not in answer and b"chunked" not in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionResetError):
            pass
        writer.close()

    async def stop(self) -> None:
        self.server.close()


def test_poll_client_reads_http_answers_and_reuses_connections():
    from ares_router.pollclient import BadResponse, ConnectFailed, PollClient

    ok = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{"a":1}'
    chunked = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\n{"b"\r\n3\r\n:2}\r\n0\r\nX-T: 1\r\n\r\n'
    to_eof = b"HTTP/1.0 404 Not Found\r\n\r\nnot here"

    async def main() -> None:
        srv = _RawServer([ok, chunked, ok, to_eof])
        url = await srv.start()
        client = PollClient(timeout_s=5.0)
        assert await client.get(url + "/ares/state?format=columns") == (200, b'{"a":1}')
        assert await client.get(url + "/x") == (200, b'{"b":2}')
        assert await client.get(url + "/x") == (200, b'{"a":1}')
        assert srv.connections == 1  # keep-alive: one connection for three answers
        assert srv.requests[0].startswith(b"GET /ares/state?format=columns HTTP/1.1\r\nHost: 127.0.0.1:")
        assert await client.get(url + "/y") == (404, b"not here")  # no length: read until the server closes
        # A kept connection that the server closes as the next GET arrives (its keep-alive timeout crossing our
        # request): the GET is asked again on a fresh connection, transparently.
        srv.answers = [ok, None, ok]
        assert await client.get(url + "/z1") == (200, b'{"a":1}') and srv.connections == 2
        assert await client.get(url + "/z2") == (200, b'{"a":1}') and srv.connections == 3
        # A fresh connection closed without an answer is an error (not retried).
        srv.answers = [None]
        client.close()
        with pytest.raises(ConnectionResetError):
            await client.get(url + "/reset")
        # No answer in time: TimeoutError, and the connection is not reused.
        srv.answers = ["hang", ok]
        client.timeout_s = 0.2
        with pytest.raises(asyncio.TimeoutError):
            await client.get(url + "/slow")
        client.timeout_s = 5.0
        assert await client.get(url + "/after") == (200, b'{"a":1}')
        srv.answers = [b"SSH-2.0-OpenSSH\r\n\r\n"]
        with pytest.raises(BadResponse, match="status line"):
            await client.get(url + "/bad")
        srv.answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nConnection: close\r\n\r\n{}"]  # cut short
        with pytest.raises(ConnectionResetError):
            await client.get(url + "/cut")
        await srv.stop()
        client.close()
        with pytest.raises(ConnectFailed, match="cannot connect"):
            await client.get(url + "/gone")  # nothing listens there any more
        with pytest.raises(ValueError, match="http:// only"):
            await client.get("https://127.0.0.1:1/x")

    asyncio.run(main())


@pytest.mark.parametrize("horizon, points", [(2048, 16), (100, 4), (7, 1), (1000, 3), (1, 16)])
def test_grid_bins_equal_searchsorted_on_and_around_grid_points(horizon, points):
    from ares_router.policy.load_model import LoadModel, _grid_bins

    s = LoadModel(horizon_tokens=horizon, points=points).grid()
    rng = np.random.default_rng(horizon)
    near = np.concatenate([s, np.nextafter(s, -np.inf).clip(0), np.nextafter(s, np.inf)])
    p = np.concatenate([rng.uniform(0, 3 * horizon, 100_000), near, [0.0, 1e12]])
    b, c = _grid_bins(s, p)
    np.testing.assert_array_equal(b, np.searchsorted(s, p, side="left"))
    np.testing.assert_array_equal(c, np.searchsorted(s, p, side="right"))


# -- the poller off the relay's path: per-server polls, incremental snapshot rebuild ------------------------------
def _same_snapshot(a: Any, b: Any) -> None:
    """Two `ClusterSnapshot`s hold the same numbers, field by field (NaN equals NaN)."""
    import dataclasses

    from ares_router.policy import ClusterSnapshot, InstanceState

    for f in dataclasses.fields(ClusterSnapshot):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "instances":
            assert len(x) == len(y)
            for i, j in zip(x, y, strict=True):
                for g in dataclasses.fields(InstanceState):
                    u, v = getattr(i, g.name), getattr(j, g.name)
                    if isinstance(u, np.ndarray):
                        np.testing.assert_array_equal(u, v, err_msg=f"instance {i.instance_id}.{g.name}")
                    else:
                        assert list(u) == list(v) if g.name.endswith("_ids") else u == v, (g.name, u, v)
        elif isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        elif f.name == "forecasts":
            assert repr(x) == repr(y)
        else:
            assert x == y, f.name


def _random_load(rng: np.random.Generator, index: int, n: int, admission: str = "sglang") -> DecodeLoad:
    prompt, gen = rng.integers(10, 500, n).astype(float), rng.integers(1, 300, n).astype(float)
    pred = rng.uniform(1, 800, n)
    pred[rng.random(n) < 0.2] = np.nan  # some rows without a prediction yet
    used = int((prompt + gen).sum())
    return DecodeLoad(
        capacity_tokens=used * 2 + 1000,
        used_tokens=used + int(rng.integers(0, 50)),
        running_reqs=n,
        source="ares_state",
        rids=tuple(f"{index}-{k}" for k in range(n)),
        prompt_tokens=prompt,
        generated_tokens=gen,
        predicted_remaining=pred,
        predicted_p90=pred * 1.5,
        admission=admission,
    )


@pytest.mark.parametrize("thread_min_instances", [0, 1000])  # the build in the worker thread, and on the loop
def test_incremental_rebuild_equals_a_full_refresh(thread_min_instances):
    """The poller's rebuild (cached instances, splice of those that changed while it built) gives exactly the
    snapshot `RouterState.refresh` builds from scratch, after polls, dispatches, starts, finishes and a failure."""
    rng = np.random.default_rng(3)
    n = 20
    state = RouterState.create([("http://p0", 1)], [f"http://d{i}" for i in range(n)], "ares", seed=0)
    state.poll_ok(state.prefills[0], None, now=0.0)
    for d in state.decodes:  # a few servers admit predictively: the snapshot then carries their forecasts
        state.poll_ok(
            d, _random_load(rng, d.index, int(rng.integers(0, 12)), "predictive" if d.index % 7 else "sglang"), now=0.0
        )
    for k in range(30):  # the router relays some reported requests and some not yet reported
        j = int(rng.integers(0, n))
        t = state.start(f"own-{k}", decode=j, prefill=0, prompt_tokens=int(rng.integers(5, 300)), max_tokens=200)
        t.started, t.generated = bool(k % 2), int(rng.integers(0, 20))
    poller = Poller(state, interval_s=0.1, thread_min_instances=thread_min_instances)

    async def main() -> None:
        for step in range(4):
            await poller.rebuild(now=1.0 + step)
            ours = state.snapshot
            _same_snapshot(ours, state.refresh(now=1.0 + step))
            state.snapshot = ours  # go on from the poller's own snapshot
            # Between two rebuilds: new reports for some servers, dispatches, finishes, a failed server.
            for d in state.decodes[step::3]:
                state.poll_ok(d, _random_load(rng, d.index, int(rng.integers(0, 12))), now=1.0 + step)
            for _ in range(5):
                j = state.choose_decode(int(rng.integers(5, 300)), 100)
                state.start(
                    f"new-{step}-{j}-{rng.integers(1 << 30)}", decode=j, prefill=0, prompt_tokens=50, max_tokens=100
                )
            for rid in list(state.requests)[::7]:
                state.finish(rid)
            if step == 2:
                state.mark_failed(state.decodes[5], "connection refused")
        if thread_min_instances == 0:
            # Bookkeeping that moves while the worker thread builds is spliced in afterwards.
            task = asyncio.create_task(poller.rebuild(now=9.0))
            await asyncio.sleep(0)  # the rebuild is under way (in the thread, or between two assembly slices)
            state.start("during", decode=3, prefill=0, prompt_tokens=77, max_tokens=10)
            await task
            ours = state.snapshot
            assert "during" in ours.instances[3].pending_ids
            _same_snapshot(ours, state.refresh(now=9.0))

    asyncio.run(main())


def test_splice_equals_a_full_build():
    from ares_router.policy import build_snapshot
    from ares_router.poller import splice_snapshot

    rng = np.random.default_rng(5)
    state = RouterState.create([("http://p0", 1)], [f"http://d{i}" for i in range(6)], "ares", seed=0)
    for d in state.decodes:
        state.poll_ok(d, _random_load(rng, d.index, 5, "predictive" if d.index == 2 else "sglang"), now=0.0)
    before = [state._instance(d) for d in state.decodes]
    for j in (1, 2, 4):
        state.poll_ok(state.decodes[j], _random_load(rng, j, int(rng.integers(0, 9))), now=0.0)
    after = [state._instance(d) for d in state.decodes]
    args = (state.load_model, state.migration_cost, state.admission)
    spliced = splice_snapshot(
        build_snapshot(before, *args), [1, 2, 4], build_snapshot([after[j] for j in (1, 2, 4)], *args)
    )
    _same_snapshot(spliced, build_snapshot(after, *args))


class _StateServer:
    """A decode (or prefill) stand-in on 127.0.0.1 answering `/ares/state` after `delay` seconds; counts polls."""

    def __init__(self, body: bytes, delay: float = 0.0):
        self.body, self.delay, self.polls = body, delay, 0
        self.runner: web.AppRunner | None = None

    async def start(self) -> str:
        async def state(request: web.Request) -> web.Response:
            self.polls += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            return web.Response(body=self.body, content_type="application/json")

        async def loads(request: web.Request) -> web.Response:
            return web.json_response(
                {"loads": [{"num_running_reqs": 0, "num_used_tokens": 0, "max_total_num_tokens": 9}]}
            )

        app = web.Application()
        app.router.add_get("/ares/state", state)
        app.router.add_get("/v1/loads", loads)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def _state_body(rids: list[str], used: int = 100) -> bytes:
    n = len(rids)
    return orjson.dumps(
        {
            "version": 2,
            "capacity_tokens": 10000,
            "used_tokens": used,
            "rids": rids,
            "prompt_tokens": [10] * n,
            "generated_tokens": [5] * n,
            "predicted_remaining": [20.0] * n,
        }
    )


def test_a_slow_or_dead_server_never_delays_the_others_reports():
    """One decode server answers 1.5 s late, another is gone (refused): the prompt server is polled every interval
    all the same, and the snapshot is rebuilt with its fresh reports while the slow answer is outstanding."""

    async def main() -> None:
        fast, slow = _StateServer(_state_body(["f1"])), _StateServer(_state_body(["s1"]))
        fast_url, slow_url = await fast.start(), await slow.start()
        gone = _StateServer(b"{}")
        gone_url = await gone.start()
        await gone.stop()  # nothing listens there any more
        state = RouterState.create([(fast_url, 1)], [fast_url, slow_url, gone_url], "ares")
        poller = Poller(state, interval_s=0.05, timeout_s=5.0)
        await poller.start()
        d_fast, d_slow, d_gone = state.decodes
        assert d_fast.healthy and d_slow.healthy and not d_gone.healthy and "Connect" in d_gone.last_error
        slow.delay = 2.0  # from now on the slow server answers 2 s late (an overloaded CPU server)
        await async_wait_for(lambda: slow.polls >= 2, what="a poll of the slow server under way")
        slow_ok, polls0, rounds0 = d_slow.last_ok, fast.polls, poller.rounds
        # While that answer is outstanding, the prompt server is polled every 50 ms and the snapshot rebuilt with
        # its reports (a round-based poller would wait for the slow answer: one round per 2 s).
        await async_wait_for(lambda: fast.polls >= polls0 + 8, what="eight more polls of the prompt server")
        await async_wait_for(lambda: poller.rounds >= rounds0 + 8, what="eight more snapshot rebuilds")
        assert d_slow.last_ok == slow_ok, "the machine was too slow to tell: 8 polls took over 2 s"
        assert time.monotonic() - d_fast.last_ok < 0.5  # its report stays fresh
        assert state.snapshot.healthy.tolist() == [True, True, False]
        # A body equal to the last one is not parsed again: the report object stays (and so does its instance).
        load, polls1 = d_fast.load, fast.polls
        await async_wait_for(lambda: fast.polls >= polls1 + 3, what="more polls")
        assert d_fast.load is load
        fast.body = _state_body(["f1", "f2"], used=200)  # a new report is read at the next poll
        await async_wait_for(lambda: d_fast.load.rids == ("f1", "f2"), what="the new report")
        await async_wait_for(lambda: list(state.snapshot.instances[0].request_ids) == ["f1", "f2"], what="rebuild")
        await poller.stop()
        slow.delay = 0.0
        await fast.stop()
        await slow.stop()

    asyncio.run(main())


def test_an_idle_router_polls_unchanged_servers_less_often():
    """Nothing in flight and the same answer every time: the server is polled `idle_backoff` times less often; with
    a request in flight, at the full rate again."""

    async def main() -> None:
        srv = _StateServer(_state_body(["a"]))
        url = await srv.start()
        state = RouterState.create([(url, 1)], [url], "ares")
        poller = Poller(state, interval_s=0.05, timeout_s=5.0)
        poller.idle_backoff = 8  # quiet: one poll per 0.4 s
        await poller.start()
        await async_wait_for(lambda: srv.polls >= 3, what="the first polls")
        n0, t0 = srv.polls, time.monotonic()
        await asyncio.sleep(1.0)
        quiet_rate = (srv.polls - n0) / (time.monotonic() - t0)
        assert quiet_rate <= 1 / 0.4 + 1.5, quiet_rate  # at the full rate it would be 20 a second
        state.start("r1", decode=0, prefill=0, prompt_tokens=5, max_tokens=5)  # a request in flight
        n1 = srv.polls
        await async_wait_for(lambda: srv.polls >= n1 + 10, what="ten polls at the full rate")
        await poller.stop()
        await srv.stop()

    asyncio.run(main())
