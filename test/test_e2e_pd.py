"""End to end: a real PD cluster (1 prefill + 1 decode of `conftest.tiny_servers`, Mooncake TCP) behind SGLang's own
PD router, tiny model on CPU.

Every answer is checked against transformers' greedy generation of the same weights, token for token.
"""

from __future__ import annotations

import json
import urllib.request
from functools import lru_cache

import pytest

MAX_NEW = 12


def _post(url: str, body: dict, timeout: float = 120.0) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        assert resp.status == 200
        return resp.read()


def _sse_chunks(raw: bytes) -> list[dict]:
    lines = [ln[len(b"data: ") :] for ln in raw.splitlines() if ln.startswith(b"data: ")]
    assert lines and lines[-1] == b"[DONE]", "stream must end with [DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


@lru_cache(maxsize=1)
def _hf(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()


def hf_greedy(model_dir: str, input_ids: list[int], max_new: int = MAX_NEW) -> list[int]:
    """transformers' greedy continuation of `input_ids` (stops at EOS like SGLang)."""
    import torch

    tok, model = _hf(model_dir)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([input_ids]),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    new = out[0, len(input_ids) :].tolist()
    return new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new


def _chat_ids(model_dir: str, messages: list[dict]) -> list[int]:
    tok, _ = _hf(model_dir)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,", "def fibonacci(n):"]
MESSAGES = [{"role": "user", "content": "Give me three tips for staying healthy."}]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_generate_tokens_equal_transformers_greedy(pd_cluster, tiny_model, prompt):
    tok, _ = _hf(str(tiny_model))
    ids = tok.encode(prompt)
    out = json.loads(
        _post(
            pd_cluster.router_url + "/generate",
            {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW}},
        )
    )
    assert out["output_ids"] == hf_greedy(str(tiny_model), ids)


def test_completions_non_stream_and_stream(pd_cluster, tiny_model):
    tok, _ = _hf(str(tiny_model))
    prompt = PROMPTS[1]
    greedy = hf_greedy(str(tiny_model), tok.encode(prompt))
    expected = tok.decode(greedy)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0}
    full = json.loads(_post(pd_cluster.router_url + "/v1/completions", body))
    assert full["object"] == "text_completion"
    assert full["choices"][0]["text"] == expected
    assert full["usage"]["completion_tokens"] == len(greedy)
    chunks = _sse_chunks(_post(pd_cluster.router_url + "/v1/completions", {**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_chat_completions_non_stream_and_stream(pd_cluster, tiny_model):
    tok, _ = _hf(str(tiny_model))
    greedy = hf_greedy(str(tiny_model), _chat_ids(str(tiny_model), MESSAGES))
    expected = tok.decode(greedy, skip_special_tokens=True)
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": MAX_NEW, "temperature": 0}
    full = json.loads(_post(pd_cluster.router_url + "/v1/chat/completions", body))
    assert full["object"] == "chat.completion"
    assert full["choices"][0]["message"]["content"] == expected
    assert full["usage"]["completion_tokens"] == len(greedy)
    chunks = _sse_chunks(_post(pd_cluster.router_url + "/v1/chat/completions", {**body, "stream": True}))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == expected


def test_without_ares_no_state_route_and_no_hook(pd_cluster):
    """A decode server started without --ares serves no `/ares/state` (404) and reports no ARES state."""
    from http_helpers import get_json, request

    status, _, _ = request(pd_cluster.decode_urls[0] + "/ares/state")
    assert status == 404
    info = get_json(pd_cluster.decode_urls[0] + "/server_info")
    assert all("ares" not in s for s in info["internal_states"])
