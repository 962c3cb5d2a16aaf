"""The router's keys (`ares_router.auth`): the pure decision, then a real router over real servers.

The live part uses the suite's shared servers (`conftest.ares_servers`: SmolLM2-135M, 1 prefill + 3 `--ares` decode
servers) started with SGLang's own `--admin-api-key`: the decode servers' migration command endpoint then
wants that key, and a router started with the same `--admin-api-key` passes it on, so its migrations still commit.
A router without the servers' key still serves on loopback, and its moves fail cleanly.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from conftest import SERVER_KEY, prefills
from http_helpers import ares_router, get_json, request, wait_for

from ares.cluster.launcher import free_ports, http_ok, stop_groups
from ares.cluster.router_proc import RouterProcess, router_argv
from ares_router.auth import Level, decide, is_loopback, level_of


def test_levels_follow_sglang_probes_open_admin_actions_and_the_pin():
    assert level_of("/health", False) is Level.OPEN and level_of("/metrics", True) is Level.OPEN
    assert level_of("/v1/chat/completions", False) is Level.CLIENT
    assert level_of("/generate", True) is Level.ADMIN  # X-Ares-Decode places a request by hand
    assert level_of("/ares/migrate", False) is Level.ADMIN and level_of("/flush_cache", False) is Level.ADMIN


@pytest.mark.parametrize(
    "level, header, peer, api_key, admin_key, status",
    [
        (Level.CLIENT, None, "10.0.0.1", None, None, None),  # no keys: open, as SGLang
        (Level.ADMIN, None, "127.0.0.1", None, None, None),  # no admin key: loopback may
        (Level.ADMIN, None, "::1", None, None, None),
        (Level.ADMIN, None, "10.0.0.1", None, None, 403),  # ... other hosts may not
        (Level.CLIENT, None, "127.0.0.1", "c", None, 401),
        (Level.CLIENT, "Bearer c", "10.0.0.1", "c", None, None),
        (Level.CLIENT, "bearer c", "10.0.0.1", "c", None, None),  # the scheme is case-insensitive
        (Level.CLIENT, "Bearer x", "10.0.0.1", "c", None, 401),
        (Level.CLIENT, "c", "10.0.0.1", "c", None, 401),  # no scheme
        (Level.CLIENT, "Bearer a", "10.0.0.1", "c", "a", None),  # the admin key opens client endpoints too
        (Level.ADMIN, "Bearer c", "127.0.0.1", "c", "a", 401),  # the client key never opens admin actions
        (Level.ADMIN, "Bearer a", "10.0.0.1", "c", "a", None),
        (Level.ADMIN, None, "127.0.0.1", None, "a", 401),  # with an admin key, loopback needs it too
        (Level.ADMIN, "Bearer c", "127.0.0.1", "c", None, None),  # no admin key: loopback with the client key
        (Level.ADMIN, "Bearer c", "10.0.0.1", "c", None, 403),
        (Level.OPEN, None, "10.0.0.1", "c", "a", None),
    ],
)
def test_decide(level, header, peer, api_key, admin_key, status):
    refused = decide(level, header, peer, api_key, admin_key)
    assert (refused.status if refused else None) == status
    if refused is not None:  # the OpenAI error shape
        body = json.loads(refused.body(""))
        assert body["object"] == "error" and body["code"] == status and body["message"]


def test_loopback_addresses():
    assert is_loopback("127.0.0.1") and is_loopback("127.3.2.1") and is_loopback("::1") and is_loopback(None)
    assert not is_loopback("192.168.1.2") and not is_loopback("::ffff:10.0.0.1") and not is_loopback("host")


@contextmanager
def keyed_router(tmp_path, cluster, *extra: str, timeout_s: float = 120) -> Iterator[RouterProcess]:
    """An ARES router over `cluster` with `extra` flags, ready once its open `/health` says a prefill and a decode
    server are healthy (the shared helper waits on `/ares/cluster`, which a client key guards), stopped by PID."""
    port = free_ports(1)[0]
    log = tmp_path / f"router-{port}.log"
    with open(log, "wb") as out:
        argv = router_argv(port, prefills(cluster), cluster.decode_urls, "round_robin", *extra)
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    r = RouterProcess(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_for(lambda: proc.poll() is not None or http_ok(r.url + "/health"), timeout_s, "the router to be ready")
        assert proc.poll() is None, r.log_text()[-3000:]
        yield r
    finally:
        stop_groups([(proc.pid, None)], grace_s=10)
        proc.wait()


def _body(n: int) -> dict:
    return {"input_ids": list(range(100, 140)), "sampling_params": {"max_new_tokens": n, "temperature": 0,
                                                                    "ignore_eos": True}}  # fmt: skip


def _cmd(url: str, headers: dict | None = None) -> int:
    return request(url + "/ares/migrate/cmd", {"cmd": "status"}, headers, timeout=30)[0]


def test_the_decode_servers_migration_commands_need_their_admin_key(ares_servers):
    url = ares_servers.decode_urls[0]
    assert _cmd(url) == 401
    assert _cmd(url, {"Authorization": "Bearer wrong"}) == 401
    assert _cmd(url, {"Authorization": f"Bearer {SERVER_KEY}"}) == 200
    assert get_json(url + "/ares/state")["capacity_tokens"] > 0  # the load report stays a normal endpoint


def _running_on(cluster, min_generated: int) -> str | None:
    for i, url in enumerate(cluster.decode_urls):
        if any(r["generated_tokens"] >= min_generated for r in get_json(url + "/ares/state")["requests"]):
            return f"decode{i}"
    return None


def _move(router: str, cluster, key: str | None, n: int = 300) -> tuple[dict, int, dict]:
    """A `/generate` request through `router`, moved to the other decode server once it runs; its answer and the
    move's status and record."""
    admin = {"Authorization": f"Bearer {key}"} if key else None
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(request, router + "/generate", {**_body(n), "rid": "auth-move"}, admin, 600)
        source = wait_for(lambda: _running_on(cluster, 4), 120, "the request to run")
        to = "decode1" if source == "decode0" else "decode0"
        status, _, raw = request(router + "/ares/migrate", {"rid": "auth-move", "to": to}, admin, 300)
        out_status, _, out_raw = fut.result()
    assert out_status == 200, out_raw[:300]
    return json.loads(out_raw), status, json.loads(raw)


def test_router_keys_guard_clients_and_admin_actions_and_reach_the_servers(ares_servers, tmp_path):
    """Client key for generation, admin key for the migration, the pin and flushes, 401 in the OpenAI shape;
    the router passes its admin key on to the decode servers, so the move commits there."""
    keys = ("--api-key", "client-key", "--admin-api-key", SERVER_KEY)
    with keyed_router(tmp_path, ares_servers, *keys) as r:
        status, headers, raw = request(r.url + "/generate", _body(4))
        assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
        err = json.loads(raw)
        assert err["object"] == "error" and err["code"] == 401 and "API key" in err["message"]
        client = {"Authorization": "Bearer client-key"}
        assert request(r.url + "/generate", _body(4), client)[0] == 200
        assert request(r.url + "/v1/models", None, client)[0] == 200
        assert request(r.url + "/health")[0] == 200 and request(r.url + "/metrics")[0] == 200  # probes stay open
        pinned = {**client, "X-Ares-Decode": "decode1"}
        assert request(r.url + "/generate", _body(4), pinned)[0] == 401  # the pin is an admin action
        assert request(r.url + "/flush_cache", {}, client)[0] == 401
        assert request(r.url + "/ares/migrate", {"rid": "x", "to": "decode1"}, client)[0] == 401
        admin_pin = {"Authorization": f"Bearer {SERVER_KEY}", "X-Ares-Decode": "decode1"}
        status, headers, _ = request(r.url + "/generate", _body(4), admin_pin)
        assert status == 200 and headers["X-Ares-Decode"] == "decode1"
        ref = json.loads(request(r.url + "/generate", _body(300), client, 600)[2])
        out, status, rec = _move(r.url, ares_servers, SERVER_KEY)
        assert status == 200 and rec["state"] == "committed", rec
        assert out["output_ids"] == ref["output_ids"]
        assert request(r.url + "/flush_cache", {}, {"Authorization": f"Bearer {SERVER_KEY}"})[0] == 200


def test_a_router_without_the_servers_key_cannot_move_and_nothing_breaks(ares_servers, tmp_path):
    """No keys on the router (loopback default): it serves, its `/ares/migrate` is open to loopback, but the decode
    servers refuse its commands (401): the move fails cleanly and the request completes where it was."""
    with ares_router(tmp_path, prefills(ares_servers), ares_servers.decode_urls, "round_robin") as r:
        ref = json.loads(request(r.url + "/generate", _body(300), None, 600)[2])
        out, status, rec = _move(r.url, ares_servers, None)
    assert status == 409 and rec["state"] == "failed" and "401" in rec["reason"], rec
    assert out["output_ids"] == ref["output_ids"]
