"""Live migration when the source decode server dies mid-migration, on the suite's shared ARES servers (this
module reuses `test_migration_e2e`'s fixtures). It kills a server, so it runs after every other test
(`kills_a_server`), with the live pair the first kill test left.
"""

from __future__ import annotations

import pytest
from conftest import router_over
from http_helpers import get_json, request, wait_for
from test_migration_e2e import _incoming, _move_and_fault, body, cluster, prompt  # noqa: F401 - fixtures

from ares.cluster.launcher import http_ok


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
