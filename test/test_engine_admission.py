"""Predictive decode admission inside SGLang (`--ares-admission predictive`, `ares.engine.admission_hook`).

Unit part: the flag, the hook targets exist in the installed SGLang, and the two AROUND hooks turn SGLang's
`required <= allocatable` into `forecast peak with the request <= pool` (a stand-in queue: a unit test of the hooks
alone). E2E part: one real SmolLM2 PD pair on CPU (1 prefill + 1 predictive decode, 2048 KV tokens) runs a burst of
requests side by side that SGLang's own rule would have queued, with no retraction.
"""

from __future__ import annotations

import importlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from http_helpers import get_json, request, wait_for

from ares.config import split_ares_args
from ares.engine import admission_hook as ah
from ares.engine.request_state import record
from ares_router.policy import Admission
from ares_router.policy.admission import KVForecast


def test_flag_defaults_to_sglang_and_predictive_needs_ares():
    base = ["--disaggregation-mode", "decode", "--model-path", "m"]
    assert split_ares_args(["--ares", *base])[0].admission == "sglang"
    assert split_ares_args(["--ares", "--ares-admission", "predictive", *base])[0].admission == "predictive"
    with pytest.raises(ValueError, match="--ares-admission predictive needs --ares"):
        split_ares_args(["--ares-admission", "predictive", *base])


@pytest.mark.parametrize("target", [ah.RETRACT_DECODE, *ah.PREDICTIVE_TARGETS])
def test_hook_targets_exist_in_the_installed_sglang(target):
    module, cls, meth = target.rsplit(".", 2)
    assert callable(getattr(getattr(importlib.import_module(module), cls), meth))


def _req(prompt: int, generated: int, max_new: int | None):
    return SimpleNamespace(
        origin_input_ids=[0] * prompt,
        output_ids=[0] * generated,
        sampling_params=SimpleNamespace(max_new_tokens=max_new),
        finished=lambda: False,
    )


def test_hooks_replace_the_blanket_terms_by_the_forecast(monkeypatch):
    # Pool 2000 tokens, 1200 free. Running: (prompt 300, 100 generated, head: 50 left, P90 80) and (prompt 250,
    # 50 generated, max_tokens 60, head: 40 left, no P90 -> 40 capped by 60 - 50 = 10); waiting: prompt 100,
    # max_tokens 20 (prior: min(128 + 50, 20) = 20). Rows (l, r): (400, 80), (300, 10), (100, 20); explained 800 =
    # in use: base 0. New request: prompt 200, max_tokens 30 -> planned 30. Peak with it: t = 10: 410 + 310 + 110 +
    # 210 = 1040; t = 20: 420 + 120 + 220 = 760; t = 30: 430 + 230; t = 80: 480. Required = 1040 - 800 = 240.
    state = ah.AdmissionState("predictive")
    monkeypatch.setattr(ah, "_state", state)
    a, b = _req(300, 100, None), _req(250, 50, 60)
    record(a, 50.0, 80.0, 100, 1)
    record(b, 40.0, None, 50, 1)
    queue = SimpleNamespace(
        scheduler=SimpleNamespace(
            running_batch=SimpleNamespace(reqs=[a, b]), waiting_queue=[_req(100, 0, 20)], max_total_num_tokens=2000
        ),
        transfer_queue=SimpleNamespace(queue=[]),
        token_to_kv_pool_allocator=SimpleNamespace(available_size=lambda: 1200),
        _need_space_for_single_req=lambda retractable: 4096 + 300 - retractable,
    )
    lengths, rem = ah.rows_of(queue, state.estimator)
    assert lengths.tolist() == [400, 300, 100] and rem.tolist() == [80, 10, 20]
    new = _req(200, 0, 30)
    assert ah._around_required(lambda *a: pytest.fail("SGLang's rule asked"), queue, new, 200, 0, 700) == 240
    # The budget: SGLang's function with no per-request reserve, its single-request term given back.
    seen = {}

    def original(q, **kw):
        seen.update(kw)
        return 1200 - max(kw["reserved_tokens"], q._need_space_for_single_req(kw["retractable_tokens"]))

    assert ah._around_allocatable(original, queue, retractable_tokens=700, count_retracted=True) == 1200
    assert seen["reserved_tokens"] == 0
    # The retracted-request resume path keeps SGLang's rule.
    assert ah._around_allocatable(lambda q, **kw: -1, queue, count_retracted=False) == -1
    # In SGLang mode nothing changes.
    monkeypatch.setattr(ah, "_state", ah.AdmissionState("sglang"))
    assert ah._around_required(lambda *a: 7, queue, new, 200, 0, 700) == 7
    assert ah._around_allocatable(lambda q, **kw: 9, queue, retractable_tokens=700, count_retracted=True) == 9
    assert ah.admission_block(queue.scheduler) == {"admission": {"mode": "sglang", "retractions": 0}}


# ------------------------------------------------------------------ e2e: one real predictive decode server

CAPACITY = 2048
BURST = 8
MAX_NEW = 128


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from conftest import running_cluster

    from ares.models import prepare_model

    with running_cluster(
        tmp_path_factory.mktemp("admission-cluster"),
        model_path=str(prepare_model("smollm2")),
        n_prefill=1,
        n_decode=1,
        ares=True,
        ares_args=("--ares-admission", "predictive"),
        max_total_tokens=CAPACITY,
        router="ares",
        router_policy="round_robin",
    ) as c:
        yield c


def test_predictive_server_runs_side_by_side_what_sglang_would_queue(cluster):
    decode = cluster.decode_urls[0]
    state = get_json(decode + "/ares/state")
    assert state["capacity_tokens"] == CAPACITY
    assert state["admission"]["mode"] == "predictive" and state["admission"]["retractions"] == 0
    prompts = [f"Request {i}: tell me a long story about the number {i}." for i in range(BURST)]

    def run(text: str) -> dict:
        body = {"text": text, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}}
        status, _, raw = request(cluster.router_url + "/generate", body, timeout=900)
        assert status == 200, raw[:500]
        return json.loads(raw)

    most: list[dict] = []  # the report with the most running requests seen

    def watch() -> bool:
        s = get_json(decode + "/ares/state")
        if len(s["requests"]) > len(most[0]["requests"] if most else []):
            most[:] = [s]
        return len(s["requests"]) >= 4

    with ThreadPoolExecutor(BURST) as pool:
        futures = [pool.submit(run, p) for p in prompts]
        wait_for(watch, timeout=600, what="4 requests running side by side on the predictive server", interval=0.05)
        outs = [f.result() for f in futures]
    assert all(o["meta_info"]["completion_tokens"] == MAX_NEW for o in outs)
    # SGLang's rule on that server (R = 512): the 4th of these requests is never admitted while 3 others hold
    # decode KV, even at its most lenient (the others with no token generated yet).
    rows = most[0]["requests"]
    prompt = np.array([r["prompt_tokens"] for r in rows], float)
    others, own = prompt[:3], float(prompt[3])
    foot = Admission().footprint(others, np.full(3, float(MAX_NEW)), float(CAPACITY))
    assert not Admission().admits(
        CAPACITY - others.sum(), 3, others.sum(), float(foot.max()), own, float(MAX_NEW), CAPACITY
    )
    # Predictive admission planned each at most MAX_NEW more tokens: the forecast peak fits.
    fc = KVForecast.of(prompt + np.array([r["generated_tokens"] for r in rows]), np.full(len(rows), MAX_NEW))
    assert fc.peak <= CAPACITY
    # The safety net never fired, and the report carries the forecast.
    final = wait_for(lambda: (s := get_json(decode + "/ares/state"))["requests"] == [] and s, 120, "idle server")
    assert final["admission"]["retractions"] == 0
    assert final["admission"]["forecast_rows"] == 0 and math.isfinite(final["admission"]["forecast_peak_tokens"])
