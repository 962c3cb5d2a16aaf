"""Readers for the real traces: Azure 2023 conversation, Mooncake conversation, ShareGPT length stats.

Traces are read in place from the shared data folder (see SOURCES.md); nothing is copied.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ares.shared_data import require_data

from .base import Workload, renewal_arrivals, rescale_to_rate, traces_dir


def _finish(name: str, t: np.ndarray, prompt: np.ndarray, output: np.ndarray, rate, duration_s) -> Workload:
    order = np.argsort(t, kind="stable")
    t = rescale_to_rate(t[order], rate)
    wl = Workload(
        name,
        t,
        np.maximum(prompt[order].astype(np.int64), 1),
        np.maximum(output[order].astype(np.int64), 1),
    )
    return wl.head(duration_s) if duration_s is not None else wl


def read_azure_conv(rate: float | None = None, duration_s: float | None = None, path: Path | None = None) -> Workload:
    """Azure LLM inference trace 2023, conversation (Splitwise): real arrivals, time-scaled to `rate`."""
    path = path or require_data(traces_dir() / "azure2023" / "AzureLLMInferenceTrace_conv.csv")
    stamps, prompt, output = [], [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            stamps.append(row["TIMESTAMP"].replace(" ", "T"))
            prompt.append(int(row["ContextTokens"]))
            output.append(int(row["GeneratedTokens"]))
    ns = np.array(stamps, dtype="datetime64[ns]").astype(np.int64)
    t = (ns - ns.min()) / 1e9
    return _finish("azure_conv", t, np.array(prompt), np.array(output), rate, duration_s)


def read_mooncake_conv(
    rate: float | None = None, duration_s: float | None = None, path: Path | None = None
) -> Workload:
    """Mooncake (FAST'25) conversation trace: timestamps in ms, time-scaled to `rate`."""
    path = path or require_data(traces_dir() / "mooncake" / "conversation_trace.jsonl")
    t, prompt, output = [], [], []
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                t.append(rec["timestamp"] / 1000.0)
                prompt.append(rec["input_length"])
                output.append(rec["output_length"])
    return _finish("mooncake_conv", np.array(t, float), np.array(prompt), np.array(output), rate, duration_s)


def read_sharegpt_lengths(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, output) token counts of the ShareGPT stats file (decode capped at 1024 by its authors)."""
    path = path or require_data(traces_dir() / "sharegpt_stats" / "sharegpt_8k_filtered_stats_llama2_tokenizer.csv")
    prompt, output = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            prompt.append(int(float(row["num_prefill_tokens"])))
            output.append(int(float(row["num_decode_tokens"])))
    return np.array(prompt), np.array(output)


def sharegpt_workload(
    rate: float, duration_s: float, seed: int = 0, cv: float = 1.0, path: Path | None = None
) -> Workload:
    """ShareGPT lengths (sampled with replacement) with Poisson (cv=1) or Gamma arrivals at `rate`."""
    rng = np.random.default_rng(seed)
    prompt, output = read_sharegpt_lengths(path)
    t = renewal_arrivals(rng, rate, duration_s, cv)
    idx = rng.integers(len(prompt), size=len(t))
    return Workload("sharegpt", t, np.maximum(prompt[idx], 1), np.maximum(output[idx], 1))
