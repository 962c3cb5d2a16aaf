"""The ARES router against real SGLang servers: 1 prefill + 2 decode (tiny model, Mooncake TCP, CPU).

The session's tiny servers (`conftest.tiny_servers`) behind this module's ARES router (policy least_kv); tests that
need another policy or other backends start extra router processes on free ports against the same servers and stop
them by PID. The last test kills decode1, so it runs after every other test (`kills_a_server`). Nothing waits a
fixed time and then checks: every wait is for a condition, with a generous deadline (`_wait`), because CI machines
are busy.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import pytest
from conftest import routed
from http_helpers import ares_router, get_json, request, wait_for

from ares.cluster.launcher import free_ports

HOST = "127.0.0.1"
LONG_PROMPT = list(range(1000, 1400))  # 400 token ids
DEADLINE_S = 30.0  # how long a condition may take on a busy machine before it counts as a failure
ERROR_KEYS = {"object", "message", "type", "param", "code"}  # SGLang's ErrorResponse (OpenAI endpoints)
# What SGLang's own handler answers for an internal error (create_error_response), as the failing backend sends it.
SGLANG_500 = json.dumps(
    {"object": "error", "message": "Internal server error: broken backend", "type": "InternalServerError",
     "param": None, "code": 500}
).encode()  # fmt: skip


# -- helpers ------------------------------------------------------------------------------------------------------
_request, _json = request, get_json


def _loads(decode_url: str) -> dict:
    return _json(decode_url + "/v1/loads?include=core,disagg,queues")["loads"][0]


def _busy(load: dict) -> int:
    """Requests a decode server holds in any state (running, waiting, preallocating, transferring, retracted)."""
    d = load.get("disaggregation") or {}
    return (
        load["num_running_reqs"]
        + load["num_waiting_reqs"]
        + sum(d.get(k, 0) for k in ("decode_prealloc_queue_reqs", "decode_transfer_queue_reqs"))
        + d.get("decode_retracted_queue_reqs", 0)
    )


def _wait(predicate, timeout: float = DEADLINE_S, what: str = "the condition", interval: float = 0.25):
    return wait_for(predicate, timeout, what, interval)


def _sse_events(raw: bytes) -> list[bytes]:
    return [ln[len(b"data: ") :] for ln in raw.splitlines() if ln.startswith(b"data: ")]


def _dead_url() -> str:
    return f"http://{HOST}:{free_ports(1)[0]}"  # nothing listens there


class _FailingBackend(BaseHTTPRequestHandler):
    """Healthy to the poller, broken for generation (500): a server that fails before the first token."""

    server: _Fake

    def log_message(self, *args) -> None:
        pass

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the router gave up on this attempt already

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/v1/loads"):
            loads = {"num_running_reqs": 0, "num_used_tokens": 0, "max_total_num_tokens": 4096}
            return self._reply(200, json.dumps({"loads": [loads]}).encode())
        return self._reply(404, b"{}")

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.posts.append((self.path, body))
        if self.path == "/abort_request":
            return self._reply(200, b"{}")
        return self._reply(500, SGLANG_500)


class _Fake(ThreadingHTTPServer):
    posts: list


@contextmanager
def failing_backend() -> Iterator[_Fake]:
    srv = _Fake((HOST, 0), _FailingBackend)
    srv.posts = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


# -- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tiny_servers, tmp_path_factory):
    """The tiny servers (1 prefill + 2 decode, `conftest.tiny_servers`) behind an ARES router (least_kv)."""
    with routed(tiny_servers, tmp_path_factory.mktemp("router-e2e"), "least_kv") as c:
        yield c


@pytest.fixture(scope="module")
def backends(cluster) -> dict:
    st = cluster.state()["processes"]
    prefill = [(p["url"], p["bootstrap_port"]) for p in st if p["role"] == "prefill"]
    return {"prefill": prefill, "decode": cluster.decode_urls, "router": cluster.router_url}


@pytest.fixture()
def tmp(tmp_path) -> Path:
    return tmp_path


def _assert_backends_idle(backends: dict, timeout: float = DEADLINE_S) -> None:
    for url in backends["decode"]:
        _wait(lambda u=url: _busy(_loads(u)) == 0, timeout, f"{url} to hold no request")


def _chat(router: str, content: str = "hello", max_tokens: int = 4, stream: bool = False, **kw):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": stream, **kw}
    return _request(router + "/v1/chat/completions", body)


# -- tests --------------------------------------------------------------------------------------------------------
def test_endpoints_answer_and_echo_request_ids(cluster, backends):
    r = backends["router"]
    assert json.loads(_request(r + "/health")[2])["status"] == "ok"
    assert json.loads(_request(r + "/v1/models")[2])["data"][0]["id"]
    status, headers, body = _chat(r, max_tokens=5, ignore_eos=True)
    assert status == 200 and headers["X-Ares-Decode"] in ("decode0", "decode1")
    out = json.loads(body)
    assert out["usage"]["completion_tokens"] == 5 and out["choices"][0]["message"]["content"]
    assert len(headers["X-Request-Id"]) == 32
    status, headers, body = _request(
        r + "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True, "ignore_eos": True},
        headers={"X-Request-Id": "client-chosen-id"},
    )
    events = _sse_events(body)
    assert status == 200 and headers["X-Request-Id"] == "client-chosen-id" and events[-1] == b"[DONE]"
    assert len(json.loads(events[0])["id"]) == 32  # backends get a router-made, prefix-free rid
    status, _, body = _request(r + "/v1/completions", {"prompt": "Once upon", "max_tokens": 3, "ignore_eos": True})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3
    gen = {"input_ids": [1, 2, 3, 4], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
    status, headers, body = _request(r + "/generate", {**gen, "rid": "body-chosen-id"})
    out = json.loads(body)
    assert status == 200 and len(out["output_ids"]) == 3
    assert headers["X-Request-Id"] == "body-chosen-id"
    log = cluster.router.log_text()
    assert f"rid=body-chosen-id /generate attempt 1 -> prefill0, {headers['X-Ares-Decode']} (backend rid " in log
    assert "rid=client-chosen-id /v1/chat/completions attempt 1" in log
    status, _, body = _request(r + "/generate", {**gen, "stream": True})
    events = _sse_events(body)
    assert status == 200 and events[-1] == b"[DONE]" and json.loads(events[-2])["meta_info"]["completion_tokens"] == 3
    # The router forgets a request just after its last byte went out: wait for that, do not assume it.
    snap = _wait(lambda: (s := _json(r + "/ares/cluster"))["inflight"] == 0 and s, what="no request in flight")
    assert snap["policy"] == "least_kv" and snap["dispatch_count"] >= 5
    assert [d["healthy"] for d in snap["decode"]] == [True, True] and snap["decode"][0]["capacity_tokens"] == 4096
    metrics = _request(r + "/metrics")[2].decode()
    for needle in (
        'ares_decode_used_tokens{instance="decode0"',
        'ares_decode_predicted_peak_tokens{instance="decode1"',
        'ares_decode_predicted_tokens_at_horizon{instance="decode0"',
        'ares_poll_round_seconds_count{phase="fetch"}',
        'ares_decode_running_requests{instance="decode0"',
        'ares_dispatch_total{instance="decode',
        'ares_request_latency_seconds_bucket{endpoint="/v1/chat/completions"',
        "ares_policy_decision_seconds_count",
    ):
        assert needle in metrics, needle


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b'{"messages": [', "not valid JSON"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "'max_tokens' must be an integer"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, "'n' = 3 is not supported"),
        ({"messages": "hi"}, "'messages' must be"),
    ],
)
def test_bad_requests_get_4xx_and_never_reach_a_backend(backends, body, fragment):
    before = _json(backends["router"] + "/ares/cluster")["dispatch_count"]
    status, headers, raw = _request(backends["router"] + "/v1/chat/completions", body)
    err = json.loads(raw)  # SGLang's ErrorResponse, as SGLang itself answers a bad request
    assert status == 400 and set(err) == ERROR_KEYS and fragment in err["message"]
    assert (err["object"], err["type"], err["code"]) == ("error", "BadRequestError", 400)
    assert headers["X-Request-Id"]
    assert _json(backends["router"] + "/ares/cluster")["dispatch_count"] == before


def test_model_names_are_checked_against_the_servers(backends):
    r = backends["router"]
    served = json.loads(_request(r + "/v1/models")[2])["data"][0]["id"]
    before = _json(r + "/ares/cluster")["dispatch_count"]
    status, _, raw = _chat(r, model="no-such-model")
    err = json.loads(raw)
    assert status == 404 and set(err) == ERROR_KEYS and (err["type"], err["param"]) == ("model_not_found", "model")
    assert "The model 'no-such-model' does not exist" in err["message"] and served in err["message"]
    assert _json(r + "/ares/cluster")["dispatch_count"] == before  # never reached a server
    for model in (served, "default", None):  # SGLang's served name, its default name, no name
        status, _, raw = _chat(r, max_tokens=2, **({} if model is None else {"model": model}))
        assert status == 200, (model, raw[:300])


def test_a_backends_own_error_reaches_the_client_unchanged(backends):
    """A prompt over the model's context length: SGLang's 400, its body shape and message, through the router."""
    r = backends["router"]
    too_long = [1000 + i % 500 for i in range(5000)]  # the tiny model's context is 4096 tokens
    for stream in (False, True):
        status, _, raw = _request(r + "/v1/completions", {"prompt": too_long, "max_tokens": 2, "stream": stream})
        err = json.loads(raw)
        assert status == 400 and set(err) == ERROR_KEYS and err["code"] == 400, raw[:300]
        assert "context length" in err["message"] and "(5000 tokens)" in err["message"]
    status, _, raw = _request(r + "/generate", {"input_ids": too_long, "sampling_params": {"max_new_tokens": 2}})
    err = json.loads(raw)
    assert status == 400 and list(err) == ["error"] and "context length" in err["error"]["message"], raw[:300]
    _assert_backends_idle(backends)


def test_sglang_benchmark_serving_has_no_failed_request(cluster, backends, tiny_model, tmp):
    out = tmp / "bench.jsonl"
    n = 24
    cmd = [
        sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang-oai-chat",
        "--base-url", backends["router"], "--model", str(tiny_model), "--tokenizer", str(tiny_model),
        "--dataset-name", "random-ids", "--num-prompts", str(n), "--random-input-len", "64",
        "--random-output-len", "16", "--random-range-ratio", "0.5", "--request-rate", "8", "--seed", "1",
        "--output-file", str(out), "--output-details", "--disable-tqdm",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text().splitlines()[-1])
    errors = sorted({e[-500:] for e in result["errors"] if e})
    router_log = cluster.router.log_text().splitlines()
    router_warnings = [ln for ln in router_log if " WARNING " in ln or " ERROR " in ln]
    assert result["completed"] == n, (errors, router_warnings[-20:])
    assert "Failed requests" not in proc.stdout or "Failed requests: 0" in proc.stdout.replace("  ", " ")


async def _preload(prefill: tuple[str, int], decode: str, n: int, stop: asyncio.Event) -> list[str]:
    """Direct PD requests (not through any router) with long prompts and outputs on one decode server; they run
    until `stop` is set, then are aborted."""
    rids = [f"preload-{i}-{time.monotonic_ns()}" for i in range(n)]
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> None:
            body = {
                "input_ids": LONG_PROMPT,
                "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True},
                "stream": True,
                "rid": rids[i],
                "bootstrap_host": HOST,
                "bootstrap_port": prefill[1],
                "bootstrap_room": 1_000_000 + i + time.monotonic_ns() % 1_000_000,
            }

            async def run_prefill() -> None:
                async with s.post(prefill[0] + "/generate", json=body) as resp:
                    await resp.read()  # read to the end: SGLang aborts a stream whose client hangs up

            p = asyncio.create_task(run_prefill())
            try:
                async with s.post(decode + "/generate", json=body) as resp:
                    async for _ in resp.content.iter_any():
                        if stop.is_set():
                            break
            finally:
                p.cancel()

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for b in (prefill[0], decode):
            for rid in rids:
                async with s.post(b + "/abort_request", json={"rid": rid}) as resp:
                    await resp.read()
    return rids


def _policy_choices(router: str, k: int) -> list[str]:
    out = []
    for i in range(k):
        status, headers, body = _chat(router, content=f"short request {i}", max_tokens=2)
        assert status == 200, body
        out.append(headers["X-Ares-Decode"])
    return out


def test_policies_place_by_load(backends, tmp):
    """decode0 carries long requests the routers do not relay: least_kv and ares send new requests to decode1;
    round_robin alternates regardless."""
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(
        target=loop.run_until_complete, args=(_preload(backends["prefill"][0], backends["decode"][0], 2, stop),)
    )
    thread.start()
    try:
        _wait(lambda: _loads(backends["decode"][0])["num_used_tokens"] >= 800, 120, "decode0 to be pre-loaded")
        with ares_router(tmp, backends["prefill"], backends["decode"], "ares") as ares:

            def polled() -> list | None:  # the new router's polls have seen decode0's load
                snap = _json(ares.url + "/ares/cluster")["decode"]
                return snap if snap[0]["used_tokens"] >= 800 else None

            snap = _wait(polled, what="the new router to see decode0's load")
            assert snap[0]["predicted_peak_tokens"] > snap[1]["predicted_peak_tokens"]
            assert _policy_choices(ares.url, 4) == ["decode1"] * 4
        assert _policy_choices(backends["router"], 4) == ["decode1"] * 4  # the cluster's router: least_kv
        with ares_router(tmp, backends["prefill"], backends["decode"], "round_robin") as rr:
            choices = _policy_choices(rr.url, 4)
            assert choices in (["decode0", "decode1"] * 2, ["decode1", "decode0"] * 2), choices
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=60)
        loop.close()
    _assert_backends_idle(backends)


async def _disconnect_streaming(router: str) -> tuple[str, str]:
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}, "stream": True}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(router + "/generate", json=body, headers={"X-Request-Id": "disconnect-stream"})
        events = 0
        async for chunk in resp.content.iter_any():
            events += chunk.count(b"data:")
            if events >= 3:
                break
        decode = resp.headers["X-Ares-Decode"]
        resp.close()  # the client goes away mid-stream
    return decode, "disconnect-stream"


def test_client_disconnect_aborts_on_prefill_and_decode(cluster, backends):
    r = backends["router"]
    decode_name, rid = asyncio.run(_disconnect_streaming(r))
    decode_url = backends["decode"][int(decode_name[-1])]
    _wait(lambda: _busy(_loads(decode_url)) == 0, what="the aborted stream to leave the decode server")
    # Non-streaming: the client hangs up while the request is generating on the decode server.
    sock = socket.create_connection((HOST, int(r.rsplit(":", 1)[1])))
    payload = json.dumps({"input_ids": [8, 9], "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}})
    sock.sendall(
        (
            f"POST /generate HTTP/1.1\r\nHost: x\r\nX-Request-Id: disconnect-blocking\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n{payload}"
        ).encode()
    )
    _wait(lambda: any(_loads(u)["num_running_reqs"] for u in backends["decode"]), 60, "the request to run")
    sock.close()
    _assert_backends_idle(backends)
    _wait(lambda: _json(r + "/ares/cluster")["inflight"] == 0, what="router bookkeeping to drain")
    for rid in ("disconnect-stream", "disconnect-blocking"):
        line = f"rid={rid} client disconnected; aborting"
        _wait(lambda ln=line: ln in cluster.router.log_text(), what=f"the log line {line!r}")


def test_backend_failing_before_first_token_is_retried_elsewhere(backends, tmp):
    with failing_backend() as fake:
        fake_url = f"http://{HOST}:{fake.server_address[1]}"
        # Decode side: the broken server looks emptiest, so least_kv picks it first; the retry lands on decode1.
        with ares_router(tmp, backends["prefill"], [fake_url, backends["decode"][1]], "least_kv") as r:
            status, headers, body = _chat(r.url, max_tokens=3, ignore_eos=True, stream=True)
            assert status == 200 and _sse_events(body)[-1] == b"[DONE]", body
            assert headers["X-Ares-Decode"] == "decode1"
            rid = headers["X-Request-Id"]
            # The abort is sent in the background: wait for it to arrive, then check it is the only other call.
            _wait(lambda: len(fake.posts) >= 2, what="the failed attempt's abort")
            assert [p for p, _ in fake.posts] == ["/v1/chat/completions", "/abort_request"]
            assert fake.posts[1][1] == {"rid": rid}  # the failed attempt is aborted where it ran
            assert 'ares_retries_total{role="decode"} 1.0' in _request(r.url + "/metrics")[2].decode()
        # Prefill side: the broken prefill is first in turn; the decode that waited for its KV is aborted.
        fake.posts.clear()
        prefills = [(fake_url, 1), *backends["prefill"]]
        with ares_router(tmp, prefills, backends["decode"], "least_kv") as r:
            status, headers, body = _chat(r.url, max_tokens=3, ignore_eos=True)
            assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3
            assert headers["X-Ares-Prefill"] == "prefill1" and fake.posts[0][0] == "/v1/chat/completions"
        # Both servers broken: one retry, then the server's own error answer, status and body unchanged.
        with ares_router(tmp, [(fake_url, 1)], [fake_url], "least_kv") as r:
            status, _, body = _chat(r.url)
            assert (status, body) == (500, SGLANG_500)
            _wait(lambda: "failed before the first token" in r.log_text(), what="the router to log the failure")
    _assert_backends_idle(backends)


def test_no_healthy_backend_gives_503_and_is_reported(backends, tmp):
    with ares_router(tmp, backends["prefill"], [_dead_url()], "ares") as r:
        status, _, body = _chat(r.url)
        err = json.loads(body)
        assert status == 503 and set(err) == ERROR_KEYS and "no healthy decode server" in err["message"]
        assert _request(r.url + "/health")[0] == 503
        snap = _json(r.url + "/ares/cluster")["decode"][0]
        assert snap["healthy"] is False and "Connect" in snap["last_error"]
        assert 'ares_decode_healthy{instance="decode0"' in _request(r.url + "/metrics")[2].decode()
    with ares_router(tmp, [(_dead_url(), 1)], backends["decode"], "ares") as r:
        status, _, body = _chat(r.url)
        assert status == 503 and "no healthy prefill server" in json.loads(body)["message"]
        status, _, body = _request(r.url + "/generate", {"text": "hi"})
        assert status == 503 and json.loads(body) == {
            "error": {"message": "no healthy prefill server is available; retry later"}
        }
    _assert_backends_idle(backends)


async def _many_streams(router: str, n: int) -> list[tuple[int, bytes]]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300)
    ) as s:

        async def one(i: int) -> tuple[int, bytes]:
            body = {"messages": [{"role": "user", "content": f"client {i}"}], "max_tokens": 4, "stream": True}
            async with s.post(router + "/v1/chat/completions", json=body) as resp:
                return resp.status, await resp.read()

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_200_concurrent_streaming_clients(backends):
    results = asyncio.run(_many_streams(backends["router"], 200))
    bad = [(s, b[:200]) for s, b in results if s != 200 or _sse_events(b)[-1:] != [b"[DONE]"] or b'"error"' in b]
    assert not bad, bad[:3]
    snap = _wait(lambda: (s := _json(backends["router"] + "/ares/cluster"))["inflight"] == 0 and s, what="no inflight")
    assert all(d["dispatched"] > 50 for d in snap["decode"])  # both took a share
    _assert_backends_idle(backends)


async def _stream_through(url: str, bodies: list[dict], stop: asyncio.Event) -> None:
    """Streaming requests through a router, read until `stop` is set; then the clients hang up (the router aborts
    them on the servers)."""
    async with aiohttp.ClientSession() as s:

        async def one(body: dict) -> None:
            async with s.post(url + "/generate", json={**body, "stream": True}) as resp:
                async for _ in resp.content.iter_any():
                    if stop.is_set():
                        break

        tasks = [asyncio.create_task(one(b)) for b in bodies]
        await stop.wait()
        await asyncio.gather(*tasks, return_exceptions=True)


def _held_requests(router: str) -> float:
    metrics = _request(router + "/metrics")[2].decode()
    return float(next(ln.split()[1] for ln in metrics.splitlines() if ln.startswith("ares_held_requests ")))


def test_late_binding_holds_a_request_at_the_router_while_no_server_admits_it(backends, tmp):
    """`ares_hold` on real servers. A long request (prompt 400, max_tokens 3000) on each decode server leaves it
    4096 - 400 - gen - max(512, 3400 - (400 + gen)) = 696 - gen tokens or fewer by SGLang's rule, so a third request
    needing 400 + 512 waits at the router (the `ares_held_requests` gauge) instead of in a server's queue; when the
    long ones go, the next poll places it and it is answered."""
    long_body = {"input_ids": LONG_PROMPT, "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    with ares_router(tmp, backends["prefill"], backends["decode"], "ares_hold") as r:
        thread = threading.Thread(
            target=loop.run_until_complete, args=(_stream_through(r.url, [long_body, long_body], stop),)
        )
        thread.start()
        try:

            def both_running() -> bool:  # on the router's view: started (first token seen), one per server
                snap = _json(r.url + "/ares/cluster")["decode"]
                return all(len(d["requests"]) == 1 and not d["pending"] for d in snap)

            _wait(both_running, 120, "one long request running on each decode server")
            with ThreadPoolExecutor(1) as pool:
                body = {"input_ids": LONG_PROMPT, "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}
                answer = pool.submit(_request, r.url + "/generate", body, None, 300)
                _wait(lambda: _held_requests(r.url) == 1, what="the third request to be held at the router")
                assert _json(r.url + "/ares/cluster")["inflight"] == 2  # the two long ones: nothing else dispatched
                loop.call_soon_threadsafe(stop.set)  # the long requests' clients hang up: the servers free their KV
                status, headers, raw = answer.result(timeout=300)
            assert status == 200, raw
            assert len(json.loads(raw)["output_ids"]) == 4 and headers["X-Ares-Decode"] in ("decode0", "decode1")
            assert _held_requests(r.url) == 0
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(timeout=60)
            loop.close()
    _assert_backends_idle(backends)


@pytest.mark.kills_a_server
def test_dead_decode_is_detected_reported_and_retried(cluster, backends, tmp):
    """Runs last: kills decode1 (of the session's tiny servers). A router that has not noticed yet retries on
    decode0; the polling router marks decode1 unhealthy in /ares/cluster and /metrics."""
    with ares_router(
        tmp, backends["prefill"], backends["decode"], "round_robin", "--poll-interval", "60", "--stale-after", "600"
    ) as slow:
        cluster.servers.kill("decode1")  # SIGKILL to its process group (this session's tiny servers)
        for _ in range(2):  # round robin: one of the two goes to dead decode1 first
            status, headers, body = _chat(slow.url, max_tokens=2)
            assert status == 200 and headers["X-Ares-Decode"] == "decode0", body
        assert 'retries_total{role="decode"} 1.0' in _request(slow.url + "/metrics")[2].decode()
    r = backends["router"]
    _wait(lambda: not _json(r + "/ares/cluster")["decode"][1]["healthy"], what="decode1 to be marked unhealthy")
    assert (
        'ares_decode_healthy{instance="decode1",url="' + backends["decode"][1] + '"} 0.0'
        in _request(r + "/metrics")[2].decode()
    )
    status, headers, _ = _chat(r, max_tokens=2)
    assert status == 200 and headers["X-Ares-Decode"] == "decode0"
