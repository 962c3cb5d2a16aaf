"""`ares.provenance.git_state`: a results file records the commit and whether the code measured differed from it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ares.provenance import git_state


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_dirty_means_code_changed_not_results(tmp_path: Path) -> None:
    (tmp_path / "benchmark" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmark" / "results" / "r.json").write_text("{}\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    commit, dirty = git_state(tmp_path)
    assert len(commit) == 40 and not dirty
    (tmp_path / "benchmark" / "results" / "r.json").write_text('{"rewritten": true}\n')  # another run's output
    assert git_state(tmp_path) == (commit, False)
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path) == (commit, True)
