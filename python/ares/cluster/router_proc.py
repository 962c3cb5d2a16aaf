"""One router process on 127.0.0.1 in front of servers that are already running, stopped by PID: the ARES router
with a policy, or SGLang's own PD router (`sglang_<its policy>`, e.g. `sglang_power_of_two`).

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


# Policy names served by SGLang's own PD router (sglang_router, pinned in pyproject): "sglang_" + its `--policy`.
SGLANG_PREFIX = "sglang_"


def is_sglang(policy: str) -> bool:
    """Whether `policy` names SGLang's own router (`sglang_<its policy>`) rather than an ARES router policy."""
    return policy.startswith(SGLANG_PREFIX)


def router_argv(port: int, prefill: list[tuple[str, int]], decode: list[str], policy: str, *extra: str) -> list[str]:
    """The command line of a router over these servers (`prefill`: (URL, bootstrap port) pairs): the ARES router
    with `policy`, or SGLang's PD router with its own policy for `sglang_<policy>`."""
    if is_sglang(policy):
        # Its metrics listener defaults to one fixed port (a second router beside it would panic), and it re-checks
        # workers every 30 s while starting: a free port, and a check every second.
        module = ["sglang_router.launch_router", "--pd-disaggregation", "--prometheus-port", str(free_ports(1)[0]),
                  "--worker-startup-check-interval", "1"]  # fmt: skip
        policy = policy.removeprefix(SGLANG_PREFIX)
    else:
        module = ["ares_router"]
    argv = [sys.executable, "-m", *module, "--host", HOST, "--port", str(port), "--policy", policy]
    for url, boot in prefill:
        argv += ["--prefill", url, str(boot)]
    for url in decode:
        argv += ["--decode", url]
    return [*argv, *extra]


@contextmanager
def policy_router(
    log_dir: Path, prefill: list[tuple[str, int]], decode: list[str], policy: str, *extra: str, timeout_s: float = 120
) -> Iterator[RouterProcess]:
    """Start a router (see `router_argv`) on a free port, wait until it answers, yield it, stop it (its process
    group) at exit."""
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
        # SGLang's router answers /health before it has registered its workers (a request then gets 503 "Failed
        # to select PD pair"); /readiness is 200 once they are healthy.
        ready = r.url + ("/readiness" if is_sglang(policy) else "/ares/cluster")
        while not http_ok(ready):
            if proc.poll() is not None:
                raise ClusterError(f"router exited with {proc.returncode}:\n{r.log_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise ClusterError(f"router not answering after {timeout_s:.0f}s:\n{r.log_text()[-4000:]}")
            time.sleep(0.3)
        yield r
    finally:
        stop_groups([(proc.pid, None)], grace_s=10)
        proc.wait()
