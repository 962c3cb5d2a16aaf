"""Where the third-party data (traces, prompt sets) lives: read in place, never copied into the repository.

What the main job (`ares demo`, the live benchmark) needs ships with the package instead; the full traces and
prompt sets stay outside, under `$ARES_DATA_DIR`.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "ARES_DATA_DIR"


def data_root() -> Path:
    """The shared data folder: $ARES_DATA_DIR, else the first `shared/data` found walking up from this package."""
    env = os.environ.get(ENV)
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        cand = parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return Path("../shared/data")


class MissingDataError(FileNotFoundError):
    """Third-party data the caller needs is not under the data folder."""


def require_data(path: Path, probe: str | None = None) -> Path:
    """`path` if it (and `path/probe`, when given) exists, else a `MissingDataError` naming the variable and file."""
    need = path / probe if probe else path
    if not need.exists():
        raise MissingDataError(
            f"third-party data not found: {need.resolve() if need.is_absolute() else need} "
            f"(set {ENV} to the folder holding traces/ and text/; see SOURCES.md there)"
        )
    return path
