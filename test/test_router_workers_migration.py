"""A migration through a 2-worker router (`--workers 2`): the move is asked of one worker, decided by the brain and
carried out by the other worker, the one relaying the stream; the client sees the unmigrated run's exact answer.

The servers are the suite's shared ARES servers (`conftest.ares_servers`: SmolLM2, 1 prefill + 3 `--ares` decode
servers); the module fixture `cluster` and the helpers are `test_migration_e2e.py`'s, imported (no cluster of its
own: this module's router runs in front of the same servers).
"""

from __future__ import annotations

import http.client
import json
import threading
from urllib.parse import urlsplit

from conftest import router_over
from http_helpers import get_json, request, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_migration_e2e import (  # noqa: F401 - `cluster` is the module's fixture
    assert_idle,
    body,
    check_same_output,
    cluster,
    generate,
    other,
    where,
)

from ares_router.workers import WORKER_HEADER


def _connection(url: str, not_worker: str | None = None) -> tuple[http.client.HTTPConnection, str]:
    """A keep-alive connection to the router and the worker that accepted it; with `not_worker`, one accepted by
    another worker (new connections land on a worker by the kernel's hash: a few tries find one)."""
    u = urlsplit(url)
    for _ in range(64):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        worker = resp.getheader(WORKER_HEADER)
        if worker is not None and worker != not_worker:
            return conn, worker
        conn.close()
    raise AssertionError(f"no connection reached a worker other than {not_worker}")


def test_a_stream_relayed_by_one_worker_moves_on_an_admin_call_to_the_other(cluster, tmp_path):  # noqa: F811
    prompt = list(range(300, 360))
    slow = ("--ares-migrate-stage-delay", "0.2", "--ares-migrate-last-stage-tokens", "4")
    pair = cluster.decode_urls[:2]
    with router_over(tmp_path, cluster.servers, pair, "round_robin", "--workers", "2", *slow) as r:
        ref = generate(r.url, body(prompt, 120))
        stream_conn, stream_worker = _connection(r.url)
        admin_conn, admin_worker = _connection(r.url, not_worker=stream_worker)
        assert admin_worker != stream_worker
        stream_conn.request(
            "POST", "/generate", json.dumps({**body(prompt, 120), "stream": True}), {"Content-Type": "application/json"}
        )
        resp = stream_conn.getresponse()
        assert resp.status == 200 and resp.getheader(WORKER_HEADER) == stream_worker
        events: list[dict] = []
        answer: dict = {}
        mover = None
        for line in resp:
            if not line.startswith(b"data:") or b"[DONE]" in line:
                continue
            events.append(json.loads(line[5:]))
            rid, tokens = events[-1]["meta_info"]["id"], events[-1]["meta_info"]["completion_tokens"]
            if mover is None and tokens >= 10:
                source = wait_for(lambda r=rid: where(cluster, r), 30, "the request to show on its server")

                def run(rid: str = rid, source: str = source) -> None:
                    admin_conn.request("POST", "/ares/migrate", json.dumps({"rid": rid, "to": other(source)}))
                    got = admin_conn.getresponse()
                    answer.update(status=got.status, worker=got.getheader(WORKER_HEADER), source=source)
                    answer["record"] = json.loads(got.read())

                mover = threading.Thread(target=run)
                mover.start()
        assert mover is not None, "the request ended before it could be migrated"
        mover.join()
        stream_conn.close()
        admin_conn.close()
        rec = answer["record"]
        assert answer["status"] == 200 and rec["state"] == "committed", answer
        assert answer["worker"] == admin_worker  # asked of one worker ...
        assert rec["worker"] == int(stream_worker)  # ... carried out by the one relaying the stream
        assert rec["source"] == answer["source"] and rec["target"] == other(answer["source"]) and rec["n_output"] < 120
        ref["meta_info"]["id"] = events[-1]["meta_info"]["id"]
        check_same_output(events, ref)  # every token once, in order, B's end
        assert get_json(r.url + "/ares/migrations")["migrations"][-1]["mid"] == rec["mid"]
        metrics = request(r.url + "/metrics")[2].decode()
        committed = [
            s.value
            for fam in text_string_to_metric_families(metrics)
            for s in fam.samples
            if s.name == "ares_migrations_total" and s.labels.get("outcome") == "committed"
        ]
        assert sum(committed) == 1  # counted by the worker that moved it, shown by the brain
        wait_for(lambda: get_json(r.url + "/ares/cluster")["inflight"] == 0, 60, "the brain to see the request end")
    assert_idle(cluster)
