"""The multi-process router (`--workers N`): the brain-worker channel, the brain's bookkeeping of requests its
workers relay, the merged `/metrics`, and a 2-worker router in front of a real PD cluster (tiny model) whose
answers equal transformers' greedy ones and whose requests are served by both workers.

The migration through a 2-worker router is in `test_router_workers_migration.py` (a SmolLM2 cluster of its own).
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from pathlib import Path

import pytest
from http_helpers import ares_router, get_json, request, wait_for
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from ares.cluster.launcher import free_ports
from ares_router.brain import Brain, merge_metrics
from ares_router.brain_channel import Channel, ChannelClosed, RemoteError, connect, frame, serve
from ares_router.config import RouterConfig
from ares_router.protocol import APIError
from ares_router.workers import WORKER_HEADER, reuseport_socket

DEADLINE_S = 60.0


# -- the channel ----------------------------------------------------------------------------------------------------
async def _pair(tmp: Path, brain_handlers: dict, worker_handlers: dict, lost: list | None = None):
    """A served end (the brain's) and a connected end (a worker's) over a real unix socket."""
    ends: list[Channel] = []

    def accept() -> Channel:
        ch = Channel(brain_handlers, on_lost=(lost.append if lost is not None else None), name="brain")
        ends.append(ch)
        return ch

    server = await serve(str(tmp / "c.sock"), accept)
    worker = await connect(str(tmp / "c.sock"), Channel(worker_handlers, name="worker"))
    await wait_async(lambda: ends)
    return server, ends[0], worker


async def wait_async(predicate, timeout: float = 10.0):
    """Until `predicate()` is truthy (its value), checked every loop turn; fails after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := predicate()):
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)
    return value


def test_channel_calls_notifications_errors_and_order(tmp_path):
    """Calls both ways get their handler's value (plain or awaited); a handler's APIError comes back with its
    status; notifications arrive in the order sent, also a burst sent in one loop turn (one write)."""
    seen: list[int] = []

    async def slow_double(msg: dict) -> int:
        await asyncio.sleep(0.01)
        return msg["x"] * 2

    def refuse(msg: dict) -> None:
        raise APIError(503, "no healthy decode server")

    async def main() -> None:
        server, brain, worker = await _pair(
            tmp_path,
            {
                "add": lambda m: m["a"] + m["b"],
                "slow": slow_double,
                "refuse": refuse,
                "n": lambda m: seen.append(m["v"]),
            },
            {"ping": lambda m: "pong"},
        )
        assert await worker.call("add", {"a": 2, "b": 3}) == 5
        assert await worker.call("slow", {"x": 21}) == 42
        assert await brain.call("ping") == "pong"  # the brain calls a worker on the same connection
        with pytest.raises(RemoteError) as e:
            await worker.call("refuse")
        assert e.value.status == 503 and "no healthy decode" in e.value.message
        with pytest.raises(RemoteError, match="no handler"):
            await worker.call("unknown")
        for v in range(500):  # one loop turn: one write of 500 frames
            worker.send("n", {"v": v})
        results = await asyncio.gather(*(worker.call("add", {"a": i, "b": 1}) for i in range(200)))
        assert results == [i + 1 for i in range(200)]
        await wait_async(lambda: len(seen) == 500)
        assert seen == list(range(500))
        worker.close()
        server.close()

    asyncio.run(main())


def test_channel_cancel_reaches_the_handler_and_a_lost_peer_fails_pending_calls(tmp_path):
    """A caller that gives up cancels the handler on the other side; when one side goes away, the other's pending
    calls fail with ChannelClosed, its on_lost runs once, and later calls fail at once."""
    state = {"started": 0, "cancelled": 0}

    async def forever(msg: dict) -> None:
        state["started"] += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            state["cancelled"] += 1
            raise

    async def main() -> None:
        lost: list[Channel] = []
        server, brain, worker = await _pair(tmp_path, {"forever": forever}, {"forever": forever}, lost)
        with pytest.raises(asyncio.TimeoutError):
            await worker.call("forever", timeout=0.2)
        await wait_async(lambda: state["cancelled"] == 1)
        pending = asyncio.ensure_future(brain.call("forever"))
        await wait_async(lambda: state["started"] == 2)
        worker.close()  # the worker goes away
        with pytest.raises(ChannelClosed):
            await pending
        await wait_async(lambda: lost == [brain])
        with pytest.raises(ChannelClosed):
            await brain.call("forever")
        brain.send("forever")  # dropped, no error: the peer is gone
        server.close()

    asyncio.run(main())


def test_channel_parses_frames_split_anywhere():
    """Frames cut at every byte boundary, and several in one read, decode to the same messages in order."""
    got: list[dict] = []
    ch = Channel({"m": got.append})
    wire = b"".join(frame({"k": "m", "v": i, "s": "x" * i}) for i in range(20))
    for b in wire:
        ch.data_received(bytes([b]))
    ch.data_received(wire)
    assert [m["v"] for m in got] == list(range(20)) * 2
    assert got[7]["s"] == "x" * 7


# -- the brain's bookkeeping and metrics ----------------------------------------------------------------------------
def _config(**kw) -> RouterConfig:
    return RouterConfig(prefill=[("http://127.0.0.1:1", 8998)], decode=["http://127.0.0.1:2", "http://127.0.0.1:3"],
                        policy="least_kv", workers=2, **kw)  # fmt: skip


def test_brain_books_what_its_workers_report():
    """start / tokens / moved / end from a worker update the brain's state exactly as the single-process router's
    own dispatch, relay and migration do: the snapshot's rows, every id the request can be named by, the rebalancer's
    view; a worker that goes away takes its requests with it."""
    brain = Brain(_config(), 2)
    h = brain.handlers
    start = {"r": "a" * 32, "c": "client-1", "e": "/generate", "w": None, "d": 0, "p": 0, "pt": 100, "mt": 50, "_w": 1}
    h["start"](start)
    t = brain.state.requests["a" * 32]
    assert (t.decode, t.prompt_tokens, t.max_tokens, t.started) == (0, 100, 50, False)
    assert brain.state.decodes[0].inflight == 1 and brain.state.prefills[0].inflight == 1
    assert brain._flight_of("client-1") is brain.inflight["a" * 32]  # /ares/migrate finds it by the client's id
    assert brain.links[1].dispatched == 1
    h["tokens"]({"g": {"a" * 32: 7}, "_w": 1})
    assert t.started and t.generated == 7
    h["moved"]({"old": "a" * 32, "new": "b" * 32, "d": 1, "_w": 1})
    assert brain.state.requests["b" * 32] is t and t.decode == 1
    assert brain._flight_of("b" * 32).decode is brain.state.decodes[1]
    assert brain.state.decodes[0].inflight == 0 and brain.state.decodes[1].inflight == 1
    h["tokens"]({"g": {"b" * 32: 9}, "_w": 1})
    assert t.generated == 9
    h["end"]({"r": "a" * 32, "b": "b" * 32, "_w": 1})
    assert not brain.state.requests and not brain.inflight and not brain.hop_rids and not brain.client_rids
    assert brain.state.decodes[1].inflight == 0 and brain.state.prefills[0].inflight == 0
    # A refused request: the brain's own 503 reaches the worker as an error with its status.
    with pytest.raises(APIError) as e:
        h["choose"]({"pt": 10, "mt": 5, "xd": [], "xp": [], "f": None, "pin": None, "hold": False})
    assert e.value.status == 503  # nothing polled yet: no healthy server
    # A worker's requests end with its connection.
    h["start"]({**start, "r": "c" * 32, "c": "client-2", "_w": 0})
    ch = Channel({})
    brain.links[0].channel = ch
    brain._on_lost(ch)
    assert not brain.inflight and not brain.state.requests and brain.links[0].channel is None


def test_choose_books_the_request_and_names_the_head():
    """With healthy servers the brain's choice is the policy's (least_kv: the emptier server) and says whether that
    server reports the head's predictions; a pin is honoured; a failed server is taken out at once."""
    from ares_router.policy import DecodeLoad

    brain = Brain(_config(), 2)
    st = brain.state
    st.poll_ok(st.prefills[0], None)
    st.poll_ok(st.decodes[0], DecodeLoad(4096, 3000, 2, source="v1_loads"))
    st.poll_ok(st.decodes[1], DecodeLoad.from_reports(4096, 100, []))
    st.refresh()
    ask = {"pt": 10, "mt": 5, "xd": [], "xp": [], "f": None, "pin": None, "hold": False}
    assert brain.handlers["choose"](ask) == {"p": 0, "d": 1, "h": True}
    assert brain.handlers["choose"]({**ask, "pin": 0}) == {"p": 0, "d": 0, "h": False}
    brain.handlers["failed"]({"role": "decode", "x": 1, "err": "refused"})
    assert brain.handlers["choose"](ask)["d"] == 0


def test_merged_metrics_sum_the_workers_counters_and_histograms():
    """The brain's /metrics: its own families, with each worker's counter and histogram samples added (same name and
    labels summed, new label sets added); the result parses as Prometheus text."""
    reg = CollectorRegistry()
    c = Counter("ares_requests", "requests", ["endpoint", "status"], registry=reg)
    Histogram("ares_request_latency_seconds", "latency", ["endpoint"], buckets=(0.1, 1), registry=reg)
    c.labels("/health", "503").inc()

    def worker(n: int) -> list[dict]:
        wreg = CollectorRegistry()
        wc = Counter("ares_requests", "requests", ["endpoint", "status"], registry=wreg)
        wh = Histogram("ares_request_latency_seconds", "latency", ["endpoint"], buckets=(0.1, 1), registry=wreg)
        wc.labels("/generate", "200").inc(n)
        wh.labels("/generate").observe(0.05 * n)
        return [{"n": f.name, "d": f.documentation, "t": f.type,
                 "s": [[s.name, s.labels, s.value] for s in f.samples]} for f in wreg.collect()]  # fmt: skip

    text = merge_metrics(reg, [worker(1), worker(3)]).decode()
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert values[("ares_requests_total", (("endpoint", "/generate"), ("status", "200")))] == 4
    assert values[("ares_requests_total", (("endpoint", "/health"), ("status", "503")))] == 1
    assert values[("ares_request_latency_seconds_count", (("endpoint", "/generate"),))] == 2
    assert values[("ares_request_latency_seconds_bucket", (("endpoint", "/generate"), ("le", "0.1")))] == 1
    assert values[("ares_request_latency_seconds_bucket", (("endpoint", "/generate"), ("le", "1.0")))] == 2
    assert abs(values[("ares_request_latency_seconds_sum", (("endpoint", "/generate"),))] - 0.2) < 1e-9
    assert not any(name.endswith("_created") for name, _ in values)
    assert text.count("# TYPE ares_requests_total counter") == 1  # one family, not one per process


def test_reuseport_sockets_share_a_port():
    """Every worker binds the brain's port (the brain reserves it first, port 0: any free one)."""
    a = reuseport_socket("127.0.0.1", 0)
    port = a.getsockname()[1]
    b = reuseport_socket("127.0.0.1", port)
    b.listen(8)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # the listening one accepts; the reserving one never listens
    a.close()
    b.close()


def test_a_relay_of_another_host_needs_the_key_and_gets_a_number_of_its_own(tmp_path):
    """Over TCP (`--brain-listen`) a connection's first message must be a hello with the shared key: without it the
    brain drops the connection; with it a relay of another host gets the next worker number, and leaves the list
    when its connection ends (with its requests)."""
    from ares_router.brain import _Tagging

    async def main() -> None:
        brain = Brain(_config(brain_listen="127.0.0.1:0", brain_key="k3y"), 1)
        server = await serve("127.0.0.1:0", lambda: _Tagging(brain, tcp=True))
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        bad = await connect(address, Channel({}))
        with pytest.raises(ChannelClosed):
            await bad.call("hello", {"x": 0, "remote": True, "key": "wrong"}, timeout=10)
        good = await connect(address, Channel({}))
        assert await good.call("hello", {"x": 0, "remote": True, "key": "k3y", "pid": 7, "host": "h"}) == {"index": 1}
        good.send("start", {"r": "d" * 32, "c": "c", "e": "/generate", "w": None, "d": 0, "p": 0, "pt": 5, "mt": 5})
        await wait_async(lambda: "d" * 32 in brain.state.requests)
        assert brain.links[1].remote and brain.links[1].host == "h" and brain.inflight["d" * 32].worker == 1
        good.close()
        await wait_async(lambda: 1 not in brain.links)
        assert not brain.state.requests and not brain.inflight
        server.close()

    asyncio.run(main())


def test_workers_flag():
    with pytest.raises(ValueError, match="--workers"):
        RouterConfig(prefill=[("http://x", 1)], decode=["http://y"], workers=0)


# -- a 2-worker router in front of a real PD cluster -------------------------------------------------------------
def _post(url: str, body: dict) -> tuple[dict, bytes]:
    """A fresh connection per request (so the kernel spreads them over the workers): headers and body."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        return dict(r.headers), r.read()


def _generate(url: str, ids: list[int], stream: bool) -> tuple[str, list[int]]:
    """(the worker that served it, output ids) of a greedy 8-token `/generate`, streamed or not."""
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 8}, "stream": stream}
    headers, raw = _post(url + "/generate", body)
    if stream:  # the relay's path, token counts reported to the brain
        events = [json.loads(x[5:]) for x in raw.split(b"\n\n") if x.startswith(b"data:") and b"[DONE]" not in x]
        return headers[WORKER_HEADER], events[-1]["output_ids"]
    return headers[WORKER_HEADER], json.loads(raw)["output_ids"]


def test_two_workers_serve_correct_answers_and_the_brain_sees_every_request(pd_cluster, tiny_model, tmp_path):
    """A brain with 2 workers on its port, and a relay of "another host" (`--relay-of`, a second port) for the
    same brain: every answer is transformers' greedy one, both local workers and the relay serve requests, and the
    brain counts every request (its bookkeeping, `/ares/workers`, the summed `/metrics`)."""
    from test_e2e_pd import _hf, hf_greedy

    prefill = [(p["url"], p["bootstrap_port"]) for p in pd_cluster.state()["processes"] if p["role"] == "prefill"]
    decode = pd_cluster.decode_urls
    tok, _ = _hf(str(tiny_model))
    prompts = ["The capital of France is", "Once upon a time, in a land far away,", "def fibonacci(n):"]
    expected = {p: hf_greedy(str(tiny_model), tok.encode(p), 8) for p in prompts}
    listen = f"127.0.0.1:{free_ports(1)[0]}"
    key = ("--brain-key", "test-key")
    with (
        ares_router(tmp_path, prefill, decode, "least_kv", "--workers", "2", "--brain-listen", listen, *key) as r,
        ares_router(tmp_path, prefill, decode, "least_kv", "--relay-of", listen, *key) as relay,
    ):
        served: dict[str, int] = {}
        n = 0
        for i in range(30):
            prompt = prompts[i % len(prompts)]
            url = relay.url if i % 5 == 4 else r.url  # every fifth through the relay host's port
            worker, out = _generate(url, tok.encode(prompt), stream=bool(i % 2))
            assert out == expected[prompt], (i, prompt)
            served[worker] = served.get(worker, 0) + 1
            n += 1
        assert set(served) == {"0", "1", "2"}, served  # both local workers and the relay (numbered 2 by the brain)
        workers = get_json(r.url + "/ares/workers")["workers"]
        assert {w["worker"]: w["dispatched"] for w in workers} == {int(k): v for k, v in served.items()}
        assert [w["remote"] for w in workers] == [False, False, True]
        assert all(w["connected"] and w["inflight"] == 0 for w in workers)
        cluster = wait_for(
            lambda: (c := get_json(r.url + "/ares/cluster"))["inflight"] == 0 and c,
            DEADLINE_S,
            "the brain to see every request end",
        )
        assert cluster["dispatch_count"] == n and cluster["decode"][0]["dispatched"] == n
        metrics = request(relay.url + "/metrics")[2].decode()  # any worker's /metrics is the whole router's
        total = sum(
            s.value
            for fam in text_string_to_metric_families(metrics)
            for s in fam.samples
            if s.name == "ares_requests_total" and s.labels.get("endpoint") == "/generate"
        )
        assert total == n  # counted by each worker, summed by the brain
        status, _, raw = request(r.url + "/ares/migrate", {"rid": "nope", "to": "decode0"})
        assert status == 404 and b"no request" in raw  # admin endpoints answered by the brain
        assert request(relay.url + "/health")[0] == 200
        assert b"ARES router listening" in r.log.read_bytes()


def test_a_connection_that_sends_a_lot_before_its_hello_is_dropped():
    """Before a hello is accepted the brain buffers at most `PRE_HELLO_BYTES`: a peer announcing a huge frame and
    sending its bytes is cut off, without a key and without the brain holding up to `MAX_FRAME` for it."""
    from ares_router.brain import PRE_HELLO_BYTES, _Tagging

    async def main() -> None:
        brain = Brain(_config(brain_listen="127.0.0.1:0", brain_key="k3y"), 1)
        server = await serve("127.0.0.1:0", lambda: _Tagging(brain, tcp=True))
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((10 * 1024**2).to_bytes(4, "big") + b"x" * (PRE_HELLO_BYTES + 1))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # the brain closed the connection
        writer.close()
        assert 1 not in brain.links and brain.links[0].channel is None
        server.close()

    asyncio.run(main())


def test_a_worker_that_keeps_crashing_is_restarted_less_and_less_often(monkeypatch, tmp_path):
    """The supervisor restarts a crashed worker at once, then, while it crashes again soon after each restart, waits
    twice as long each time (capped): a worker that cannot start is not spawned twice a second forever."""
    from types import SimpleNamespace

    from ares_router import multiproc

    class Crashed:
        pid, returncode = 1, 1

        def poll(self) -> int:
            return 1

    spawned: list[float] = []

    def spawn(rundir: Path, index: int) -> Crashed:
        spawned.append(asyncio.get_running_loop().time())
        return Crashed()

    monkeypatch.setattr(multiproc, "spawn", spawn)
    monkeypatch.setattr(multiproc, "SUPERVISE_INTERVAL_S", 0.01)
    monkeypatch.setattr(multiproc, "RESTART_BACKOFF_MAX_S", 0.16)
    w = SimpleNamespace(index=0, proc=Crashed(), starts=1)

    async def main() -> None:
        task = asyncio.create_task(multiproc.supervise(lambda: [w], tmp_path, lambda: False))
        await asyncio.sleep(0.6)
        task.cancel()

    asyncio.run(main())
    gaps = [b - a for a, b in zip(spawned, spawned[1:], strict=False)]
    # at once, then 0.01, 0.02, 0.04, 0.08, 0.16, 0.16 ... apart (without the back-off: one every 0.01 s)
    assert 3 <= len(spawned) <= 8, spawned
    assert gaps[-1] >= 0.07 and w.starts == 1 + len(spawned)
