"""The length head inside real SGLang decode servers (`--ares`): SmolLM2-135M, 1 prefill + 2 decode, CPU, behind the
ARES router (policy `ares`). One cluster for the module.

Checked here: every running request gets a prediction after its first decode step and leaves the report when it
finishes; the served predictions equal the offline head applied to transformers' hidden states of the same tokens;
the router's snapshot carries them; `ares` dispatch follows the head where the prompt-length guess disagrees; outputs
are those of plain greedy decoding.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch
from http_helpers import ares_router, get_json, request, wait_for

from ares.cluster import Cluster, ClusterSpec
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
def cluster(smollm2, tmp_path_factory):
    spec = ClusterSpec(
        model_path=str(smollm2),
        n_prefill=1,
        n_decode=2,
        ares=True,
        max_total_tokens=8192,
        router="ares",
        router_policy="ares",
    )
    with Cluster(spec, log_dir=tmp_path_factory.mktemp("engine-cluster") / "logs") as c:
        yield c


@pytest.fixture(scope="module")
def prefill(cluster) -> list[tuple[str, int]]:
    return [(p["url"], p["bootstrap_port"]) for p in cluster.state()["processes"] if p["role"] == "prefill"]


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
    seen: dict[str, dict] = {}
    done = threading.Event()

    def watch() -> None:  # every request must be seen with a prediction while it runs
        while not done.is_set():
            for rid, row in rows_by_rid(cluster).items():
                if row["predicted_remaining"] is not None:
                    seen.setdefault(rid, row)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda ids: generate(cluster.router_url, ids, 48, ignore_eos=True), prompts))
    done.set()
    watcher.join()
    rids = {o["meta_info"]["id"] for o in outs}
    assert rids <= set(seen), f"never seen with a prediction: {rids - set(seen)}"
    for rid in rids:
        row = seen[rid]
        assert row["generated_tokens"] >= 2 and row["predicted_at_generated"] >= 1  # after the first decode step
        assert row["predicted_remaining"] >= 0 and row["predicted_p90"] >= row["predicted_remaining"] - 1e-3
    assert {o["decode"] for o in outs} == {"decode0", "decode1"}  # both ARES servers served some
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
    observed: dict[int, float] = {}  # generated tokens before the step -> that step's prediction
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for row in rows_by_rid(cluster).values():
                if row["predicted_remaining"] is not None and row["predicted_remaining"] > 0:
                    g = row["predicted_at_generated"]
                    observed[g] = row["predicted_remaining"] + (row["generated_tokens"] - g)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = generate(cluster.router_url, prompt, 40)
    done.set()
    watcher.join()
    response = out["output_ids"]
    assert len(observed) >= 5, f"too few predictions observed: {observed}"

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
    ids = chat_ids(tokenizer, PROMPTS[2])
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(generate, cluster.router_url, ids, 64, ignore_eos=True)

        def same_in_both() -> bool:
            server = rows_by_rid(cluster)
            snap = get_json(cluster.router_url + "/ares/cluster")
            for d in snap["decode"]:
                assert d["source"] == "ares_state"
                for r in d["requests"]:
                    row = server.get(r["rid"])
                    if row and row["generated_tokens"] == r["generated"] and row["predicted_remaining"] is not None:
                        return abs(r["predicted_remaining"] - row["predicted_remaining"]) < 1e-3
            return False

        wait_for(same_in_both, 120, "the router's snapshot to show the server's prediction", interval=0.05)
        fut.result()


def test_ares_dispatch_follows_the_head_where_the_prompt_guess_disagrees(cluster, tokenizer, prefill, tmp_path):
    """decode0 runs requests with long prompts, decode1 with short ones. A router whose prompt-length guess says the
    long prompts answer briefly and the short ones at length (base 3000 - 10 per prompt token) would, on the guess
    alone, pick decode0; the head knows what each request is doing, so the router picks decode1."""
    from ares_router.estimate import OutputEstimator
    from ares_router.poller import parse_ares_state
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
        runs = [pool.submit(generate, r0.url, long_prompt, 400, ignore_eos=True) for _ in range(3)]
        runs += [pool.submit(generate, r1.url, short_prompt, 400, ignore_eos=True) for _ in range(3)]

        def all_predicted() -> list[dict] | None:
            st = states(cluster)
            rows = [r for s in st for r in s["requests"]]
            return st if len(rows) == 6 and all(r["predicted_remaining"] is not None for r in rows) else None

        st = wait_for(all_predicted, 300, "six running requests with predictions")
        loads = [parse_ares_state(s) for s in st]
        decisions = {}
        for name, strip in (("head", False), ("guess", True)):
            state = RouterState.create(prefill, cluster.decode_urls, "ares", estimator=estimate)
            for d, load in zip(state.decodes, loads, strict=True):
                if strip:  # what the router would see without the head: no predictions
                    load = replace(load, predicted_remaining=np.full(load.running_reqs, np.nan))
                state.poll_ok(d, load)
            state.refresh()
            decisions[name] = state.choose_decode(len(short_prompt), 64)
        assert decisions == {"head": 1, "guess": 0}, decisions
        live = generate(guessing.url, short_prompt, 4)
        assert live["decode"] == "decode1"
        for f in runs:
            f.result()
