"""Defragmenting moves (`ares_router.policy.Defragmenter`, `plan_rebalance(..., held=...)`) on plain data: a cluster
with room for a request in total but on no single instance (SGLang's rule: reserve 100 tokens per active request,
pools of 2,000 tokens).

- A: requests of 600 and 500 KV tokens (100 generated each, max_tokens 600): allocatable 700.
- B: 700 and 600: allocatable 500.
- C: one of 1,200 (max_tokens 200): allocatable 700.

The new request (prompt 700, max_tokens 100) needs 800: nobody admits it. Moving A's 500 to C (which admits it:
600 <= 700) leaves A 900 allocatable; moving B's 600 to A leaves B 800; the first moves fewer KV bytes.
"""

from __future__ import annotations

import numpy as np
import pytest

from ares_router.policy import (
    Admission,
    Defragmenter,
    InstanceState,
    NewRequest,
    Policy,
    build_snapshot,
    get_policy,
    plan_rebalance,
)

ADM = Admission(reserve_tokens=100)
NEW = NewRequest("new", 700, predicted_output=100.0, max_new_tokens=100)


def _inst(name: str, lengths, max_new, remaining=None) -> InstanceState:
    lengths = np.array(lengths, dtype=float)
    n = lengths.size
    rem = np.full(n, 1000.0) if remaining is None else np.array(remaining, dtype=float)
    return InstanceState(
        name, 2000, int(lengths.sum()), request_ids=tuple(f"{name}{k}" for k in range(n)), lengths=lengths,
        generated=np.full(n, 100.0), predicted_remaining=rem, max_new_tokens=np.array(max_new, dtype=float),
    )  # fmt: skip


def _cluster(a_remaining=None, c_lengths=(1200,)):
    return build_snapshot(
        [
            _inst("a", [600, 500], [600, 600], a_remaining),
            _inst("b", [700, 600], [600, 600]),
            _inst("c", list(c_lengths), [200] * len(c_lengths)),
        ],
        admission=ADM,
    )


def _after(snapshot, moves):
    """The snapshot after the moves: rows taken off their sources and put on their targets as SGLang would see
    them (their KV, their generated tokens, their max_tokens)."""
    states = list(snapshot.instances)
    for m in moves:
        src, dst = states[m.source], states[m.target]
        k = list(src.request_ids).index(m.request_id)
        keep = np.arange(src.lengths.size) != k

        def take(col, src=src, keep=keep):
            return getattr(src, col)[keep]

        cols = ("lengths", "generated", "predicted_remaining", "predicted_upper", "max_new_tokens")
        states[m.target] = InstanceState(
            dst.instance_id, dst.capacity_tokens, int(dst.used_tokens + src.lengths[k]),
            request_ids=(*dst.request_ids, m.request_id), admission=dst.admission,
            **{c: np.append(getattr(dst, c), getattr(src, c)[k]) for c in cols},
        )  # fmt: skip
        states[m.source] = InstanceState(
            src.instance_id, src.capacity_tokens, int(src.used_tokens - src.lengths[k]),
            request_ids=tuple(r for r, ok in zip(src.request_ids, keep, strict=True) if ok), admission=src.admission,
            **{c: take(c) for c in cols},
        )  # fmt: skip
    return build_snapshot(states, admission=ADM)


def test_the_cluster_is_fragmented():
    snap = _cluster()
    assert not snap.admits(NEW).any()
    assert snap.allocatable().tolist() == [700, 500, 700]
    assert (snap.capacity - snap.used).sum() > NEW.prompt_tokens + 100  # room in total


def test_moves_make_one_instance_admit_it_at_the_least_link_cost():
    snap = _cluster()
    moves = Defragmenter().plan(snap, NEW)
    assert [(m.request_id, m.source, m.target, m.kv_tokens) for m in moves] == [("a1", 0, 2, 500)]
    after = _after(snap, moves)
    assert after.admits(NEW)[0]  # A admits it now; the move was one C admits (its rule on the moved request)
    assert _target_admits(snap, moves[0])


def _target_admits(snap, m) -> bool:
    from ares_router.policy.rebalance import Round

    inst = snap.instances[m.source]
    return bool(Round.start(snap).admits(m.target, m.source, np.array([list(inst.request_ids).index(m.request_id)]))[0])


def test_a_request_about_to_end_is_never_moved():
    # A's 500-token request is predicted to end in 50 tokens: its KV frees soon anyway. A's other request (600)
    # moves instead, to C.
    snap = _cluster(a_remaining=[1000, 50])
    moves = Defragmenter().plan(snap, NEW)
    assert "a1" not in [m.request_id for m in moves]
    assert moves and _after(snap, moves).admits(NEW).any()
    # nothing on A may move (both end soon): B's plan (its 600 to A) is the one left
    moves = Defragmenter().plan(_cluster(a_remaining=[10, 50]), NEW)
    assert [(m.request_id, m.source, m.target) for m in moves] == [("b1", 1, 0)]


def test_no_moves_when_one_instance_admits_it_or_no_plan_does():
    roomy = build_snapshot([_inst("a", [600], [600]), _inst("b", [700, 600], [600, 600])], admission=ADM)
    assert roomy.admits(NEW).any() and Defragmenter().plan(roomy, NEW) == []
    full = build_snapshot([_inst(x, [900, 900], [100, 100]) for x in "ab"], admission=ADM)
    assert not full.admits(NEW).any() and Defragmenter().plan(full, NEW) == []


def test_plan_rebalance_puts_the_defragmenting_moves_first_for_a_policy_that_has_them():
    snap = _cluster()
    pol = get_policy("ares_hold_defrag")
    assert pol.defragmenter is not None and pol.hold_when_full
    moves = plan_rebalance(snap, pol, NEW)
    assert moves[0].request_id == "a1"
    assert len({m.request_id for m in moves}) == len(moves)
    assert plan_rebalance(snap, pol) == plan_rebalance(snap, "ares_hold")  # nothing held: the rebalancer's moves
    assert plan_rebalance(snap, "ares_hold", NEW) == plan_rebalance(snap, "ares_hold")  # no defragmenter


@pytest.mark.parametrize("mode", ["predictive", "predictive_point"])
def test_a_predictive_source_is_judged_by_its_forecast(mode):
    # On predictive servers the view admits by the forecast (each request's KV peak over its predicted remaining
    # length); the plan's last check is that judgement (the source's state without the moved rows through
    # `build_snapshot`), so its source admits the request afterwards. A (300 + 200 tokens, 600 to go each): peak
    # 1,700 now, 2,300 with the new one (prompt 600, 400 to go); without its 200-token request, 1,700.
    def state(x: str, lengths: list[int], remaining: float) -> InstanceState:
        n = len(lengths)
        return InstanceState(
            x, 2000, sum(lengths), request_ids=tuple(f"{x}{k}" for k in range(n)), lengths=np.array(lengths, float),
            generated=np.full(n, 100.0), predicted_remaining=np.full(n, remaining), max_new_tokens=np.full(n, 700.0),
            admission=mode,
        )  # fmt: skip

    snap = build_snapshot(
        [state("a", [300, 200], 600), state("b", [600, 400], 600), state("c", [800], 600)], admission=ADM
    )
    big = NewRequest("new", 600, predicted_output=400.0, max_new_tokens=400)
    assert not snap.admits(big).any()
    moves = Defragmenter().plan(snap, big)
    assert [(m.request_id, m.source, m.target) for m in moves] == [("a1", 0, 2)]
    assert _after(snap, moves).admits(big)[0]


def test_the_policy_is_a_router_policy():
    from ares_router.config import ROUTER_POLICIES

    assert "ares_hold_defrag" in ROUTER_POLICIES and isinstance(get_policy("ares_hold_defrag"), Policy)
