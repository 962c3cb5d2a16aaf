"""The launcher stops every process it started (servers, their SGLang children, router), also on failure.

A process sent SIGKILL disappears a moment later, not at once (longer on a busy machine), so "nothing is left" is
waited for with a generous deadline (`wait_for`) rather than checked the instant `stop` returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from standin_server import N_CHILDREN, wrapper

from ares.cluster import Cluster, ClusterError, ClusterSpec
from ares.cluster.launcher import group_members

DEADLINE_S = 30.0


def wait_for(predicate, timeout: float = DEADLINE_S, what: str = "the condition"):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return value


def test_failed_startup_stops_everything(tiny_model, tmp_path):
    """A server failing during startup tears the whole cluster down, SGLang's child processes included."""
    cluster = Cluster(
        ClusterSpec(model_path=str(tiny_model), n_prefill=1, n_decode=1, max_total_tokens=2048), log_dir=tmp_path
    )
    seen: set[int] = set()

    def fail_once_children_run(servers, timeout_s):
        # Each SGLang server spawns a scheduler and a detokenizer: wait for them, then fail the startup.
        deadline = time.monotonic() + 300
        while len(seen) < 3 * len(servers) and time.monotonic() < deadline:
            time.sleep(1)
            seen.update(group_members(set(cluster.pids.values())))
        raise ClusterError("injected startup failure")

    cluster._wait_healthy = fail_once_children_run
    with pytest.raises(ClusterError, match="injected"):
        cluster.start()
    assert len(seen) >= 6, f"servers and their children should have been running: {seen}"
    wait_for(lambda: not [p for p in seen if _alive(p)], what=f"every process of {sorted(seen)} to be gone")
    assert cluster.pids == {}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


INNER_TEST = textwrap.dedent(
    """
    import json, os
    from ares.cluster import Cluster, ClusterSpec

    def test_fails_while_cluster_runs(tmp_path):
        spec = ClusterSpec(model_path="m", n_prefill=1, n_decode=1, python=os.environ["STANDIN_PYTHON"])
        with Cluster(spec, log_dir=tmp_path) as cluster:
            with open(os.environ["PIDS_OUT"], "w") as f:
                json.dump(cluster.pids, f)
            assert False, "this test fails on purpose while the cluster runs"
    """
)


def test_cluster_stopped_when_a_test_fails(tmp_path):
    """A pytest run whose test fails mid-cluster leaves no process behind (stand-in servers: `standin_server`)."""
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    pids_out = tmp_path / "pids.json"
    env = {**os.environ, "STANDIN_PYTHON": str(wrapper(tmp_path)), "PIDS_OUT": str(pids_out)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=tmp_path,
    )
    assert run.returncode == 1 and "1 failed" in run.stdout, run.stdout[-3000:]
    pids = json.loads(pids_out.read_text())
    assert set(pids) == {"prefill0", "decode0", "router"}
    wait_for(lambda: not group_members(set(pids.values())), what="the failed test's cluster processes to be gone")


def test_cli_up_status_down(tmp_path):
    """`ares cluster up` leaves a recorded, healthy cluster; `ares cluster down` stops exactly those PIDs and their
    children (stand-in servers: `standin_server`)."""
    env = {**os.environ, "ARES_CACHE_DIR": str(tmp_path / "cache")}
    # The models are already in the default cache; point this run's cache there for them only.
    env_models = Path(os.environ.get("ARES_CACHE_DIR") or Path.home() / ".cache" / "ares") / "models"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(env_models)
    ares = [sys.executable, "-m", "ares.cli", "cluster"]
    up = subprocess.run(
        [
            *ares,
            "up",
            "--model",
            "tiny",
            "--prefill",
            "1",
            "--decode",
            "1",
            "--name",
            "t",
            "--max-total-tokens",
            "2048",
            "--python",
            str(wrapper(tmp_path)),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert "router: http://127.0.0.1:" in up.stdout
        state = json.loads(
            subprocess.run([*ares, "status", "--name", "t"], capture_output=True, text=True, env=env, check=True).stdout
        )
        pids = {p["pid"] for p in state["processes"]}
        assert len(pids) == 3 and all(p["url"].startswith("http://127.0.0.1:") for p in state["processes"])
        members = group_members(pids)
        assert len(members) == len(pids) * (1 + N_CHILDREN)  # children share their server's group
    finally:
        down = subprocess.run([*ares, "down", "--name", "t"], capture_output=True, text=True, env=env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped 't': pids" in down.stdout
    wait_for(lambda: not group_members(pids), what="the cluster's processes to be gone")
    assert not (tmp_path / "cache" / "clusters" / "t.json").exists()
