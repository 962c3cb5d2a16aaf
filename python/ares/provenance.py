"""Where a benchmark's numbers came from: the git commit of the checkout it ran in, the command line and the hashes
of its inputs."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_state(root: Path) -> tuple[str, bool]:
    """(HEAD commit or "" when git is unavailable, whether tracked files other than `benchmark/results/` differ
    from it). Results are outputs: one benchmark rewriting them while another runs does not change the code measured."""

    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return run("git", "rev-parse", "HEAD"), bool(
        run("git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmark/results")
    )


def commit_label(root: Path) -> str:
    """The commit as one string for a results file: `<sha>`, `<sha>+dirty` when tracked code differs, or `unknown`."""
    commit, dirty = git_state(root)
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def record(root: Path, inputs: list[Path] | tuple[Path, ...] = ()) -> dict:
    """Commit, whether tracked files differ from it, the command line, and sha256 of each input file present."""
    import hashlib
    import shlex
    import sys

    commit, dirty = git_state(root)
    hashes = {}
    for p in inputs:
        p = Path(p)
        if p.is_file():
            rel = p.resolve().relative_to(root.resolve()) if p.resolve().is_relative_to(root.resolve()) else p
            hashes[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return {"commit": commit, "dirty": dirty, "command": shlex.join(["python", *sys.argv]), "inputs": hashes}
