"""Start and stop a local PD cluster by PID. Each server runs in its own session, so stopping its process group
stops exactly the processes it spawned (scheduler, detokenizer) and nothing else.

A state file records every PID with its kernel start time, so `ares cluster down` from another shell stops exactly
those processes, never a later process that reused a PID.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

from ares.cluster.spec import HOST, ClusterSpec, ServerSpec
from ares.config import ENV_VAR


class ClusterError(RuntimeError):
    """A cluster process failed to start or become healthy."""


# Servers bind their ports a minute or more after they are chosen, and meanwhile the other servers bind ports of
# their own: the kernel's ephemeral range (every `bind(0)` and outgoing connection: SGLang's ZMQ sockets), Mooncake's
# handshake ports (15000-16999) and its TCP transport's data ports (seen at 20000-29999), so a port picked in any of
# those can be gone by then ("address already in use"). Cluster ports come from below all of them.
PORT_RANGE = (10000, 15000)


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 from `PORT_RANGE` (held open together while they are picked, so
    they are distinct)."""
    rng = random.Random()
    socks: list[socket.socket] = []
    try:
        for _ in range(100 * n):
            if len(socks) == n:
                break
            s = socket.socket()
            try:
                s.bind((HOST, rng.randrange(*PORT_RANGE)))
            except OSError:
                s.close()
                continue
            socks.append(s)
        if len(socks) < n:
            raise ClusterError(f"found only {len(socks)} of {n} free ports in {PORT_RANGE}")
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _start_time(pid: int) -> int | None:
    """Kernel start time of `pid` (clock ticks since boot), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after the closing parenthesis are fixed.
    return int(stat.rsplit(")", 1)[1].split()[19])


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def group_members(pgids: set[int]) -> set[int]:
    """PIDs of the live processes in these process groups. Zombies do not count: a stopped server stays one until
    its parent (this launcher) reaps it, and waiting for it to vanish would wait out the whole grace period."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) in pgids:
            members.add(int(entry.name))
    return members


def stop_groups(processes: list[tuple[int, int | None]], grace_s: float) -> None:
    """Stop the process groups led by these (pid, start_time) pairs: SIGTERM all at once, SIGKILL what is left
    after `grace_s`. A pid whose start time no longer matches is someone else's process and is left alone."""
    ours = [pid for pid, start in processes if start is None or _start_time(pid) == start]
    for pid in ours:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and group_members(set(ours)):
        time.sleep(0.2)
    for pid in ours:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def default_state_file(name: str = "default") -> Path:
    """Where `ares cluster up --name NAME` records its processes."""
    base = os.environ.get("ARES_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ares")
    return Path(base) / "clusters" / f"{name}.json"


class Cluster:
    """A running local PD cluster. Use as a context manager, or `start()` / `stop()`."""

    def __init__(self, spec: ClusterSpec, log_dir: str | Path, state_file: str | Path | None = None):
        self.spec = spec
        self.log_dir = Path(log_dir)
        self.state_file = Path(state_file) if state_file else None
        self.servers: list[ServerSpec] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self._start_times: dict[str, int | None] = {}

    # -- URLs ---------------------------------------------------------------------------------------------------
    def _urls(self, role: str) -> list[str]:
        return [s.url for s in self.servers if s.role == role]

    @property
    def decode_urls(self) -> list[str]:
        return self._urls("decode")

    @property
    def router_url(self) -> str:
        return self._urls("router")[0]

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 900.0) -> Cluster:
        """Start every server, wait until all are healthy, then start the router. Stops everything on failure."""
        spec = self.spec
        self.servers = spec.servers(free_ports(spec.n_ports))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            backends = [s for s in self.servers if s.role != "router"]
            for s in backends:
                self._launch(s)
            self._wait_healthy(backends, timeout_s)
            routers = [s for s in self.servers if s.role == "router"]
            for router in routers:
                self._launch(router)
            self._wait_healthy(routers, 120.0)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, s: ServerSpec, append_log: bool = False) -> None:
        env = dict(os.environ)
        env.pop(ENV_VAR, None)  # each SGLang launcher derives its own ARES config from its flags
        env["SGLANG_HOST_IP"] = HOST  # Mooncake would otherwise advertise the machine's external address
        env["PYTHONUNBUFFERED"] = "1"
        # Mooncake's TCP transport queues at most 1,024 transfer slices per peer and fails a whole batch beyond that;
        # on one loopback machine tens of concurrent KV transfers (PD and migration) pass it. Users' values win.
        for key in ("MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER", "MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER"):
            env.setdefault(key, "16384")  # Mooncake 0.3.13 refuses 65536
        if self.spec.device == "cpu" and "OMP_NUM_THREADS" not in env:
            # torch's OpenMP pool defaults to one thread per core in every server; several servers on a small
            # CPU machine then oversubscribe it with spinning threads. Give each server its share instead.
            n_backends = self.spec.n_prefill + self.spec.n_decode
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n_backends))
        # A restarted server appends: its log keeps what happened before the crash.
        log = open(self.log_dir / f"{s.name}.log", "ab" if append_log else "wb")  # noqa: SIM115 - the child's now
        proc = subprocess.Popen(
            list(s.argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        log.close()
        self.procs[s.name] = proc
        self._start_times[s.name] = _start_time(proc.pid)
        self._write_state()

    def _wait_healthy(self, servers: list[ServerSpec], timeout_s: float) -> None:
        pending = {s.name: s for s in servers}
        deadline = time.monotonic() + timeout_s
        while pending:
            for name, s in list(pending.items()):
                if self.procs[name].poll() is not None:
                    raise ClusterError(f"{name} exited with {self.procs[name].returncode}:\n{self.log_tail(name)}")
                # SGLang's router says /health before its workers are registered; /readiness once they are.
                sglang_router = s.role == "router" and self.spec.router == "sglang"
                if http_ok(s.url + ("/readiness" if sglang_router else "/health")):
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise ClusterError(f"not healthy after {timeout_s:.0f}s: {sorted(pending)}")
            if pending:
                time.sleep(1.0)

    def log_tail(self, name: str, n_chars: int = 4000) -> str:
        """The end of process `name`'s log."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-n_chars:] if path.exists() else ""

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop every process this cluster started, by PID (each with its children); remove the state file."""
        stop_groups([(p.pid, self._start_times.get(name)) for name, p in self.procs.items()], grace_s)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)  # reap, so no zombie is left
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        if self.state_file and self.state_file.exists():
            self.state_file.unlink()

    # -- one server's crash and restart (fault tests, the chaos benchmark) ---------------------------------------
    def _server(self, name: str) -> ServerSpec:
        for s in self.servers:
            if s.name == name:
                return s
        raise KeyError(f"no server {name!r} in this cluster: {[s.name for s in self.servers]}")

    def kill(self, name: str, timeout_s: float = 30.0) -> None:
        """SIGKILL server `name` with its children (its process group: a crash, no clean shutdown) and wait until
        they are gone and reaped. Its port and command line are kept for `restart`."""
        self._server(name)
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        start = self._start_times.pop(name, None)
        if start is None or _start_time(proc.pid) == start:  # still ours (not a recycled PID)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=timeout_s)  # reap the leader
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{name} (pid {proc.pid}) did not die within {timeout_s:.0f}s of SIGKILL") from None
        deadline = time.monotonic() + timeout_s
        while group_members({proc.pid}):  # its children (scheduler, detokenizer) go a moment later
            if time.monotonic() > deadline:
                raise ClusterError(f"children of {name} (group {proc.pid}) still alive {timeout_s:.0f}s after SIGKILL")
            time.sleep(0.1)
        self._write_state()

    def restart(self, name: str, timeout_s: float = 900.0) -> None:
        """Start server `name` again, on the same port with the same command line (after `kill`, or after it
        died), and wait until it is healthy. The router keeps its URL, so it comes back into rotation as soon as
        its next poll succeeds."""
        s = self._server(name)
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            raise ClusterError(f"{name} is still running (pid {proc.pid}): kill it first")
        self._launch(s, append_log=True)
        try:
            self._wait_healthy([s], timeout_s)
        except BaseException:
            self.kill(name)
            raise

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state file ---------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """JSON-able description: URLs, PIDs (with start times) and logs of every process."""
        return {
            "spec": {k: v for k, v in asdict(self.spec).items() if k != "python"},
            "router_url": self.router_url if self._urls("router") else None,
            "processes": [
                {
                    "name": s.name,
                    "role": s.role,
                    "url": s.url,
                    "pid": self.procs[s.name].pid,
                    "start_time": self._start_times[s.name],
                    "log": str(self.log_dir / f"{s.name}.log"),
                    "bootstrap_port": s.bootstrap_port,
                }
                for s in self.servers
                if s.name in self.procs
            ],
        }

    def _write_state(self) -> None:
        if self.state_file:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(json.dumps(self.state(), indent=2))


def load_state(state_file: str | Path) -> dict:
    """Read a cluster state file written by `Cluster`."""
    return json.loads(Path(state_file).read_text())


def stop_state(state_file: str | Path, grace_s: float = 15.0) -> list[int]:
    """Stop the processes recorded in `state_file`; return the PIDs stopped."""
    processes = [(p["pid"], p["start_time"]) for p in load_state(state_file)["processes"]]
    stop_groups(processes, grace_s)
    Path(state_file).unlink()
    return [pid for pid, _ in processes]
