"""Where a benchmark's numbers came from: the git commit of the checkout it ran in (imported by the scripts here,
which run as `python benchmark/NAME.py` and so find this module beside them)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_state(root: Path) -> tuple[str, bool]:
    """(HEAD commit or "" when git is unavailable, whether tracked files differ from it)."""

    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return run("git", "rev-parse", "HEAD"), bool(run("git", "status", "--porcelain", "--untracked-files=no"))
