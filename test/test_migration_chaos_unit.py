"""The chaos benchmark's pieces (`benchmark/migration_chaos.py` runs real servers; these check its judgement and
plumbing without any): the verdict of an answer against its reference, the stream reader that builds answers, the
router's rows of where each request runs, and one server's crash and restart in `Cluster`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import orjson
import pytest

from ares.cluster import Cluster, ClusterSpec, ServerSpec
from ares.cluster.launcher import free_ports, group_members, http_ok
from ares.migration.chaos import (
    CLEAN_ERROR,
    DISCONNECTED,
    DIVERGED,
    DUPLICATED,
    IDENTICAL,
    LOST,
    MALFORMED,
    TRUNCATED,
    Answer,
    relation,
    verdict,
)
from ares_router.migration import Hop, InFlight, Migration
from ares_router.migration_control import flight_rows
from ares_router.state import Backend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmark"))
import migration_chaos as bench  # noqa: E402

REF = Answer(200, "abcdef", [1, 2, 3, 4, 5, 6], 6, "length")


def ans(tokens: list[int], **kw) -> Answer:
    return Answer(
        **{"status": 200, "text": "", "tokens": tokens, "completion_tokens": len(tokens), "finish": "length", **kw}
    )


def test_relation_of_sequences():
    assert relation([1, 2, 3], [1, 2, 3]) == "equal"
    assert relation([1, 2], [1, 2, 3]) == "prefix"
    assert relation([1, 3], [1, 2, 3]) == "gapped"
    assert relation([1, 2, 2, 3], [1, 2, 3]) == "longer"
    assert relation([1, 2, 3, 4], [1, 2, 3]) == "longer"
    assert relation([1, 9, 3], [1, 2, 3]) == "diverged"
    assert relation("abd", "abc") == "diverged"


def test_verdicts_of_answers():
    assert verdict(ans([1, 2, 3, 4, 5, 6]), REF)[0] == IDENTICAL
    # The second-move bug: 200, fewer tokens, the internal finish shown.
    v, why = verdict(ans([1, 2], finish="abort", internal=True), REF)
    assert v == TRUNCATED and "internal" in why
    assert verdict(ans([1, 2, 3, 4, 5, 6, 6]), REF)[0] == DUPLICATED
    assert verdict(ans([1, 2, 3, 4, 5, 6], stepped_back=True), REF)[0] == DUPLICATED
    assert verdict(ans([1, 2, 4, 5, 6]), REF)[0] == LOST
    assert verdict(ans([1, 2, 3, 4, 5, 7]), REF)[0] == DIVERGED
    assert verdict(ans([1, 2, 3, 4, 5, 6], completion_tokens=5), REF)[0] == MALFORMED
    assert verdict(ans([1, 2, 3, 4, 5, 6], ids=2), REF)[0] == MALFORMED
    assert verdict(ans([1, 2, 3, 4, 5, 6], complete=False), REF)[0] == MALFORMED
    assert verdict(Answer(None, error="client: timeout"), REF)[0] == LOST
    assert verdict(Answer(None, error="hung up"), REF, disconnected=True)[0] == DISCONNECTED


def test_errors_are_clean_only_where_the_crash_hit():
    broken = ans([1, 2, 3], error="in-band error: decode server stream failed", complete=True)
    assert verdict(broken, REF, error_allowed=True)[0] == CLEAN_ERROR
    assert verdict(broken, REF)[0] == LOST
    http_error = Answer(502, error="HTTP 502: backend failed")
    assert verdict(http_error, REF, error_allowed=True)[0] == CLEAN_ERROR
    assert verdict(Answer(503), REF)[0] == LOST  # an error status without a message is still an error
    # Wrong tokens before the error: the error does not excuse them.
    assert verdict(ans([1, 9], error="in-band error: x"), REF, error_allowed=True)[0] == DIVERGED


def test_text_is_compared_where_there_are_no_token_ids():
    ref = Answer(200, "Once upon a time", None, 4, "length")
    assert verdict(Answer(200, "Once upon a time", None, 4, "length"), ref)[0] == IDENTICAL
    assert verdict(Answer(200, "Once upon", None, 2, "abort"), ref)[0] == TRUNCATED
    assert verdict(Answer(200, "Once upon a timea time", None, 6, "length"), ref)[0] == DUPLICATED


def _feed(reader: bench.StreamReader, events: list[object]) -> Answer:
    for e in events:
        reader.feed(e if isinstance(e, bytes) else orjson.dumps(e))
    return reader.a


def _gen_event(ids: list[int], text: str, finish: dict | None = None, rid: str = "r1") -> dict:
    return {
        "text": text,
        "output_ids": ids,
        "meta_info": {"id": rid, "completion_tokens": len(ids), "finish_reason": finish},
    }


def test_stream_reader_builds_generate_answers():
    a = _feed(
        bench.StreamReader("/generate", 200),
        [
            _gen_event([5], "a"),
            _gen_event([5, 6], "ab"),
            _gen_event([5, 6, 7], "abc", {"type": "length"}),
            b"[DONE]",
        ],
    )
    assert (a.tokens, a.text, a.completion_tokens, a.finish, a.finishes, a.complete) == (
        [5, 6, 7],
        "abc",
        3,
        "length",
        1,
        True,
    )
    assert not a.stepped_back and a.error is None and not a.internal
    # A repeated token (the cumulative ids do not extend the previous ones) and the internal finish.
    a = _feed(
        bench.StreamReader("/generate", 200),
        [
            _gen_event([5, 6], "ab"),
            _gen_event([5, 5, 6], "aab"),
            _gen_event([5, 5, 6], "aab", {"type": "abort", "message": "ares_migrated:x"}),
            b"[DONE]",
        ],
    )
    assert a.stepped_back and a.internal and a.error is None
    # An abort with a status code is an error the client is told about; so is an in-band error event.
    a = _feed(
        bench.StreamReader("/generate", 200),
        [_gen_event([5], "a", {"type": "abort", "message": "gone", "status_code": 503})],
    )
    assert a.error is not None and "503" in a.error and not a.complete
    a = _feed(bench.StreamReader("/generate", 200), [_gen_event([5], "a"), {"error": {"message": "broke"}}])
    assert a.error is not None and "broke" in a.error


def test_stream_reader_builds_openai_answers():
    chunks = [
        {"id": "c1", "choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"id": "c1", "choices": [{"delta": {"content": "Hel"}, "finish_reason": None}]},
        {"id": "c1", "choices": [{"delta": {"content": "lo"}, "finish_reason": None}]},
        {"id": "c1", "choices": [{"delta": {}, "finish_reason": "length"}]},
        {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
        b"[DONE]",
    ]
    a = _feed(bench.StreamReader("/v1/chat/completions", 200), chunks)
    assert (a.text, a.completion_tokens, a.finish, a.finishes, a.ids, a.tokens) == ("Hello", 2, "length", 1, 1, None)
    parsed = bench.parse_answer(
        "/v1/completions",
        200,
        orjson.dumps(
            {"id": "x", "choices": [{"text": "Hello", "finish_reason": "length"}], "usage": {"completion_tokens": 2}}
        ),
    )
    assert verdict(parsed, a)[0] == IDENTICAL
    err = bench.parse_answer("/v1/completions", 502, orjson.dumps({"object": "error", "message": "decode died"}))
    assert err.error == "HTTP 502: decode died"


def test_every_combination_of_endpoint_and_mode_is_asked_and_the_specs_are_seeded():
    specs = bench.make_specs(60, 7, (32, 64), 0.1)
    combos = {(s.endpoint, s.stream) for s in specs}
    assert len(combos) == 6 and sorted(s.index for s in specs) == list(range(60))
    assert [s.prompt for s in bench.make_specs(60, 7, (32, 64), 0.1)] == [s.prompt for s in specs]
    assert all(32 <= s.max_tokens <= 64 for s in specs)
    body = next(s for s in specs if s.endpoint == "/v1/chat/completions" and s.stream).body("m")
    assert body["temperature"] == 0 and body["ignore_eos"] and body["stream_options"] == {"include_usage": True}


def test_router_rows_name_where_each_request_runs():
    d = [Backend("decode", i, f"http://127.0.0.1:{9000 + i}") for i in range(3)]
    p = Backend("prefill", 0, "http://127.0.0.1:8999", bootstrap_port=8998)
    moved = InFlight("r1", "/generate", {}, True, p, [Hop("r1", d[0]), Hop("r1b", d[1])])
    moving = InFlight("r2", "/generate", {}, True, p, [Hop("r2", d[2])])
    m = Migration("m2", "r2", "decode2", "decode0", state="precopy")
    m.target_backend = d[0]
    moving.moves.append(m)
    rows = flight_rows({"client-1": "r1", "client-2": "r2", "gone": "r3"}, {"r1": moved, "r2": moving})
    assert rows == [
        {
            "request_id": "client-1",
            "rid": "r1",
            "backend_rid": "r1b",
            "decode": "decode1",
            "hops": ["decode0", "decode1"],
            "moving": None,
            "moving_to": None,
        },
        {
            "request_id": "client-2",
            "rid": "r2",
            "backend_rid": "r2",
            "decode": "decode2",
            "hops": ["decode2"],
            "moving": "m2",
            "moving_to": "decode0",
        },
    ]


def test_a_killed_server_restarts_on_its_port(tmp_path):
    """`Cluster.kill` (SIGKILL, reaped) and `restart` (same port, same command line, log appended), on a stand-in
    server: Python's http.server answering /health."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "health").write_text("ok")
    port = free_ports(1)[0]
    argv = (sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(www))
    server = ServerSpec("decode", 0, port, argv)
    cluster = Cluster(ClusterSpec(model_path="unused"), log_dir=tmp_path / "logs")
    cluster.servers = [server]
    cluster.log_dir.mkdir()  # what `start` does first
    try:
        cluster._launch(server)
        cluster._wait_healthy([server], 60)
        first = cluster.pids["decode0"]
        cluster.kill("decode0")
        assert "decode0" not in cluster.pids and not group_members({first})
        assert not http_ok(server.url + "/health", timeout=1)
        with pytest.raises(KeyError):
            cluster.kill("decode7")
        cluster.restart("decode0", timeout_s=60)
        assert cluster.pids["decode0"] != first and http_ok(server.url + "/health")
        with pytest.raises(Exception, match="still running"):
            cluster.restart("decode0")
        deadline = time.monotonic() + 30
        while (tmp_path / "logs" / "decode0.log").read_text().count("GET /health") < 2:  # both runs' lines kept
            assert time.monotonic() < deadline, (tmp_path / "logs" / "decode0.log").read_text()
            time.sleep(0.1)
    finally:
        cluster.stop()
    assert cluster.pids == {}


# -- what the chaos run found ----------------------------------------------------------------------------------------
def test_a_command_whose_connection_broke_without_an_answer_is_sent_once_more():
    """The chaos run's failed moves `unreachable: ClientOSError`: the router's pool reused a connection the server
    was closing (SGLang's uvicorn keeps idle connections 5 s, aiohttp's pool 15 s; a server resumed after SIGSTOP
    closes the ones it held idle, the command unread). The command is sent once more; a refused connect (the
    server is down) and an error answer are not."""
    import asyncio

    import aiohttp
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from ares_router.migration import Commands, MigrationFailed

    async def run() -> None:
        calls: list[str] = []

        async def handler(request: web.Request) -> web.StreamResponse:
            calls.append((await request.json())["cmd"])
            if len(calls) == 1:
                assert request.transport is not None
                request.transport.close()  # the connection breaks before any answer
                return web.Response()
            if len(calls) == 3:
                return web.json_response({"status": 409, "reason": "finished"}, status=409)
            return web.json_response({"status": 200, "n": len(calls)})

        app = web.Application()
        app.router.add_post("/{tail:.*}", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                cmds = Commands(session)
                backend = Backend("decode", 0, str(server.make_url("")).rstrip("/"))
                assert (await cmds(backend, {"cmd": "out_pause", "mid": "m"}))["n"] == 2
                assert calls == ["out_pause", "out_pause"]
                with pytest.raises(MigrationFailed, match="finished") as refused:
                    await cmds(backend, {"cmd": "out_slots", "mid": "m"})
                assert refused.value.refused and len(calls) == 3  # an answer, even an error, is not repeated
                down = Backend("decode", 1, f"http://127.0.0.1:{free_ports(1)[0]}")
                with pytest.raises(MigrationFailed, match="unreachable: ClientConnectorError"):
                    await cmds(down, {"cmd": "out_begin", "mid": "m"})
        finally:
            await server.close()

    asyncio.run(run())


def test_a_repeated_pause_answers_the_paused_state_again():
    """The router may now repeat `out_pause` (above): the agent answers the first answer again instead of running
    it twice (a second run would find the request out of the batch and answer 409 not_running)."""
    from ares.migration.commands import Answers, CommandError, dispatch

    class Source:
        runs = 0

        def cmd_out_pause(self, msg: dict) -> dict:
            self.runs += 1
            if self.runs > 1:
                raise CommandError(409, "not_running")
            return {"output_ids": [7, 8], "written": 9, "slots": [1]}

    src, answers = Source(), Answers()
    first = dispatch(src, answers, {"cmd": "out_pause", "mid": "m1"})
    again = dispatch(src, answers, {"cmd": "out_pause", "mid": "m1"})
    assert first == {"status": 200, "output_ids": [7, 8], "written": 9, "slots": [1]}
    assert again == {**first, "repeated": True} and src.runs == 1


def test_a_move_whose_request_never_reached_the_target_fails_at_once():
    """The second chaos run's `in_reserve: not_attached` failures: R's request to the target broke (sent while the
    target was SIGSTOPped), so it could never attach, and the move waited out the 30 s attach timeout. Now it fails
    as soon as that request has failed, and is undone (the request goes on on its source)."""
    import asyncio

    import aiohttp

    from ares_router.migration import MigrationFailed, MigrationLimits, run_migration

    class Session:
        async def _reset(self) -> None:
            raise aiohttp.ClientOSError(104, "Connection reset by peer")

        def post(self, url: str, data: bytes | None = None, headers: dict | None = None):
            return self._reset()

    class FakeCommands:
        session = Session()

        def __init__(self) -> None:
            self.sent: list[tuple[str, str]] = []

        async def __call__(self, server: Backend, msg: dict, timeout_s: float = 120.0) -> dict:
            self.sent.append((server.name, msg["cmd"]))
            if msg["cmd"] == "out_begin":
                return {"layout": {"page_size": 1}, "prompt_digest": "d", "output_ids": [5]}
            if msg["cmd"] == "in_reserve":
                raise MigrationFailed(f"{server.name} in_reserve: HTTP 404 not_attached", True)
            return {}

    d = [Backend("decode", i, f"http://127.0.0.1:{9000 + i}") for i in range(2)]
    p = Backend("prefill", 0, "http://127.0.0.1:8999", bootstrap_port=8998)
    flight = InFlight.create("r1", "/generate", {"input_ids": [1, 2]}, True, p, d[0])
    m = Migration("m1", "r1", "decode0", "decode1")
    flight.moves.append(m)
    cmds = FakeCommands()
    t0 = time.monotonic()
    asyncio.run(run_migration(cmds, flight, d[1], MigrationLimits(attach_timeout_s=30.0), m))
    assert m.state == "failed" and "never got the request" in m.reason and "ClientOSError" in m.reason, m
    assert time.monotonic() - t0 < 10  # not the 30 s attach timeout
    assert ("decode1", "in_abort") in cmds.sent and ("decode0", "out_resume") in cmds.sent
    assert [h.decode.name for h in flight.hops] == ["decode0"]
