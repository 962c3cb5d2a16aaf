"""Which KV bytes a migration stage moves (pure; no SGLang, no Mooncake).

A request's KV lives in token slots listed, in position order, in its `req_to_token` row; a slot belongs to page
`slot // page_size`, and SGLang registers each KV buffer (K and V of every layer) with Mooncake as one region whose
item `i` is one page of `item_len` bytes. Moving positions `[start, end)` from A to B is therefore a list of
(A page, B page) pairs, merged into runs of consecutive pages on both sides so one read covers many pages.
"""

from __future__ import annotations

from collections.abc import Sequence


def stage_end(sent: int, written: int, page_size: int) -> int:
    """End of a pre-copy stage that starts at `sent` with `written` positions of KV on A: complete pages only (the
    page being written is sent later); `sent` itself when there is no complete page to send."""
    return max(sent, written // page_size * page_size)


def page_pairs(src_slots: Sequence[int], dst_slots: Sequence[int], page_size: int) -> list[tuple[int, int]]:
    """(source page, destination page) for the positions whose slots are given (same positions on both sides),
    each page once, in position order."""
    if len(src_slots) != len(dst_slots):
        raise ValueError(f"{len(src_slots)} source slots for {len(dst_slots)} destination slots")
    pairs: list[tuple[int, int]] = []
    for s, d in zip(src_slots, dst_slots, strict=True):
        pair = (int(s) // page_size, int(d) // page_size)
        if not pairs or pairs[-1] != pair:
            pairs.append(pair)
    return pairs


def page_runs(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Runs `(source page, destination page, pages)` of pairs consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in pairs:
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def read_batch(
    runs: Sequence[tuple[int, int, int]],
    src_ptrs: Sequence[int],
    dst_ptrs: Sequence[int],
    item_lens: Sequence[int],
) -> tuple[list[int], list[int], list[int]]:
    """Mooncake batch-read arguments `(local addresses, peer addresses, lengths)`: every run in every registered
    buffer (both servers register the same buffers with the same item lengths)."""
    if not len(src_ptrs) == len(dst_ptrs) == len(item_lens):
        raise ValueError(f"buffer lists differ: {len(src_ptrs)} source, {len(dst_ptrs)} destination, {len(item_lens)}")
    local, peer, lengths = [], [], []
    for src, dst, item in zip(src_ptrs, dst_ptrs, item_lens, strict=True):
        for s, d, n in runs:
            local.append(dst + d * item)
            peer.append(src + s * item)
            lengths.append(n * item)
    return local, peer, lengths


# Mooncake's TCP transport queues at most 1024 transfer slices (64 KiB each) per peer and fails a batch outright
# when the queue is full (`tcp_transport.cpp`: max_queued_transfers_per_peer, slice_size); fragmented KV (many short
# runs across 2 x layers buffers) easily passes that, so reads go in batches of at most half of it.
MAX_BATCH_SLICES = 512
SLICE_BYTES = 64 * 1024


def split_batches(
    local: Sequence[int],
    peer: Sequence[int],
    lengths: Sequence[int],
    max_slices: int = MAX_BATCH_SLICES,
    slice_bytes: int = SLICE_BYTES,
) -> list[tuple[list[int], list[int], list[int]]]:
    """Consecutive groups of read entries, each at most `max_slices` transport slices (an entry larger than that
    goes alone)."""
    out: list[tuple[list[int], list[int], list[int]]] = []
    cur: tuple[list[int], list[int], list[int]] = ([], [], [])
    slices = 0
    for a, b, n in zip(local, peer, lengths, strict=True):
        k = max(1, -(-n // slice_bytes))
        if cur[0] and slices + k > max_slices:
            out.append(cur)
            cur, slices = ([], [], []), 0
        cur[0].append(a)
        cur[1].append(b)
        cur[2].append(n)
        slices += k
    if cur[0]:
        out.append(cur)
    return out
