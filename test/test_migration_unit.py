"""Unit tests of migration's pure parts: which pages a stage moves, the Mooncake read list, the stream splice."""

from __future__ import annotations

import pytest

from ares.migration.pages import page_pairs, page_runs, read_batch, stage_end
from ares_router.migration import Migration, Splicer


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
