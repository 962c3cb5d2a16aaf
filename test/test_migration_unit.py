"""Unit tests of migration's pure parts: which pages a stage moves, the Mooncake read list, the stream splice."""

from __future__ import annotations

import pytest

from ares.migration.pages import page_pairs, page_runs, read_batch, stage_end
from ares_router.migration import Migration, Splicer
from ares_router.policy import Migration as PolicyMigration
from ares_router.rebalancer import RebalanceGate, RebalanceLimits


def test_stage_sends_complete_pages_only():
    assert stage_end(0, 37, 16) == 32  # the page being written (positions 32..36) waits
    assert stage_end(32, 37, 16) == 32  # nothing complete since: an empty stage
    assert stage_end(0, 37, 1) == 37  # page size 1: every written position


def test_pages_pair_by_position_and_merge_into_runs():
    # page size 2: A's positions 0..5 live in slots 10,11 | 4,5 | 6,7; B's in 20,21 | 22,23 | 30,31.
    src, dst = [10, 11, 4, 5, 6, 7], [20, 21, 22, 23, 30, 31]
    pairs = page_pairs(src, dst, 2)
    assert pairs == [(5, 10), (2, 11), (3, 15)]
    assert page_runs(pairs) == [(5, 10, 1), (2, 11, 1), (3, 15, 1)]
    assert page_runs([(2, 7), (3, 8), (4, 9), (9, 1)]) == [(2, 7, 3), (9, 1, 1)]
    with pytest.raises(ValueError, match="3 source slots for 2"):
        page_pairs([1, 2, 3], [1, 2], 1)


def test_read_batch_covers_every_buffer_and_run():
    local, peer, lengths = read_batch(
        [(2, 7, 3), (9, 1, 1)], src_ptrs=[1000, 5000], dst_ptrs=[100, 900], item_lens=[8, 4]
    )
    assert local == [100 + 7 * 8, 100 + 1 * 8, 900 + 7 * 4, 900 + 1 * 4]
    assert peer == [1000 + 2 * 8, 1000 + 9 * 8, 5000 + 2 * 4, 5000 + 9 * 4]
    assert lengths == [24, 8, 12, 4]
    with pytest.raises(ValueError, match="buffer lists differ"):
        read_batch([], [1], [1, 2], [1])


def test_splicer_continues_b_after_a():
    a_end = {
        "text": "Hello wor",
        "output_ids": [1, 2, 3],
        "meta_info": {
            "id": "r",
            "completion_tokens": 3,
            "finish_reason": {"type": "abort", "message": "ares_migrated:m"},
        },
    }
    assert Splicer.migrated(a_end)
    assert not Splicer.migrated({"meta_info": {"finish_reason": {"type": "abort", "message": "Aborted"}}})
    assert not Splicer.migrated({"meta_info": {"finish_reason": None}})
    s = Splicer()
    relayed = s.source_end(a_end)
    assert relayed["meta_info"]["finish_reason"] is None and relayed["output_ids"] == [1, 2, 3]
    assert a_end["meta_info"]["finish_reason"] is not None  # the input is not changed
    b = {
        "text": "ld!",
        "output_ids": [4, 5],
        "meta_info": {"completion_tokens": 5, "finish_reason": {"type": "length"}},
    }
    out = s.target(b)
    assert out["text"] == "Hello world!" and out["output_ids"] == [1, 2, 3, 4, 5]
    assert out["meta_info"] == b["meta_info"]


def test_migration_record_fields():
    m = Migration("m1", "r1", "decode0", "decode1", state="committed", stages=3, kv_tokens=120, bytes=4096)
    m.total_s, m.pause_s = 0.25, 0.0123
    rec = m.record()
    assert rec["total_ms"] == 250.0 and rec["pause_ms"] == 12.3 and rec["stages"] == 3 and rec["state"] == "committed"


def _m(rid: str, s: int, t: int) -> PolicyMigration:
    return PolicyMigration(rid, s, t, kv_tokens=100)


def test_gate_needs_confirmation_and_respects_limits():
    gate = RebalanceGate(RebalanceLimits(max_concurrent=2, per_instance=1, confirm_rounds=2))
    plan = [_m("a", 0, 1), _m("b", 0, 1), _m("c", 2, 3)]
    assert gate.choose(plan, ["a", "b", "c"], now=0.0) == []  # first round: not confirmed yet
    chosen = gate.choose(plan, ["a", "b", "c"], now=1.0)
    # one per instance: "b" shares source 0 and target 1 with "a"; "c" uses another pair
    assert [m.request_id for m in chosen] == ["a", "c"]
    assert gate.choose(plan, ["a", "b", "c"], now=2.0) == []  # two in flight: the limit
    gate.done(chosen[0], committed=True, now=3.0)
    assert [m.request_id for m in gate.choose(plan, ["b"], now=3.5)] == []  # pair (0, 1) needs fresh confirmation
    assert [m.request_id for m in gate.choose(plan, ["b"], now=4.0)] == ["b"]


def test_gate_stops_bouncing_and_backs_off_failed_targets():
    lim = RebalanceLimits(max_concurrent=5, confirm_rounds=1, request_cooldown_s=30, pair_cooldown_s=10)
    gate = RebalanceGate(lim)
    (m,) = gate.choose([_m("a", 0, 1)], ["a"], now=0.0)
    gate.done(m, committed=True, now=1.0)
    assert gate.choose([_m("a", 1, 0)], ["a"], now=5.0) == []  # request cooldown
    assert gate.choose([_m("z", 1, 0)], ["z"], now=5.0) == []  # pair cooldown: no move straight back
    assert [x.request_id for x in gate.choose([_m("z", 1, 0)], ["z"], now=12.0)] == ["z"]
    (f,) = gate.choose([_m("q", 2, 3)], ["q"], now=20.0)
    gate.done(f, committed=False, now=20.0)
    assert gate.choose([_m("r", 2, 3)], ["r"], now=22.0) == []  # target 3 backs off 5 s ...
    assert [x.request_id for x in gate.choose([_m("r", 2, 3)], ["r"], now=25.5)] == ["r"]
    assert gate.choose([_m("x", 4, 5)], [], now=30.0) == []  # not eligible (not relayed by this router)
    gate.done(_m("a", 1, 0), committed=True, now=40.0)
    gate.done(_m("a", 0, 1), committed=True, now=80.0)
    assert gate.choose([_m("a", 1, 0)], ["a"], now=200.0) == []  # moved max_per_request times already
