"""One ARES router process on 127.0.0.1 in front of servers that are already running, stopped by PID.

Benchmarks that compare placement policies on one set of SGLang servers start one router per policy with this,
so every policy sees the same servers, the same model weights and the same warm caches.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ares.cluster.launcher import ClusterError, free_ports, http_ok, stop_groups
from ares.cluster.spec import HOST


@dataclass
class RouterProcess:
    """A running `python -m ares_router`: its URL, process and log file."""

    url: str
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        """The router's log so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def router_argv(port: int, prefill: list[tuple[str, int]], decode: list[str], policy: str, *extra: str) -> list[str]:
    """The command line of an ARES router over these servers (`prefill`: (URL, bootstrap port) pairs)."""
    argv = [sys.executable, "-m", "ares_router", "--host", HOST, "--port", str(port), "--policy", policy]
    for url, boot in prefill:
        argv += ["--prefill", url, str(boot)]
    for url in decode:
        argv += ["--decode", url]
    return [*argv, *extra]


@contextmanager
def ares_router(
    log_dir: Path, prefill: list[tuple[str, int]], decode: list[str], policy: str, *extra: str, timeout_s: float = 60
) -> Iterator[RouterProcess]:
    """Start an ARES router on a free port, wait until it answers, yield it, stop it (its process group) at exit."""
    port = free_ports(1)[0]
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"router-{policy}-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            router_argv(port, prefill, decode, policy, *extra),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    r = RouterProcess(f"http://{HOST}:{port}", proc, log)
    try:
        deadline = time.monotonic() + timeout_s
        while not http_ok(r.url + "/ares/cluster"):
            if proc.poll() is not None:
                raise ClusterError(f"router exited with {proc.returncode}:\n{r.log_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise ClusterError(f"router not answering after {timeout_s:.0f}s:\n{r.log_text()[-4000:]}")
            time.sleep(0.3)
        yield r
    finally:
        stop_groups([(proc.pid, None)], grace_s=10)
        proc.wait()
