"""Where the third-party data (traces, prompt sets) lives: read in place, never copied into the repository."""

from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    """The shared data folder: $ARES_DATA_DIR, else the first `shared/data` found walking up from this package."""
    env = os.environ.get("ARES_DATA_DIR")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        cand = parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return Path("../shared/data")
