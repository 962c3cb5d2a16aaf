"""The length head inside real SGLang decode servers (`--ares`): SmolLM2-135M, 1 prefill + 2 decode of the suite's
shared servers (`conftest.ares_servers`), CPU, behind an ARES router (policy `ares`) of this module's.

Checked here: every running request gets a prediction after its first decode step and leaves the report when it
finishes; the served predictions equal the offline head applied to transformers' hidden states of the same tokens;
the router's snapshot carries them; `ares` dispatch follows the head where the prompt-length guess disagrees; outputs
are those of plain greedy decoding.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import prefills, routed
from http_helpers import ares_router, get_json, request, stream_events, wait_for

from ares.config import SHIPPED_PREDICTOR
from ares.models import prepare_model

PROMPTS = [
    "Write a long story about a dragon who learns to read.",
    "What is 2 + 2?",
    "List ten fruits and describe each one in a sentence.",
    "Say hello.",
    "Explain how a bicycle works, step by step.",
    "Name the capital of France.",
]


@pytest.fixture(scope="module")
def smollm2():
    return prepare_model("smollm2")


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


def chat_ids(tokenizer, text: str) -> list[int]:
    from ares.predictor.collect import chat_prompt_ids

    return chat_prompt_ids(tokenizer, text)


@pytest.fixture(scope="module")
def cluster(ares_servers, tmp_path_factory):
    """Two of the suite's shared ARES servers (`--ares-return-predictions`) behind an `ares` router of this module's."""
    with routed(ares_servers, tmp_path_factory.mktemp("engine-router"), "ares", n_decode=2) as c:
        yield c


@pytest.fixture(scope="module")
def prefill(cluster) -> list[tuple[str, int]]:
    return prefills(cluster.servers)


def states(cluster) -> list[dict]:
    return [get_json(url + "/ares/state") for url in cluster.decode_urls]


def rows_by_rid(cluster) -> dict[str, dict]:
    return {r["rid"]: r for s in states(cluster) for r in s["requests"]}


def generate(url: str, input_ids: list[int], max_new_tokens: int, **sampling) -> dict:
    body = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, **sampling}}
    status, headers, raw = request(url + "/generate", body, timeout=600)
    assert status == 200, raw[:500]
    out = json.loads(raw)
    out["decode"] = headers.get("X-Ares-Decode")
    return out


def test_every_running_request_gets_a_prediction_and_leaves_when_finished(cluster, tokenizer):
    for s in states(cluster):
        assert s["version"] == 1 and s["capacity_tokens"] == 8192 and s["requests"] == []
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    seen: dict[str, dict] = {}  # rid -> its /ares/state row, read while the request was surely running

    def run(ids: list[int]) -> dict:
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 48, "temperature": 0, "ignore_eos": True}}
        for event in stream_events(cluster.router_url + "/generate", body):
            meta = event["meta_info"]
            if meta["id"] not in seen and meta["completion_tokens"] >= 4:  # 44 tokens still to come
                rows = ((f"decode{i}", r) for i, st in enumerate(states(cluster)) for r in st["requests"])
                seen[meta["id"]] = {d: r for d, r in rows if r["rid"] == meta["id"]}
        return event

    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(run, prompts))
    rids = {o["meta_info"]["id"] for o in outs}
    assert rids == set(seen) and all(o["meta_info"]["completion_tokens"] == 48 for o in outs)
    for rid in rids:
        assert len(seen[rid]) == 1, seen[rid]  # reported by exactly one decode server
        (row,) = seen[rid].values()
        assert row["generated_tokens"] >= 4 and row["predicted_at_generated"] >= 1  # after the first decode step
        assert row["predicted_remaining"] >= 0 and row["predicted_p90"] >= row["predicted_remaining"] - 1e-3
    assert {d for rows in seen.values() for d in rows} == {"decode0", "decode1"}  # both ARES servers served some
    wait_for(lambda: not rows_by_rid(cluster), 60, "finished requests to leave /ares/state")
    info = get_json(cluster.decode_urls[0] + "/server_info")
    ares = [s["ares"] for s in info["internal_states"] if "ares" in s]
    assert ares and ares[0]["predictor"] == str(SHIPPED_PREDICTOR) and ares[0]["state"]["version"] == 1


def test_served_predictions_equal_the_offline_head_on_transformers_states(cluster, tokenizer, smollm2):
    """One greedy request: every prediction the server reported equals the shipped head applied to the teacher-forced
    final-norm state of the same step (the predictor's own capture path), and the tokens equal transformers'."""
    from transformers import AutoModelForCausalLM

    from ares.predictor.features import extra_features, teacher_forced_states
    from ares.predictor.head import load_head

    prompt = chat_ids(tokenizer, PROMPTS[0])
    out = generate(cluster.router_url, prompt, 40)
    response = out["output_ids"]
    trace = out["meta_info"]["ares_predicted_remaining"]  # --ares-return-predictions: one value per output token
    assert len(trace) == len(response)
    # The first token comes from the prefill server; every later one from a decode step that ran the head.
    assert trace[0] is None and all(v is not None for v in trace[1:]), trace
    observed = {g: v for g, v in enumerate(trace) if v is not None}  # generated tokens before the step -> prediction

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt) :].tolist()
    assert response == ref[: len(response)] and len(response) == len(ref)  # --ares leaves the tokens as they were

    states = teacher_forced_states(model, prompt, response, mid_layer=15)["final_norm"]
    head = load_head(SHIPPED_PREDICTOR, model_hidden_size=576)
    g = np.array(sorted(observed))
    extra = extra_features(g, np.full(len(g), len(prompt)))
    with torch.inference_mode():
        offline, _ = head(torch.from_numpy(states[g].astype(np.float32)), torch.from_numpy(extra))
    served = np.array([observed[k] for k in g])
    np.testing.assert_allclose(served, offline.numpy(), rtol=0.03, atol=0.5)  # fp16-stored states offline


def test_router_snapshot_carries_the_head_predictions(cluster, tokenizer):
    """The router's `/ares/cluster` row for a running request holds the server's prediction: the one the head made
    at the last decode step the poll saw (checked against the per-token trace the response returns)."""
    ids = chat_ids(tokenizer, PROMPTS[2])
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 160, "temperature": 0, "ignore_eos": True}}
    seen: list[dict] = []  # the router's rows for this request, read while it was running
    for event in stream_events(cluster.router_url + "/generate", body):
        rid = event["meta_info"]["id"]
        if len(seen) < 3 and event["meta_info"]["completion_tokens"] >= 4:
            for d in get_json(cluster.router_url + "/ares/cluster")["decode"]:
                assert d["source"] == "ares_state"
                seen += [r for r in d["requests"] if r["rid"] == rid and r["by_head"]]
    trace = event["meta_info"]["ares_predicted_remaining"]
    assert seen, "the router never showed a prediction for a request running 156 decode steps"
    for row in seen:
        # The server's latest prediction (made at some step g, `trace[g]`) counted down by the k >= 0 tokens that
        # came after it, as of the poll the router last read.
        value = row["predicted_remaining"]
        made = [(g, k) for g in range(1, len(trace)) for k in range(len(trace) - g + 1)
                if abs(max(trace[g] - k, 0.0) - value) < 1e-3]  # fmt: skip
        assert made, (row, trace)


def test_ares_dispatch_follows_the_head_where_the_prompt_guess_disagrees(cluster, tokenizer, prefill, tmp_path):
    """decode0 runs requests with long prompts, decode1 with short ones. A router whose prompt-length guess says the
    long prompts answer briefly and the short ones at length (base 3000 - 10 per prompt token) would, on the guess
    alone, pick decode0; the head knows what each request is doing, so the router picks decode1."""
    from ares_router.estimate import OutputEstimator
    from ares_router.reports import parse_ares_state
    from ares_router.state import RouterState

    estimate = OutputEstimator(base_tokens=3000, per_prompt_token=-10, floor_tokens=16, cap_tokens=4096)
    long_prompt = chat_ids(tokenizer, "Summarise this text. " + "The quick brown fox jumps over the lazy dog. " * 30)
    short_prompt = chat_ids(tokenizer, PROMPTS[4])
    assert estimate.total(len(long_prompt), None) < 100 < estimate.total(len(short_prompt), None)
    flags = ("--estimate-base", "3000", "--estimate-per-prompt-token=-10")
    with (
        ares_router(tmp_path, prefill, cluster.decode_urls[:1], "round_robin") as r0,
        ares_router(tmp_path, prefill, cluster.decode_urls[1:], "round_robin") as r1,
        ares_router(tmp_path, prefill, cluster.decode_urls, "ares", *flags) as guessing,
        ThreadPoolExecutor(6) as pool,
    ):
        runs = [pool.submit(generate, r0.url, long_prompt, 250, ignore_eos=True) for _ in range(3)]
        runs += [pool.submit(generate, r1.url, short_prompt, 250, ignore_eos=True) for _ in range(3)]

        def all_predicted() -> list[dict] | None:
            st = states(cluster)
            rows = [r for s in st for r in s["requests"]]
            return st if len(rows) == 6 and all(r["predicted_remaining"] is not None for r in rows) else None

        def decide(st: list[dict], strip: bool) -> int:
            """The in-process router state's choice on these reports (`strip`: without the head's predictions)."""
            state = RouterState.create(prefill, cluster.decode_urls, "ares", estimator=estimate)
            for d, load in zip(state.decodes, [parse_ares_state(s) for s in st], strict=True):
                if strip:  # what the router would see without the head: no predictions
                    load = replace(load, predicted_remaining=np.full(load.running_reqs, np.nan))
                state.poll_ok(d, load)
            state.refresh()
            return state.choose_decode(len(short_prompt), 4)

        st = wait_for(all_predicted, 300, "six running requests with predictions")
        decisions = {"head": decide(st, False), "guess": decide(st, True)}
        assert decisions == {"head": 1, "guess": 0}, decisions

        def router_sees_the_head() -> bool:
            # The live router's own snapshot must hold the six predictions too: one built from a poll just before
            # the short requests' first decode step still carries the prompt guess for them (CI saw decode0 so).
            rows = [r for d in get_json(guessing.url + "/ares/cluster")["decode"] for r in d["requests"]]
            return len(rows) == 6 and all(r["by_head"] for r in rows)

        wait_for(router_sees_the_head, 300, "the live router's snapshot to carry the head's six predictions")
        live = generate(guessing.url, short_prompt, 4)
        # The live router decides on its own, slightly later polls, and predictions move with every step: it must
        # take the head's choice on the reports from just before or just after its decision.
        after = decide(states(cluster), False)
        assert live["decode"] in {"decode1", f"decode{after}"}, (live["decode"], after)
        for f in runs:
            f.result()


def test_live_benchmark_harness_replays_through_a_policy_router_and_scores_the_head(cluster, prefill, tmp_path):
    """`ares.live.run.run_policy` (the live benchmark's and the demo's replay) on this module's servers: a few held-out
    prompts through a fresh `ares` router; nothing lost or sent twice; the servers' predictions are matched to the
    requests by the router's ids and scored against the lengths the client received."""
    import argparse

    from ares.live.report import Slo
    from ares.live.run import Display, run_policy
    from ares.live.workload import live_workload

    reqs = live_workload(4, rate=2.0, seed=5, long_fraction=0.25, long_min=100)
    args = argparse.Namespace(
        reserve_tokens=512, poll_interval=0.2, max_new_tokens=48, log_dir=str(tmp_path), request_timeout=600.0
    )
    summary, outcomes, trace = run_policy(
        cluster, prefill, "ares", reqs, Slo(ttft_s=600, tpot_s=60), args, Display(len(reqs), enabled=False), "ares"
    )
    assert (summary["completed"], summary["lost"], summary["duplicated"]) == (4, 0, 0), summary["errors"]
    assert all(o.backend_rid and o.decode in ("decode0", "decode1") for o in outcomes)
    assert summary["slo_attainment"] == 1.0 and summary["goodput_rps"] > 0
    assert summary["head"]["samples"] > 0 and summary["head"]["requests"] >= 1  # the reports name the router's ids
    assert summary["head"]["mae_tokens"] >= 0 and len(trace.t_s) >= 2 and trace.capacity == [8192, 8192]
    assert summary["retractions"] == 0 and sum(summary["placed"].values()) == 4
    assert summary["leftovers_aborted"] is None  # the servers were idle after the replay: nothing to abort


def test_live_benchmark_runs_sglangs_own_router_beside_the_ares_policies(cluster, prefill, tmp_path):
    """The baseline a user would otherwise pick: `sglang_power_of_two` in the live benchmark is SGLang's own PD router
    (sglang_router, power of two choices) in front of the same servers; every request is answered once."""
    import argparse

    from ares.live.report import Slo
    from ares.live.run import Display, run_policy
    from ares.live.workload import live_workload

    reqs = live_workload(4, rate=2.0, seed=6, long_fraction=0.25, long_min=100)
    args = argparse.Namespace(
        reserve_tokens=512, poll_interval=0.2, max_new_tokens=24, log_dir=str(tmp_path), request_timeout=600.0
    )
    policy = "sglang_power_of_two"
    summary, outcomes, _ = run_policy(
        cluster, prefill, policy, reqs, Slo(ttft_s=600, tpot_s=60), args, Display(len(reqs), enabled=False), policy
    )
    assert (summary["completed"], summary["lost"], summary["duplicated"]) == (4, 0, 0), summary["errors"]
    assert all(o.n_output > 0 for o in outcomes) and summary["migrations"] == {}  # no /ares/migrations there
    assert all(o.decode is None for o in outcomes)  # SGLang's router sends no X-Ares-Decode: not an ARES router
    assert summary["leftovers_aborted"] is None
