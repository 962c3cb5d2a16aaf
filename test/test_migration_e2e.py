"""Live decode->decode migration on a real CPU cluster: SmolLM2-135M, 1 prefill + 2 `--ares` decode servers (Mooncake
TCP on loopback), the ARES router. One cluster for the module.

A greedy request's output does not depend on where it runs, so a migrated run must give the client exactly the
tokens, text and usage of an unmigrated run of the same request: one stream, the same id, every token once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from http_helpers import ares_router, get_json, request, stream_events, wait_for

from ares.cluster import Cluster, ClusterSpec
from ares.models import prepare_model

MAX_TOTAL_TOKENS = 8192


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    spec = ClusterSpec(
        model_path=str(prepare_model("smollm2")),
        n_prefill=1,
        n_decode=2,
        ares=True,
        max_total_tokens=MAX_TOTAL_TOKENS,
        router="ares",
        router_policy="round_robin",
        # A pause between pre-copy stages keeps a request on its source a little longer: several stages happen.
        router_args=("--ares-migrate-stage-delay", "0.2", "--ares-migrate-last-stage-tokens", "4"),
    )
    with Cluster(spec, log_dir=tmp_path_factory.mktemp("migration-cluster") / "logs") as c:
        yield c


def body(prompt: list[int], max_new_tokens: int) -> dict:
    return {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
    }


def generate(url: str, payload: dict) -> dict:
    status, headers, raw = request(url + "/generate", payload, timeout=600)
    assert status == 200, raw[:500]
    out = json.loads(raw)
    out["decode"] = headers.get("X-Ares-Decode")
    return out


def migrate(url: str, rid: str, to: str) -> tuple[int, dict]:
    status, _, raw = request(url + "/ares/migrate", {"rid": rid, "to": to}, timeout=300)
    return status, json.loads(raw)


def where(cluster, rid: str) -> str | None:
    """The decode server reporting `rid` as running, if any."""
    for i, url in enumerate(cluster.decode_urls):
        if any(r["rid"] == rid for r in get_json(url + "/ares/state")["requests"]):
            return f"decode{i}"
    return None


def running(cluster, min_generated: int = 1) -> str | None:
    """The decode server of the one running request, once it has `min_generated` tokens (the router gives the
    servers its own ids, so tests that name requests find them this way)."""
    for i, url in enumerate(cluster.decode_urls):
        if any(r["generated_tokens"] >= min_generated for r in get_json(url + "/ares/state")["requests"]):
            return f"decode{i}"
    return None


def other(name: str) -> str:
    return "decode1" if name == "decode0" else "decode0"


def stream_and_migrate(cluster, payload: dict, at_tokens: int) -> tuple[list[dict], dict]:
    """Stream `payload` through the router; once `at_tokens` tokens arrived, migrate it to the other decode server
    (in a thread, while the stream keeps being read). Returns the events and the migration's answer."""
    events: list[dict] = []
    answer: dict = {}
    mover = None
    for event in stream_events(cluster.router_url + "/generate", payload):
        events.append(event)
        meta = event["meta_info"]
        rid = meta["id"]
        if "source" not in answer:  # at the first token: the request surely runs for a while
            answer["source"] = wait_for(lambda r=rid: where(cluster, r), 30, "the request to show on its server")
        if mover is None and meta["completion_tokens"] >= at_tokens:

            def run(rid: str = rid, to: str = other(answer["source"])) -> None:  # noqa: B008 - evaluated once
                answer["status"], answer["record"] = migrate(cluster.router_url, rid, to)

            mover = threading.Thread(target=run)
            mover.start()
    assert mover is not None, "the request ended before it could be migrated"
    mover.join()
    return events, answer


def check_same_output(events: list[dict], ref: dict) -> None:
    last = events[-1]
    assert last["output_ids"] == ref["output_ids"]  # every token once, in order
    assert last["text"] == ref["text"]
    for key in ("id", "prompt_tokens", "completion_tokens", "finish_reason"):
        assert last["meta_info"][key] == ref["meta_info"][key], key
    counts = [e["meta_info"]["completion_tokens"] for e in events]
    assert counts == sorted(counts)  # never a step back (a repeated token)
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])  # one end: B's


def assert_idle(cluster) -> None:
    """No request and no KV held on either decode server (migration reservations included)."""

    def idle() -> bool:
        states = [get_json(u + "/ares/state") for u in cluster.decode_urls]
        return all(s["used_tokens"] == 0 and not s["requests"] for s in states)

    wait_for(idle, 60, "both decode servers to hold no KV")


@pytest.fixture(scope="module")
def prompt():
    return list(range(300, 360))


def test_streaming_request_moves_mid_stream_and_the_client_sees_one_unchanged_stream(cluster, prompt):
    ref = generate(cluster.router_url, body(prompt, 120))
    events, answer = stream_and_migrate(cluster, {**body(prompt, 120), "rid": "mig-stream"}, at_tokens=12)
    assert answer["status"] == 200, answer
    rec = answer["record"]
    assert rec["state"] == "committed" and rec["source"] == answer["source"] and rec["target"] == other(rec["source"])
    assert rec["stages"] >= 2 and rec["bytes"] > 0 and rec["kv_tokens"] == len(prompt) + rec["n_output"] - 1
    ref["meta_info"]["id"] = events[-1]["meta_info"]["id"]  # a different request of the same prompt
    check_same_output(events, ref)
    assert rec["n_output"] < 120  # B produced the rest
    assert_idle(cluster)
    migrations = get_json(cluster.router_url + "/ares/migrations")["migrations"]
    assert migrations[-1]["mid"] == rec["mid"]
    metrics = request(cluster.router_url + "/metrics")[2].decode()
    series = f'ares_migrations_total{{dst="{rec["target"]}",outcome="committed",src="{rec["source"]}"}}'
    assert series in metrics


def test_non_streaming_request_moves_and_the_answer_is_assembled(cluster, prompt):
    ref = generate(cluster.router_url, body(prompt, 100))
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(generate, cluster.router_url, {**body(prompt, 100), "rid": "mig-answer"})

        source = wait_for(lambda: running(cluster, 8), 60, "the request to run on a decode server")
        status, rec = migrate(cluster.router_url, "mig-answer", other(source))
        out = fut.result()
    assert status == 200 and rec["state"] == "committed", rec
    assert out["output_ids"] == ref["output_ids"] and out["text"] == ref["text"]
    assert out["meta_info"]["completion_tokens"] == 100 and out["meta_info"]["finish_reason"]["type"] == "length"
    assert_idle(cluster)


def test_move_at_the_first_decode_step(cluster, prompt):
    ref = generate(cluster.router_url, body(prompt, 60))
    events, answer = stream_and_migrate(cluster, body(prompt, 60), at_tokens=1)
    assert answer["status"] == 200 and answer["record"]["state"] == "committed", answer
    ref["meta_info"]["id"] = events[-1]["meta_info"]["id"]
    check_same_output(events, ref)
    assert_idle(cluster)


def test_a_request_that_finishes_during_the_move_completes_normally(cluster, prompt):
    """Asked to move a few tokens before `max_new_tokens`: either the move commits in time or the request ends on
    its source first and the migration is refused/abandoned; the client's output is complete either way."""
    ref = generate(cluster.router_url, body(prompt, 40))
    events, answer = stream_and_migrate(cluster, body(prompt, 40), at_tokens=37)
    rec = answer["record"]
    assert rec["state"] in ("committed", "failed"), answer
    if rec["state"] == "failed":
        assert answer["status"] == 409 and any(w in rec["reason"] for w in ("finished", "not_running")), rec
    ref["meta_info"]["id"] = events[-1]["meta_info"]["id"]
    check_same_output(events, ref)
    assert_idle(cluster)


def test_bad_migration_requests_get_clear_errors(cluster, prompt):
    assert request(cluster.router_url + "/ares/migrate", b"not json")[0] == 400
    status, _, raw = request(cluster.router_url + "/ares/migrate", {"rid": "nobody", "to": "decode1"})
    assert status == 404 and b"nobody" in raw
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(generate, cluster.router_url, {**body(prompt, 80), "rid": "mig-bad"})
        source = wait_for(lambda: running(cluster), 60, "the request to run")
        status, _, raw = request(cluster.router_url + "/ares/migrate", {"rid": "mig-bad", "to": "decode7"})
        assert status == 400 and b"decode7" in raw
        status, _, raw = request(cluster.router_url + "/ares/migrate", {"rid": "mig-bad", "to": source})
        assert status == 409 and b"already runs" in raw
        out = fut.result()
    assert out["meta_info"]["completion_tokens"] == 80
    assert_idle(cluster)


def test_rebalancer_moves_load_off_the_busier_server(cluster, tmp_path):
    """Round robin puts the long requests on one server and the short ones on the other; once the short ones are
    done, rebalancing by current load (`current_migrate`'s plan) moves long ones across. Outputs stay exact."""
    prefill = [(p["url"], p["bootstrap_port"]) for p in cluster.state()["processes"] if p["role"] == "prefill"]
    long_prompts = [list(range(1000 + 300 * i, 1000 + 300 * i + 250)) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        refs = list(pool.map(lambda p: generate(cluster.router_url, body(p, 160)), long_prompts))
    with ares_router(
        tmp_path, prefill, cluster.decode_urls, "round_robin",
        "--ares-rebalance", "on", "--ares-rebalance-policy", "current_migrate", "--ares-rebalance-interval", "0.5",
        "--ares-migrate-confirm-rounds", "1",
    ) as r, ThreadPoolExecutor(12) as pool:  # fmt: skip
        futures = []
        for payload in (x for p in long_prompts for x in (body(p, 160), body([5, 6, 7], 4))):
            futures.append(pool.submit(generate, r.url, payload))
            n = len(futures)  # one at a time, so that round robin alternates long (decode0) and short (decode1)
            wait_for(lambda n=n: get_json(r.url + "/ares/cluster")["dispatch_count"] >= n, 60, "the dispatch")
        outs = [f.result() for f in futures]
        migrations = get_json(r.url + "/ares/migrations")["migrations"]
    committed = [m for m in migrations if m["state"] == "committed"]
    assert committed, migrations
    assert all(m["source"] == "decode0" and m["target"] == "decode1" for m in committed), committed
    longs = outs[0::2]
    assert {o["decode"] for o in longs} == {"decode0"} and {o["decode"] for o in outs[1::2]} == {"decode1"}
    assert [o["output_ids"] for o in longs] == [ref["output_ids"] for ref in refs]  # moved or not, exact
    moved = {m["rid"] for m in committed}
    assert moved <= {o["meta_info"]["id"] for o in longs}
    assert_idle(cluster)


def test_client_gone_mid_migration_leaves_nothing_on_either_server(cluster, prompt, tmp_path):
    """The client hangs up while its request is being copied to B: the router aborts it on both servers, the agents
    free what they hold (B's reservation, A's request), the migration ends as failed."""
    prefill = [(p["url"], p["bootstrap_port"]) for p in cluster.state()["processes"] if p["role"] == "prefill"]
    slow = ("--ares-migrate-stage-delay", "2", "--ares-migrate-last-stage-tokens", "1")
    with ares_router(tmp_path, prefill, cluster.decode_urls, "round_robin", *slow) as r:
        payload = json.dumps({**body(prompt, 400), "stream": True}).encode()
        req = urllib.request.Request(r.url + "/generate", data=payload, headers={"Content-Type": "application/json"})
        resp = urllib.request.urlopen(req, timeout=120)
        first = json.loads(resp.readline().removeprefix(b"data:"))  # the first event
        rid = first["meta_info"]["id"]
        source = wait_for(lambda: where(cluster, rid), 30, "the request to run")
        target_url = cluster.decode_urls[int(other(source)[-1])]
        answer: dict = {}
        mover = threading.Thread(target=lambda: answer.update(record=migrate(r.url, rid, other(source))[1]))
        mover.start()
        wait_for(lambda: "reserved" in _incoming(target_url).values(), 60, "the target to reserve", interval=0.02)
        resp.close()  # the client goes away mid-migration
        mover.join()
        assert answer["record"]["state"] == "failed", answer
    assert_idle(cluster)
    assert not {"attached", "reserved"} & set(_incoming(target_url).values())


def _incoming(url: str) -> dict:
    status, _, raw = request(url + "/ares/migrate/cmd", {"cmd": "status"}, timeout=30)
    assert status == 200, raw
    return json.loads(raw)["incoming"]


def test_target_killed_during_the_transfer_leaves_the_request_running_on_its_source(cluster, prompt, tmp_path):
    """Last in the module (it kills a server): B dies while A's KV is being copied; the move fails, the request
    never stopped on A, and the client gets the complete, unchanged output. A router of its own waits 2 s between
    pre-copy stages, so the kill surely lands before the commit."""
    ref = generate(cluster.router_url, body(prompt, 150))
    prefill = [(p["url"], p["bootstrap_port"]) for p in cluster.state()["processes"] if p["role"] == "prefill"]
    slow = ("--ares-migrate-stage-delay", "2", "--ares-migrate-last-stage-tokens", "1")
    with ares_router(tmp_path, prefill, cluster.decode_urls, "round_robin", *slow) as r:
        events, answer, killed = _move_and_kill_target(cluster, r.url, body(prompt, 150))
    assert killed, "the target was never seen reserving"
    rec = answer["record"]
    # B dies mid-read (its answer: the transfer failed) or before the next command (unreachable).
    assert answer["status"] == 409 and rec["state"] == "failed", rec
    assert any(w in rec["reason"] for w in ("unreachable", "transfer_failed")), rec
    ref["meta_info"]["id"] = events[-1]["meta_info"]["id"]
    check_same_output(events, ref)
    source_url = cluster.decode_urls[int(answer["source"][-1])]
    wait_for(lambda: get_json(source_url + "/ares/state")["used_tokens"] == 0, 60, "the source to free the KV")


def _move_and_kill_target(cluster, router: str, payload: dict) -> tuple[list[dict], dict, dict]:
    events: list[dict] = []
    answer: dict = {}
    killed: dict = {}

    def kill_target_once_reserved(source: str) -> None:
        target = other(source)
        url = cluster.decode_urls[int(target[-1])]

        wait_for(lambda: "reserved" in _incoming(url).values(), 60, "the target to reserve", interval=0.02)
        os.killpg(cluster.pids[target], signal.SIGKILL)  # a process group this test module started
        killed["target"] = target

    mover = None
    for event in stream_events(router + "/generate", payload):
        events.append(event)
        meta = event["meta_info"]
        if mover is None and meta["completion_tokens"] >= 10:
            source = answer["source"] = wait_for(lambda r=meta["id"]: where(cluster, r), 30, "the request to run")
            threading.Thread(target=kill_target_once_reserved, args=(source,)).start()

            def run(rid: str = meta["id"], to: str = other(source)) -> None:  # noqa: B008 - evaluated once
                answer["status"], answer["record"] = migrate(router, rid, to)

            mover = threading.Thread(target=run)
            mover.start()
    assert mover is not None
    mover.join()
    return events, answer, killed
