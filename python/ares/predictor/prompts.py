"""Real prompt sets read in place from ``../shared/data/text``, interleaved across sources with a fixed seed.

Each prompt gets a stable id (``<source>:<key>``) so that collection can resume and the train/val/test split
is a pure function of the id.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ares.shared_data import data_root, require_data

SOURCES = ("alpaca_eval", "gsm8k", "arena_hard_v2", "sharegpt")


@dataclass(frozen=True)
class Prompt:
    """One user prompt: its stable id, source name and text."""

    id: str
    source: str
    text: str


def default_data_root() -> Path:
    """The prompt sets: ``text/`` in the shared data folder (see :func:`ares.shared_data.data_root`)."""
    return data_root() / "text"


def _alpaca(root: Path) -> Iterator[Prompt]:
    # The 805 instructions are the same in every model's file; any one file lists them.
    path = sorted((root / "alpaca_eval").glob("*.json"))[0]
    for i, row in enumerate(json.loads(path.read_text())):
        yield Prompt(f"alpaca_eval:{i}", "alpaca_eval", row["instruction"])


def _gsm8k(root: Path) -> Iterator[Prompt]:
    for split in ("test", "train"):
        with open(root / "gsm8k" / f"{split}.jsonl") as f:
            for i, line in enumerate(f):
                yield Prompt(f"gsm8k:{split}:{i}", "gsm8k", json.loads(line)["question"])


def _arena(root: Path) -> Iterator[Prompt]:
    with open(root / "arena_hard_v2" / "question.jsonl") as f:
        for line in f:
            row = json.loads(line)
            yield Prompt(f"arena_hard_v2:{row['uid']}", "arena_hard_v2", row["prompt"])


def _sharegpt(root: Path) -> Iterator[Prompt]:
    seen: set[str] = set()
    for name in ("ShareGPT_V3_filtered_1000.json", "sg_90k_part1_html_cleaned_lang_first_sampled_sorted.json"):
        for row in json.loads((root / "sharegpt_mlenergy" / name).read_text()):
            turns = row.get("conversations") or []
            if not turns or turns[0].get("from") != "human" or row["id"] in seen:
                continue
            text = turns[0]["value"].strip()
            if text:
                seen.add(row["id"])
                yield Prompt(f"sharegpt:{row['id']}", "sharegpt", text)


_READERS = {"alpaca_eval": _alpaca, "gsm8k": _gsm8k, "arena_hard_v2": _arena, "sharegpt": _sharegpt}


def load_prompts(root: Path | None = None, sources: tuple[str, ...] = SOURCES, seed: int = 0) -> list[Prompt]:
    """All prompts of `sources`, each source shuffled with `seed`, then interleaved round-robin.

    Interleaving makes any prefix of the list a balanced mix, so a partial collection stays representative.
    """
    root = root or require_data(default_data_root())
    unknown = set(sources) - set(_READERS)
    if unknown:
        raise ValueError(f"unknown prompt sources {sorted(unknown)}; choose from {SOURCES}")
    rng = random.Random(seed)
    per_source = []
    for name in sources:
        items = list(_READERS[name](root))
        rng.shuffle(items)
        per_source.append(items)
    out: list[Prompt] = []
    for i in range(max(len(s) for s in per_source)):
        out.extend(s[i] for s in per_source if i < len(s))
    return out
