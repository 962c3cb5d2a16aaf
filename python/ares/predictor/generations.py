"""The collected generations file: one JSON record per request, appended as gzip members (resumable).

Record: ``{"id", "source", "prompt": [token ids], "response": [token ids], "finish": "eos"|"length"|"loop",
"max_new_tokens"}``. ``response`` includes the final EOS token when ``finish == "eos"``; ``"loop"`` means the
collector stopped a greedy repetition loop early (see ``ares.predictor.loops``): censored, like ``"length"``.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parents[3] / "benchmark" / "data" / "predictor_generations.jsonl.gz"


@dataclass
class Generation:
    """One request the model answered: prompt and response token ids and why it stopped."""

    id: str
    source: str
    prompt: list[int]
    response: list[int]
    finish: str  # "eos", "length" or "loop"
    max_new_tokens: int

    @property
    def ended_with_eos(self) -> bool:
        return self.finish == "eos"


def read_generations(path: Path = DEFAULT_PATH) -> list[Generation]:
    """All complete records of `path`, first occurrence of each id (a torn last gzip member is ignored)."""
    out: list[Generation] = []
    seen: set[str] = set()
    if not Path(path).exists():
        return out
    try:
        with gzip.open(path, "rt") as f:
            for line in f:
                g = Generation(**json.loads(line))
                if g.id not in seen:
                    seen.add(g.id)
                    out.append(g)
    except (EOFError, gzip.BadGzipFile, zlib.error, json.JSONDecodeError):
        pass
    return out


def append_generations(path: Path, records: list[Generation]) -> None:
    """Append `records` as one gzip member, so every completed batch survives a later kill."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "at", compresslevel=9) as f:
        for r in records:
            f.write(json.dumps(asdict(r), separators=(",", ":")) + "\n")


def rewrite_generations(path: Path, records: list[Generation]) -> None:
    """Rewrite `path` with exactly `records` (drops a torn tail before a resumed run appends)."""
    tmp = Path(str(path) + ".tmp")
    tmp.unlink(missing_ok=True)
    append_generations(tmp, records)
    tmp.replace(path)


def merge_generations(dst: Path, *srcs: Path) -> int:
    """Fold the records of `srcs` (e.g. a second worker's file) into `dst`, first copy of each id wins."""
    merged = read_generations(dst)
    seen = {g.id for g in merged}
    for src in srcs:
        for g in read_generations(src):
            if g.id not in seen:
                seen.add(g.id)
                merged.append(g)
    rewrite_generations(dst, merged)
    return len(merged)
