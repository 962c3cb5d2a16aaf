"""Migration under faults on the suite's shared ARES servers (this module reuses `test_migration_e2e`'s fixtures and
helpers): a server stopped (SIGSTOP) mid-transfer and resumed, the client gone after the move, the router killed
mid-migration, the source killed mid-migration and mid-stream. A test that kills a server runs after every other
test (`kills_a_server`), with the live servers the kill tests before it left.

The outcome every fault must leave: the client gets its whole answer exactly once (the unmigrated greedy tokens) or
a clear error, and no server holds KV or a migration record afterwards.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import signal
import threading
import urllib.request
from collections.abc import Callable

import pytest
from conftest import SERVER_IDLE_TTL_S, router_over
from http_helpers import get_json, request, stream_events, wait_for
from test_migration_e2e import (  # noqa: F401 - `cluster` and `prompt` are fixtures
    _incoming,
    _move_and_fault,
    assert_idle,
    body,
    check_same_output,
    cluster,
    migrate,
    other,
    prompt,
    where,
)

from ares.cluster.launcher import http_ok


def _pause(cluster, seconds: float) -> Callable[[str], None]:  # noqa: F811 - the fixture's name, a parameter here
    """A fault for `_move_and_fault`: SIGSTOP the server's process group (ours), SIGCONT it `seconds` later."""

    def pause(name: str) -> None:
        pid = cluster.servers.pids[name]
        os.killpg(pid, signal.SIGSTOP)
        threading.Timer(seconds, os.killpg, (pid, signal.SIGCONT)).start()

    return pause


@pytest.mark.parametrize("victim", ["target", "source"])
def test_a_server_stopped_mid_transfer_and_resumed_leaves_one_exact_answer_and_nothing_held(
    cluster,  # noqa: F811
    refs,
    prompt,  # noqa: F811
    tmp_path,
    victim,
):
    """The target (or the source) is stopped for 5 s once the target reserved, then resumed: the router's command
    waits for it, so the move commits late or fails cleanly (the request may end first); either way the client gets
    the unmigrated answer once, with one finish, and no server holds KV or a migration record afterwards."""
    slow = ("--ares-migrate-stage-delay", "0.5", "--ares-migrate-last-stage-tokens", "1")
    with router_over(tmp_path, cluster.servers, cluster.decode_urls, "round_robin", *slow) as r:
        events, answer, hit = _move_and_fault(cluster, r.url, body(prompt, 300), victim, _pause(cluster, 5.0))
    assert hit, "the target was never seen reserving"
    rec = answer["record"]
    assert (answer["status"], rec["state"]) in ((200, "committed"), (409, "failed")), rec
    ref = copy.deepcopy(refs[300])
    ref["meta_info"]["id"] = events[-1]["meta_info"]["id"]
    check_same_output(events, ref)
    assert_idle(cluster)
    for url in cluster.decode_urls:
        assert not {"attached", "reserved", "pulling"} & set(_incoming(url).values()), url


def test_client_gone_after_the_move_leaves_nothing_on_either_server(cluster, prompt, tmp_path):  # noqa: F811
    """The request moved, and then its client hangs up while B streams the rest: the router aborts it on B (A
    finished its part at the commit), and neither server holds anything afterwards."""
    with router_over(tmp_path, cluster.servers, cluster.decode_urls, "round_robin") as r:
        payload = json.dumps({**body(prompt, 400), "stream": True}).encode()
        req = urllib.request.Request(r.url + "/generate", data=payload, headers={"Content-Type": "application/json"})
        resp = urllib.request.urlopen(req, timeout=120)
        rid = json.loads(resp.readline().removeprefix(b"data:"))["meta_info"]["id"]
        source = wait_for(lambda: where(cluster, rid), 30, "the request to run")
        status, rec = migrate(r.url, rid, other(source))
        assert status == 200 and rec["state"] == "committed", rec
        for _ in range(3):  # a few of B's events reach the client
            resp.readline()
        resp.close()
        metrics = lambda: request(r.url + "/metrics")[2].decode()  # noqa: E731
        wait_for(lambda: 'ares_aborts_total{reason="client_disconnect"}' in metrics(), 60, "the router's abort")
    assert_idle(cluster)


def test_router_killed_mid_migration_leaves_nothing_on_any_server(cluster, prompt, tmp_path):  # noqa: F811
    """Documented outcome of the router process dying mid-migration (no router state survives it): the client's
    connection drops; the source sees its HTTP client gone and aborts the request (SGLang's own handling); so does
    the target (its copy is a request the router posted), and its agent frees the reservation with it; were that
    connection somehow kept, the agent's idle expiry would (`ARES_MIGRATE_IDLE_TTL_S`, 60 s by default,
    `SERVER_IDLE_TTL_S` on the test servers). Nothing is left on any server."""
    slow = ("--ares-migrate-stage-delay", "3", "--ares-migrate-last-stage-tokens", "1")
    with router_over(tmp_path, cluster.servers, cluster.decode_urls, "round_robin", *slow) as r:
        payload = json.dumps({**body(prompt, 400), "stream": True}).encode()
        req = urllib.request.Request(r.url + "/generate", data=payload, headers={"Content-Type": "application/json"})
        resp = urllib.request.urlopen(req, timeout=120)
        rid = json.loads(resp.readline().removeprefix(b"data:"))["meta_info"]["id"]
        source = wait_for(lambda: where(cluster, rid), 30, "the request to run")
        target_url = cluster.decode_urls[int(other(source)[-1])]
        mover = threading.Thread(target=lambda: migrate(r.url, rid, other(source)), daemon=True)
        mover.start()
        wait_for(lambda: "reserved" in _incoming(target_url).values(), 60, "the target to reserve", interval=0.02)
        os.killpg(r.proc.pid, signal.SIGKILL)  # the router process this test started
        r.proc.wait(timeout=30)
        last = b""
        try:  # the client's stream breaks: a reset or an end without the final event
            while line := resp.readline():
                last = line if line.strip() else last
        except (OSError, http.client.HTTPException):
            pass
        resp.close()
        assert b"[DONE]" not in last
    wait_for(
        lambda: all(get_json(u + "/ares/state")["used_tokens"] == 0 for u in cluster.decode_urls),
        SERVER_IDLE_TTL_S + 60,
        "every decode server to hold no KV",
    )
    assert not {"attached", "reserved", "pulling"} & set(_incoming(target_url).values())
    assert_idle(cluster)


@pytest.mark.kills_a_server
def test_source_killed_mid_migration_ends_the_client_stream_with_an_error_and_the_target_holds_nothing(
    cluster,  # noqa: F811 - the fixture imported above
    prompt,  # noqa: F811 - the fixture imported above
    tmp_path,
):
    """A dies while its KV is being copied to B:
    the client's stream ends at once with an in-band error (no hang), the migration fails, B frees its reservation,
    and both show in the router's metrics."""
    live = [u for u in cluster.decode_urls if http_ok(u + "/health")][:2]
    assert len(live) == 2, live
    slow = ("--ares-migrate-stage-delay", "2", "--ares-migrate-last-stage-tokens", "1")
    with router_over(tmp_path, cluster.servers, live, "round_robin", *slow) as r:
        events, answer, killed = _move_and_fault(cluster, r.url, body(prompt, 400), victim="source")
        metrics = request(r.url + "/metrics")[2].decode()
    assert killed, "the target was never seen reserving"
    assert "error" in events[-1] and events[-1]["error"]["code"] == 502, events[-1]
    assert all("error" not in e for e in events[:-1])
    rec = answer["record"]
    assert answer["status"] == 409 and rec["state"] == "failed" and "unreachable" in rec["reason"], rec
    target_url = cluster.decode_urls[int(answer["target"][-1])]  # the record names it as the router numbers it
    wait_for(lambda: get_json(target_url + "/ares/state")["used_tokens"] == 0, 60, "the target to free its KV")
    assert not {"attached", "reserved"} & set(_incoming(target_url).values())
    assert 'ares_aborts_total{reason="backend_stream_error"} 1.0' in metrics
    assert f'ares_migrations_total{{dst="{rec["target"]}",outcome="failed",src="{rec["source"]}"}} 1.0' in metrics


@pytest.mark.kills_a_server
def test_source_killed_mid_stream_ends_the_client_stream_with_an_error(cluster, prompt, tmp_path):  # noqa: F811
    """The server decoding a stream dies (no migration): the client's stream ends at once with an in-band 502 (no
    hang, no answer twice), and the router reports the decode server unhealthy. The third kill test: one decode
    server left is enough."""
    live = [u for u in cluster.decode_urls if http_ok(u + "/health")][:1]
    assert live, "no live decode server left"
    name = f"decode{cluster.decode_urls.index(live[0])}"
    with router_over(tmp_path, cluster.servers, live, "round_robin") as r:
        events = []
        for event in stream_events(r.url + "/generate", body(prompt, 400)):
            events.append(event)
            if len(events) == 10:
                cluster.servers.kill(name)  # SIGKILL to its process group (the shared servers are this session's)
        wait_for(lambda: not get_json(r.url + "/ares/cluster")["decode"][0]["healthy"], 60, "decode unhealthy")
    assert "error" in events[-1] and events[-1]["error"]["code"] == 502, events[-1]
    assert all("error" not in e for e in events[:-1]) and len(events) < 400
