"""Unit tests of migration's pure parts: which pages a stage moves, the Mooncake read list, the stream splice."""

from __future__ import annotations

import orjson
import pytest

from ares.migration.pages import page_pairs, page_runs, read_batch, split_batches, stage_end
from ares_router.link_profile import fit_profile, get_link_profile
from ares_router.migration import Hop, InFlight, Migration
from ares_router.policy import Migration as PolicyMigration
from ares_router.policy.gate import RebalanceGate, RebalanceLimits
from ares_router.reports import parse_ares_state
from ares_router.splice import Splicer
from ares_router.state import Backend, RouterState
from ares_router.wire import not_migratable


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


def test_reads_are_split_to_fit_the_transport_queue():
    lengths = [100] * 5 + [200_000] + [100] * 3  # 200 kB: 4 slices of 64 KiB
    batches = split_batches(list(range(9)), list(range(9)), lengths, max_slices=4, slice_bytes=65536)
    assert [b[0] for b in batches] == [[0, 1, 2, 3], [4], [5], [6, 7, 8]]
    assert [n for b in batches for n in b[2]] == lengths  # every entry once, in order
    assert split_batches([], [], []) == []


def _gen(text: str, ids: list[int], rid: str, tokens: int, finish: dict | None) -> dict:
    return {
        "text": text,
        "output_ids": ids,
        "meta_info": {"id": rid, "completion_tokens": tokens, "finish_reason": finish},
    }


def _moved(mid: str) -> dict:
    return {"type": "abort", "message": f"ares_migrated:{mid}"}


def test_generate_splice_follows_every_hop():
    """A -> B -> C: each hop's cumulative text and ids come after those of every hop before, under A's id; the
    internal end messages never reach the client; the counts and finish are the last server's."""
    s = Splicer.for_endpoint("/generate")
    a1 = _gen("Hel", [1], "ra", 1, None)
    assert not s.ends_hop(a1) and s.event(a1, b"raw") == b"raw"  # hop 0 passes as received
    a_end = _gen("Hello wo", [1, 2, 3], "ra", 3, _moved("m1"))
    assert s.ends_hop(a_end) and s.migration_id(a_end) == "m1" and s.is_internal(a_end)
    assert not s.ends_hop(_gen("", [], "ra", 3, {"type": "abort", "message": "Aborted"}))
    relayed = orjson.loads(s.end_hop(a_end))
    assert relayed["meta_info"]["finish_reason"] is None and relayed["output_ids"] == [1, 2, 3]
    assert a_end["meta_info"]["finish_reason"] is not None  # the input is not changed
    assert s.hop == 1
    b1 = orjson.loads(s.event(_gen('rld "q"\n', [4], "rb", 4, None), b""))
    assert b1 == _gen('Hello world "q"\n', [1, 2, 3, 4], "ra", 4, None)  # escaped text spliced as JSON
    b_end = _gen('rld "q"\n!', [4, 5], "rb", 5, _moved("m2"))
    assert s.migration_id(b_end) == "m2"
    assert orjson.loads(s.end_hop(b_end))["text"] == 'Hello world "q"\n!'
    c = orjson.loads(s.event(_gen(" ok", [6], "rc", 6, {"type": "length"}), b""))
    assert c == _gen('Hello world "q"\n! ok', [1, 2, 3, 4, 5, 6], "ra", 6, {"type": "length"})
    empty = orjson.loads(s.event(_gen("", [], "rc", 5, None), b""))  # the prebuilt step's empty chunk
    assert empty["output_ids"] == [1, 2, 3, 4, 5] and empty["text"] == 'Hello world "q"\n!'


def test_generate_answers_are_joined_across_every_hop():
    parts = [
        _gen("Hel", [1], "ra", 1, _moved("m1")),
        _gen("lo ", [2], "rb", 2, _moved("m2")),
        _gen("you", [3], "rc", 3, {"type": "length"}),
    ]
    out = Splicer.for_endpoint("/generate").answer(parts)
    assert out == _gen("Hello you", [1, 2, 3], "ra", 3, {"type": "length"})


def _chat_chunk(
    delta: dict, finish: str | None = None, created: int = 100, usage: dict | None = None, rid: str = "r"
) -> dict:
    return {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": usage,
    }  # fmt: skip


def test_chat_stream_splice_drops_each_hop_end_and_later_role_chunks():
    s = Splicer.for_endpoint("/v1/chat/completions")
    a_finish = _chat_chunk({}, "abort")
    assert s.ends_hop(a_finish) and s.migration_id(a_finish) is None and not s.is_internal(a_finish)
    assert not s.ends_hop(_chat_chunk({"content": "x"}))
    assert s.end_hop(a_finish) is None and s.hop == 1  # nothing of it reaches the client
    assert s.event(_chat_chunk({"role": "assistant", "content": ""}, created=200, rid="b"), b"") is None
    b = orjson.loads(s.event(_chat_chunk({"content": " world"}, created=200, rid="b"), b""))
    assert b["choices"][0]["delta"] == {"content": " world"} and (b["created"], b["id"]) == (100, "r")
    b_last = orjson.loads(s.end_hop(_chat_chunk({"content": "!"}, "abort", created=200, rid="b")))
    assert b_last["choices"][0] == {"index": 0, "delta": {"content": "!"}, "finish_reason": None}
    assert s.event(_chat_chunk({"role": "assistant"}, created=300, rid="c"), b"") is None
    c_end = orjson.loads(s.event(_chat_chunk({}, "length", created=300, usage={"completion_tokens": 9}, rid="c"), b""))
    assert c_end["choices"][0]["finish_reason"] == "length" and c_end["usage"] == {"completion_tokens": 9}
    assert (c_end["id"], c_end["created"]) == ("r", 100)


def test_chat_and_completion_answers_are_joined():
    chat = Splicer.for_endpoint("/v1/chat/completions")
    a_choice = {"message": {"role": "assistant", "content": "Hel"}, "finish_reason": "abort"}
    a = {"id": "r", "created": 1, "choices": [a_choice]}
    b = {
        "id": "s",
        "created": 2,
        "choices": [{"message": {"role": "assistant", "content": "lo"}, "finish_reason": "abort"}],
    }
    c = {
        "id": "t", "created": 3, "usage": {"completion_tokens": 5},
        "choices": [{"message": {"role": "assistant", "content": " you"}, "finish_reason": "stop"}],
    }  # fmt: skip
    assert chat.ends_hop(a)
    out = chat.answer([a, b, c])
    assert out["choices"][0]["message"]["content"] == "Hello you" and out["choices"][0]["finish_reason"] == "stop"
    assert (out["id"], out["created"]) == ("r", 1) and out["usage"] == {"completion_tokens": 5}
    comp = Splicer.for_endpoint("/v1/completions")
    a_ev = {"id": "r", "created": 1, "choices": [{"index": 0, "text": "lo", "finish_reason": "abort"}]}
    relayed = orjson.loads(comp.end_hop(a_ev))  # the last token's text stays, its finish goes
    assert relayed["choices"][0] == {"index": 0, "text": "lo", "finish_reason": None, "matched_stop": None}
    ca = {"id": "r", "created": 1, "choices": [{"text": "Hel", "finish_reason": "abort"}]}
    cb = {"id": "x", "created": 3, "choices": [{"text": "lo", "finish_reason": "length"}]}
    joined = Splicer.for_endpoint("/v1/completions").answer([ca, cb])
    assert joined["choices"][0]["text"] == "Hello" and joined["id"] == "r"


def test_inflight_finds_the_move_that_ended_each_hop():
    d0, d1, d2 = (Backend("decode", i, f"http://d{i}") for i in range(3))
    flight = InFlight.create("r0", "/generate", {}, True, Backend("prefill", 0, "http://p"), d0)
    m1 = Migration("m1", "r0", "decode0", "decode1", state="failed", from_hop=0, new_rid="x")
    m2 = Migration("m2", "r0", "decode0", "decode1", state="precopy", from_hop=0, new_rid="r1", target_backend=d1)
    flight.moves += [m1, m2]
    assert flight.pending() is m2 and flight.committed_from(0) is None
    assert flight.placements() == [("r0", d0), ("r1", d1)]  # a move in progress: both may hold it
    m2.state = "committed"
    flight.hops.append(Hop("r1", d1))
    assert flight.committed_from(0) is m2 and flight.committed_from(0, "m1") is None and flight.pending() is None
    assert (flight.decode, flight.backend_rid) == (d1, "r1")
    m3 = Migration("m3", "r0", "decode1", "decode2", state="committed", from_hop=1, new_rid="r2", target_backend=d2)
    flight.moves.append(m3)
    flight.hops.append(Hop("r2", d2))
    assert flight.committed_from(1, "m3") is m3 and flight.committed_from(0) is m2


def test_state_move_renames_the_tracked_request():
    state = RouterState.create([("http://p", 1)], ["http://d0", "http://d1"], "round_robin")
    state.start("r0", 0, 0, 10, 20)
    state.move("r0", 1, new_rid="r1")
    assert set(state.requests) == {"r1"} and state.requests["r1"].rid == "r1"
    assert "r1" in state.decodes[1].tracked and not state.decodes[0].tracked
    assert (state.decodes[0].inflight, state.decodes[1].inflight) == (0, 1)
    state.finish("r1")
    assert not state.requests and state.decodes[1].inflight == 0


def test_requests_whose_state_lives_in_the_http_handler_do_not_migrate():
    assert not_migratable("/generate", {"n": 3}) is None
    assert not_migratable("/v1/chat/completions", {"messages": []}) is None
    assert "n > 1" in not_migratable("/v1/completions", {"n": 2})
    assert "echo" in not_migratable("/v1/completions", {"echo": True})
    assert "tools" in not_migratable("/v1/chat/completions", {"tools": [{"type": "function"}]})
    assert "cannot migrate" in not_migratable("/v1/embeddings", {})


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


def test_link_profile_fit_and_policy_cost():
    # total = 0.5 s + bytes / 10 MB/s, pauses 0.1/0.2/0.3 s: the fit recovers both, the median pause is 0.2 s.
    points = ((1e6, 100), (5e6, 300), (9e6, 200))
    runs = [{"bytes": b, "total_ms": (0.5 + b / 10e6) * 1e3, "pause_ms": p} for b, p in points]
    prof = fit_profile("x", runs, "hand-made")
    assert abs(prof.bytes_per_s - 10e6) < 1 and abs(prof.setup_s - 0.5) < 1e-9 and prof.pause_s == 0.2
    cost = prof.migration_cost(kv_bytes_per_token=1000.0)
    assert abs(cost.seconds(2000) - (0.5 + 2e6 / 10e6 + 0.2)) < 1e-9  # setup + transfer + pause
    with pytest.raises(ValueError, match="two sizes"):
        fit_profile("x", runs[:1], "one point")
    assert get_link_profile("rdma-8x400g").bytes_per_s == 190e9  # Mooncake's published figure
    assert get_link_profile("cpu-loopback-measured").bytes_per_s > 0  # shipped, measured by migration_bench
    with pytest.raises(KeyError, match="known"):
        get_link_profile("carrier-pigeon")


def test_router_prices_migrations_with_the_link_and_the_reported_kv_size():
    link = get_link_profile("rdma-4x200g")
    state = RouterState.create([("http://p", 1)], ["http://d0", "http://d1"], "ares", link=link)
    load = parse_ares_state({"version": 1, "capacity_tokens": 1000, "used_tokens": 0, "requests": [],
                             "migration": {"version": 1, "reserved_tokens": 0, "in": 0, "out": 0,
                                           "kv_bytes_per_token": 23040.0}})  # fmt: skip
    assert load.kv_bytes_per_token == 23040.0
    for d in state.decodes:
        state.poll_ok(d, load)
    state.refresh()
    assert state.snapshot.migration_cost.kv_bytes_per_token == 23040.0
    assert state.snapshot.migration_cost.link_bytes_per_s == 87e9


def test_a_migrated_request_retracted_later_goes_back_to_sglang_not_to_the_agent():
    """Found by the live benchmark: a request that arrived by migration, was retracted on its new server and came
    back through the prealloc queue was attached again as a new incoming migration, got no command, and was
    aborted as idle 60 s later."""
    from types import SimpleNamespace

    from ares.migration.agent import ARRIVED_ATTR, MID_PARAM, MigrationAgent

    agent = MigrationAgent(scheduler=None)
    req = SimpleNamespace(rid="r", sampling_params=SimpleNamespace(custom_params={MID_PARAM: "m1"}))
    assert agent.attach(req) and "m1" in agent.incoming  # the migrated copy arrives: the agent holds it
    agent.incoming.clear()
    setattr(req, ARRIVED_ATTR, True)  # what the commit marks
    assert not agent.attach(req) and not agent.incoming  # back from retraction: SGLang's own path


def test_gate_backs_off_per_pair_and_reason_and_not_for_the_requests_own_failures():
    gate = RebalanceGate(RebalanceLimits(max_concurrent=5, per_instance=5, confirm_rounds=1, backoff_s=5))
    (a,) = gate.choose([_m("a", 0, 1)], ["a"], now=0.0)
    gate.done(a, committed=False, now=0.0, reason="decode0 out_slots: HTTP 409 finished")
    assert [m.request_id for m in gate.choose([_m("b", 0, 1)], ["b"], now=0.1)] == ["b"]  # the request's own end
    gate.done(_m("b", 0, 1), committed=False, now=0.1, reason="decode1 unreachable: ClientConnectorError")
    assert gate.choose([_m("c", 0, 1)], ["c"], now=1.0) == []  # the pair (0, 1) backs off ...
    assert [m.request_id for m in gate.choose([_m("d", 2, 1)], ["d"], now=1.0)] == ["d"]  # ... not target 1 for all
    gate.done(_m("d", 2, 1), committed=True, now=1.5)
    assert [m.request_id for m in gate.choose([_m("c", 0, 1)], ["c"], now=5.2)] == ["c"]
    gate.done(_m("c", 0, 1), committed=False, now=6.0, reason="decode1 unreachable: TimeoutError")
    assert gate.choose([_m("e", 0, 1)], ["e"], now=15.0) == []  # doubled: 10 s
    assert [m.request_id for m in gate.choose([_m("e", 0, 1)], ["e"], now=16.1)] == ["e"]


def test_a_stuck_migration_gives_its_slots_back_after_the_slot_timeout():
    gate = RebalanceGate(RebalanceLimits(max_concurrent=1, per_instance=1, confirm_rounds=1, slot_timeout_s=30))
    assert [m.request_id for m in gate.choose([_m("a", 0, 1)], ["a", "b"], now=0.0)] == ["a"]
    assert gate.choose([_m("b", 0, 2)], ["a", "b"], now=29.0) == []  # "a" holds the one slot and instance 0
    assert gate.choose([_m("a", 0, 1)], ["a", "b"], now=31.0) == []  # the stuck one itself is not proposed again
    assert [m.request_id for m in gate.choose([_m("b", 0, 2)], ["a", "b"], now=31.0)] == ["b"]


def test_tick_queue_cancels_an_action_the_tick_did_not_start_in_time():
    """A command whose tick never came answers 504 and is never applied late (a late commit would leave the
    request running on two servers)."""
    from ares.migration.commands import CommandError, TickQueue

    q = TickQueue()
    applied = []
    with pytest.raises(CommandError, match="tick_timeout") as err:
        q.call(lambda: applied.append("late commit"), timeout_s=0.05)
    assert err.value.status == 504
    q.run_pending()  # the scheduler's next tick
    assert applied == [] and q.empty()
    import threading

    box = {}
    t = threading.Thread(target=lambda: box.update(v=q.call(lambda: 42, timeout_s=10)))
    t.start()
    while q.empty():
        pass
    q.run_pending()
    t.join()
    assert box["v"] == 42


def test_repeated_commands_are_answered_once():
    from ares.migration.commands import Answers, CommandError, dispatch

    class Handlers:
        def __init__(self):
            self.commits = 0

        def cmd_in_commit(self, msg):
            self.commits += 1
            return {"n_output": 7}

        def cmd_in_pull(self, msg):
            raise CommandError(409, "state:aborted")

    h, answers = Handlers(), Answers()
    first = dispatch(h, answers, {"cmd": "in_commit", "mid": "m1"})
    again = dispatch(h, answers, {"cmd": "in_commit", "mid": "m1"})
    assert first == {"status": 200, "n_output": 7} and again == {**first, "repeated": True} and h.commits == 1
    assert dispatch(h, answers, {"cmd": "in_commit", "mid": "m2"})["status"] == 200 and h.commits == 2
    assert dispatch(h, answers, {"cmd": "in_pull", "mid": "m1"}) == {"status": 409, "reason": "state:aborted"}
    assert dispatch(h, answers, {"cmd": "nope"})["status"] == 400


def test_transfer_worker_fails_a_read_past_its_deadline_and_frees_only_after_it_returns():
    """The plumbing only (Mooncake's blocking read stood in by one that waits for an event; the live fault tests
    use real servers): the command fails at the deadline, the migration stays pulling, the free runs once the
    read returns."""
    import threading

    from ares.migration.commands import CommandError
    from ares.migration.transfer import TransferWorker

    release = threading.Event()

    class BlockedRead:
        def batch_transfer_sync_read(self, session, local, peer, lengths):
            release.wait(10)
            return 0

    worker = TransferWorker(threads=1, deadline_s=0.05)
    worker.claim("m1")
    with pytest.raises(CommandError, match="transfer_timeout"):
        worker.read("m1", BlockedRead(), "peer", [([1], [2], [3])])
    assert worker.pulling("m1")
    freed = threading.Event()
    worker.when_idle("m1", freed.set)
    assert not freed.is_set()
    release.set()
    assert freed.wait(5) and not worker.pulling("m1")
    worker.when_idle("m1", lambda: freed.clear())  # idle: runs at once
    assert not freed.is_set()


def test_a_rebalancing_move_of_a_request_an_operator_moved_meanwhile_does_not_start():
    """The rebalance round chose a request and started a task for it; before the task ran, `/ares/migrate` started a
    move of the same request: the round's move must not run beside it (two moves from one hop), and the gate hears
    it ended with the request's reason (no back-off of the pair)."""
    import asyncio
    import types

    from ares_router.migration_control import MigrationControl

    d0, d1 = Backend("decode", 0, "http://d0"), Backend("decode", 1, "http://d1")
    flight = InFlight.create("r" * 32, "/generate", {}, True, Backend("prefill", 0, "http://p", 8998), d0)
    flight.moves.append(Migration("m-operator", flight.rid, "decode0", "decode1"))  # the operator's move, under way
    gate = RebalanceGate(RebalanceLimits(confirm_rounds=1))
    pm = _m(flight.rid, 0, 1)
    assert gate.choose([pm], [flight.rid], now=0.0) == [pm]
    started: list = []

    async def migrate(flight: InFlight, target: Backend) -> None:
        started.append(target)

    fake = types.SimpleNamespace(gate=gate, _migrate=migrate)
    asyncio.run(MigrationControl._rebalance_one(fake, pm, flight, d1))  # type: ignore[arg-type]
    assert not started and not gate.in_flight and not gate.backoff
