"""From generations + hidden states to (hidden, extra features, label) points, split by prompt.

Position ``j`` of a response of ``n`` tokens is the decode step whose hidden state produced token ``j``
(``j = 0`` is the prefill's last position). At that step ``g = j`` tokens were generated before and the label is
the number of tokens still to produce, this step's included: ``remaining = n - j`` (``n`` counts the EOS token),
so the label is in ``[1, n]`` and what the scheduler needs: decode steps this request still occupies a slot.

Truncated responses (no EOS within ``max_new_tokens``) have an unknown true length; they are treated as censored
and excluded from training and from the main metrics (their count is reported).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ares.predictor.generations import Generation

SPLITS = ("train", "val", "test")


def split_of(prompt_id: str, seed: int = 0, val: float = 0.1, test: float = 0.2) -> str:
    """Split of one prompt: a pure function of its id, so no prompt's positions land in two splits."""
    h = int.from_bytes(hashlib.sha1(f"{seed}:{prompt_id}".encode()).digest()[:8], "big") / 2**64
    return "test" if h < test else "val" if h < test + val else "train"


def extra_features(generated: np.ndarray, prompt_len: np.ndarray) -> np.ndarray:
    """Per-point scalar inputs the scheduler knows: log1p(tokens generated so far), log1p(prompt length)."""
    return np.stack([np.log1p(generated), np.log1p(prompt_len)], axis=1).astype(np.float32)


@dataclass
class PointSet:
    """Prediction points of one split. ``request`` indexes ``ids``; ``hidden`` keyed by layer name."""

    ids: list[str]
    sources: list[str]
    request: np.ndarray  # int32 [N]
    position: np.ndarray  # int32 [N], tokens generated before this step
    length: np.ndarray  # int32 [N], total response tokens of the request
    prompt_len: np.ndarray  # int32 [N]
    hidden: dict[str, np.ndarray]  # layer name -> float16 [N, H]

    @property
    def remaining(self) -> np.ndarray:
        return (self.length - self.position).astype(np.float32)

    @property
    def extra(self) -> np.ndarray:
        return extra_features(self.position, self.prompt_len)

    @property
    def progress(self) -> np.ndarray:
        return self.position / self.length

    def __len__(self) -> int:
        return len(self.position)


def positions_for(n: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """All positions of an ``n``-token response, or a sorted random ``cap`` of them (always keeping 0)."""
    if cap is None or n <= cap:
        return np.arange(n)
    rest = rng.choice(np.arange(1, n), size=cap - 1, replace=False)
    return np.sort(np.concatenate([[0], rest]))


def build_points(
    gens: Iterable[Generation],
    states: dict[str, dict[str, np.ndarray]],
    cap_per_request: int | None = None,
    seed: int = 0,
) -> PointSet:
    """Points of `gens` (EOS-ended only) whose states are known; `states[id][layer]` is [n, H]."""
    rng = np.random.default_rng(seed)
    ids, sources, req, pos, length, plen = [], [], [], [], [], []
    hidden: dict[str, list[np.ndarray]] = {}
    for g in gens:
        if not g.ended_with_eos or g.id not in states:
            continue
        n = len(g.response)
        st = states[g.id]
        if any(v.shape[0] != n for v in st.values()):
            raise ValueError(f"{g.id}: states cover {[v.shape[0] for v in st.values()]} tokens, response has {n}")
        p = positions_for(n, cap_per_request, rng)
        k = len(ids)
        ids.append(g.id)
        sources.append(g.source)
        req.append(np.full(len(p), k, np.int32))
        pos.append(p.astype(np.int32))
        length.append(np.full(len(p), n, np.int32))
        plen.append(np.full(len(p), len(g.prompt), np.int32))
        for name, arr in st.items():
            hidden.setdefault(name, []).append(arr[p])

    def cat(xs: list[np.ndarray], dt) -> np.ndarray:
        return np.concatenate(xs) if xs else np.zeros(0, dt)

    return PointSet(
        ids,
        sources,
        cat(req, np.int32),
        cat(pos, np.int32),
        cat(length, np.int32),
        cat(plen, np.int32),
        {k: np.concatenate(v).astype(np.float16) for k, v in hidden.items()},
    )


def teacher_forced_states(model, prompt: list[int], response: list[int], mid_layer: int) -> dict[str, np.ndarray]:
    """Recompute the states of every response step by one forward pass over prompt + response.

    Position ``len(prompt) - 1 + j`` is the input of the step producing response token ``j``.
    """
    import torch

    ids = torch.tensor([prompt + response[:-1]])
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
    start = len(prompt) - 1
    return {
        "final_norm": out.hidden_states[-1][0, start:].to(torch.float16).numpy(),
        f"layer_{mid_layer}": out.hidden_states[mid_layer][0, start:].to(torch.float16).numpy(),
    }
