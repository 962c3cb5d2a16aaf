"""Collection loop on the tiny random model: continuous batching = plain greedy, captured states = teacher forcing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ares.predictor.collect import CollectConfig, SlotGreedy, collect
from ares.predictor.features import teacher_forced_states
from ares.predictor.generations import read_generations
from ares.predictor.hidden_store import read_state_shards
from ares.predictor.loops import repeating_tail


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM

    from ares.models import prepare_model

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(prepare_model("tiny"), dtype=torch.float32).eval()


def test_continuous_batching_matches_greedy_and_teacher_forcing(tiny):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 5000, size=int(n)).tolist() for n in (5, 17, 9, 30, 3)]
    # A small EOS id that the random model does emit, so rows finish at different steps and slots are refilled.
    eos = 7
    gen = SlotGreedy(tiny, eos_id=eos, max_new_tokens=12, batch_size=2, max_prompt_tokens=32)
    results = {k: (out, finish, row) for k, out, finish, row in gen.run(list(enumerate(prompts)))}
    assert sorted(results) == list(range(len(prompts)))
    mid = gen.mid_layer
    for k, p in enumerate(prompts):
        out, finish, row = results[k]
        ref = tiny.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)[
            0, len(p) :
        ].tolist()
        assert out == ref[: len(out)]
        assert finish == ("eos" if out[-1] == eos else "length")
        tf = teacher_forced_states(tiny, p, out, mid)
        captured = torch.stack(row.final).float().numpy()
        assert captured.shape == tf["final_norm"].shape
        np.testing.assert_allclose(captured, tf["final_norm"].astype(np.float32), atol=2e-2, rtol=2e-2)
        captured_mid = torch.stack(row.mid).float().numpy()
        np.testing.assert_allclose(captured_mid, tf[f"layer_{mid}"].astype(np.float32), atol=2e-2, rtol=2e-2)


def test_collect_is_resumable(tmp_path, monkeypatch, tiny):
    out, states = tmp_path / "g.jsonl.gz", tmp_path / "states"
    cfg = CollectConfig(
        model="tiny",
        out=out,
        states_dir=states,
        limit=3,
        max_new_tokens=4,
        batch_size=2,
        sources=("gsm8k",),
        flush_every=1,
    )
    assert collect(cfg) == 3
    first = read_generations(out)
    cfg.limit = 5
    assert collect(cfg) == 5  # only the 2 new prompts are generated
    gens = read_generations(out)
    assert [g.id for g in gens[:3]] == [g.id for g in first]
    assert len({g.id for g in gens}) == 5
    st = read_state_shards(states)
    assert all(st[g.id]["final_norm"].shape == (len(g.response), 64) for g in gens)
    assert all(g.max_new_tokens == 4 and g.finish in ("eos", "length") for g in gens)


def test_repeating_tail_finds_greedy_loops_only():
    assert repeating_tail([5, 1, 2, 3] * 10, span=24)  # period 4 ...
    assert repeating_tail([9] * 30, span=24)  # ... and 1
    assert not repeating_tail([9] * 20, span=24)  # too short to tell
    assert not repeating_tail(list(range(40)), span=24)
    assert not repeating_tail(list(range(30)) * 2, span=24, max_period=20)  # period 30 is beyond max_period
    almost = [1, 2, 3] * 10
    almost[-5] = 4
    assert not repeating_tail(almost, span=24)


def test_loop_stop_cuts_repetition_and_nothing_else():
    """SmolLM2 on three collected prompts: two fall into a greedy loop early, one ends with EOS."""
    from transformers import AutoModelForCausalLM

    from ares.models import prepare_model
    from ares.predictor.generations import read_generations

    model = AutoModelForCausalLM.from_pretrained(prepare_model("smollm2"), dtype=torch.float32).eval()
    by_id = {g.id: g for g in read_generations()}
    prompts = [(i, by_id[i].prompt) for i in ("alpaca_eval:642", "sharegpt:uEDRWak", "sharegpt:J6hOJZz")]
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    plain = SlotGreedy(model, eos_id=eos, max_new_tokens=112, batch_size=2, max_prompt_tokens=64)
    full = {k: (out, finish) for k, out, finish, _ in plain.run(prompts)}
    gen = SlotGreedy(model, eos_id=eos, max_new_tokens=112, batch_size=2, max_prompt_tokens=64, loop_span=64)
    cut = {k: (out, finish) for k, out, finish, _ in gen.run(prompts)}
    assert [cut[k][1] for k, _ in prompts] == ["loop", "loop", "eos"]
    assert [full[k][1] for k, _ in prompts] == ["length", "length", "eos"]
    for k, (out, finish) in cut.items():
        assert out == full[k][0][: len(out)]  # stopping early never changes the tokens before the stop
        if finish == "loop":
            assert len(out) % 16 == 0 and repeating_tail(out, 64) and len(out) < 112
            assert not any(repeating_tail(out[:n], 64) for n in range(16, len(out), 16))
