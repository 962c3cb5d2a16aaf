"""The ARES router against SGLang's Rust PD router (sglang-router 0.3.2, `--pd-disaggregation`, round robin), on the
same loopback backend, in one run (issue 21's targets).

Both routers sit in front of one loopback prefill + decode pair (`router_loopback.py`: answers instantly, or streams
at 10 tok/s per stream with a stamp in every event). The client is a lean keep-alive HTTP/1.1 client in this
process (`router_loopback.HttpConn`). Phases, each for both routers in turn:

1. idle: router CPU while nothing is asked of it (its own polling and health checks), ms of CPU per second;
2. latency: one client, requests one at a time, direct to the decode port and through each router interleaved in
   one loop; added = routed - direct, p50 and p99 (non-stream, and a 16-event stream read to its end);
3. throughput: 64 and 512 closed-loop clients (one connection each), stream and non-stream, `--duration` s each:
   requests per second and router CPU per request (user + system time of the router's process tree from
   /proc/<pid>/stat over the window, divided by the requests completed in it);
4. paced streams: 500 and 2,000 concurrent streams at 10 tok/s (`--stream-tokens` events each, started evenly over
   one second), direct and through each router: per stream, every gap between two events as the client saw it
   minus the same gap as the backend wrote it (the stamps), so the backend's own pacing and lateness are taken
   out; the largest of these over every client is the figure. Direct shows what the client and backend alone add;
5. poll: `router_poll_bench.py` at 256 instances (schema 2), for the poll-cost target;
6. profile (`--profile-seconds`, ARES only): py-spy samples the ARES router under the 64-client stream load; the
   collapsed stacks are kept and summarised (self time by function, inclusive time by module) in the markdown.
7. workers (`--workers 1,2,4`): an ARES router of its own per worker count (`--workers N`: one brain process and N
   relay workers on the port; 1 is the single-process router) under 64 closed-loop clients, stream and non-stream:
   requests per second and CPU per request of the whole router (brain + workers, /proc), with the backend's and
   the client's CPU share beside them (on 2 cores they compete with the router). `--workers-only` runs just this
   phase and merges it into the existing JSON (its own command, commit and load average recorded with it).

Every issue-21 target gets a `met` flag in the JSON (null where this run cannot tell).
The machine is shared: the load average before and after each phase is recorded.

Writes benchmark/results/router_vs_sglang.{json,md,png} (+ _profile.txt). Run: `python
benchmark/router_vs_sglang.py` (cut down: `--quick`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from provenance import record
from router_loopback import (
    HOST,
    INSTANT_MAX_TOKENS,
    HttpConn,
    cpu_seconds,
    post_bytes,
    raise_nofile,
    start_backend,
    stop,
    use_uvloop,
    wait_http,
)

from ares.cluster.launcher import free_ports

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmark" / "results"
CHAT = "/v1/chat/completions"
ROUTERS = ("ares", "sglang")
DIRTY = " (working tree modified: the routers ran from the checkout, uncommitted changes included)"


def log(msg: str) -> None:
    """A progress line with the wall time and the 1-minute load average (the machine is shared)."""
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _pct(x: list[float] | np.ndarray, scale: float = 1e3) -> dict[str, float]:
    a = np.asarray(x, dtype=np.float64) * scale
    if not a.size:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max())}


# ---------------------------------------------------------------------------------------------------------------
# Routers
# ---------------------------------------------------------------------------------------------------------------
def router_argv(kind: str, prefill: str, decode: str, port: int, args: argparse.Namespace) -> list[str]:
    """The command line of the router under test (as `ares cluster up --router ...` starts them)."""
    if kind == "ares":
        return [
            sys.executable, "-m", "ares_router", "--prefill", prefill, "8998", "--decode", decode,
            "--policy", args.ares_policy, "--host", HOST, "--port", str(port), "--log-level", "warning",
        ]  # fmt: skip
    return [
        sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation", "--prefill", prefill, "8998",
        "--decode", decode, "--policy", "round_robin", "--host", HOST, "--port", str(port), "--log-level", "warn",
    ]  # fmt: skip


async def _ready(base: str, timeout_s: float = 120.0) -> None:
    """Until a real chat request through `base` succeeds (SGLang's router answers /health before its workers are
    activated)."""
    host, port, raw = post_bytes(base, CHAT, _body(False, 4))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = await HttpConn.open(host, port)
            status, _ = await asyncio.wait_for(conn.request(raw), 5)
            conn.close()
            if status == 200:
                return
        except (OSError, asyncio.TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base} never answered a chat request")
        await asyncio.sleep(0.5)


def _body(stream: bool, max_tokens: int) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens,
            "stream": stream}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------------------
async def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """ms of CPU per second of each router while no request arrives (one window, both routers)."""
    c0 = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    wall = time.monotonic() - t0
    return {k: (cpu_seconds(p) - c0[k]) / wall * 1e3 for k, p in pids.items()}


async def latency(targets: dict[str, str], n: int, warmup: int, stream: bool) -> dict:
    """One client, one request at a time, the targets interleaved (order rotated so drifts hit all alike)."""
    conns, raws = {}, {}
    for name, base in targets.items():
        host, port, raws[name] = post_bytes(base, CHAT, _body(stream, 16))
        conns[name] = await HttpConn.open(host, port)
    names = list(targets)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(warmup + n):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            status, _ = await conns[name].request(raws[name])
            dt = time.perf_counter() - t0
            assert status == 200, (name, status)
            if i >= warmup:
                times[name].append(dt)
    for c in conns.values():
        c.close()
    direct = np.array(times["direct"])
    out: dict = {"requests_each": n, "direct": _pct(direct)}
    for name in names:
        if name == "direct":
            continue
        t = np.array(times[name])
        out[name] = {
            "routed": _pct(t),
            "added_p50_ms": float(np.percentile(t, 50) - np.percentile(direct, 50)) * 1e3,
            "added_p99_ms": float(np.percentile(t, 99) - np.percentile(direct, 99)) * 1e3,
        }
    return out


async def closed_loop(base: str, pid: int | None, clients: int, stream: bool, seconds: float, warmup: float) -> dict:
    """`clients` connections, each sending the next request as soon as the last is answered, for `seconds` after
    `warmup`; requests completed per second in the measured window and the router's CPU per request over it."""
    host, port, raw = post_bytes(base, CHAT, _body(stream, 16))
    conns = []
    for i in range(0, clients, 64):  # in batches: a listen backlog of 128 must not drop SYNs
        conns += await asyncio.gather(*(HttpConn.open(host, port) for _ in range(min(64, clients - i))))
    loop = asyncio.get_running_loop()
    t_start = loop.time() + warmup
    t_end = t_start + seconds
    lat: list[float] = []
    errors = Counter()
    done = 0

    async def client(conn: HttpConn) -> None:
        nonlocal done
        while True:
            t0 = loop.time()
            if t0 >= t_end:
                return
            try:
                status, _ = await conn.request(raw)
            except OSError as e:
                errors[type(e).__name__] += 1
                return
            t1 = loop.time()
            if status != 200:
                errors[str(status)] += 1
            elif t_start <= t1 <= t_end:  # completions inside the window, whenever they started
                lat.append(t1 - t0)
                done += 1

    tasks = [asyncio.create_task(client(c)) for c in conns]
    await asyncio.sleep(max(0.0, t_start - loop.time()))
    cpu0, me0 = (cpu_seconds(pid) if pid else 0.0), time.process_time()
    await asyncio.sleep(max(0.0, t_end - loop.time()))
    cpu1, me1 = (cpu_seconds(pid) if pid else 0.0), time.process_time()
    await asyncio.gather(*tasks)
    for c in conns:
        c.close()
    cpu = cpu1 - cpu0
    return {
        "clients": clients,
        "stream": stream,
        "seconds": seconds,
        "requests": done,
        "req_per_s": done / seconds,
        "latency_ms": _pct(lat),
        "router_cpu_s": cpu,
        "router_cpu_share": cpu / seconds,
        "router_cpu_ms_per_request": cpu / done * 1e3 if done else None,
        "client_cpu_share": (me1 - me0) / seconds,
        "errors": dict(errors),
    }


async def paced_streams(base: str, pid: int | None, n: int, tokens: int, spread_s: float) -> dict:
    """`n` concurrent streams of `tokens` events at the backend's rate, started evenly over `spread_s`: the largest
    gap beyond the backend's own any client sees (see the module docstring), and the router's CPU per event."""
    host, port, raw = post_bytes(base, CHAT, _body(True, tokens))
    results: list[tuple[int, list[tuple[float, float]]] | BaseException] = []

    async def one(i: int) -> tuple[int, list[tuple[float, float]]]:
        await asyncio.sleep(spread_s * i / n)
        conn = await HttpConn.open(host, port)
        stamps: list[tuple[float, float]] = []
        try:
            status, _ = await conn.request(raw, stamps)
        finally:
            conn.close()
        return status, stamps

    t0, cpu0, me0 = time.monotonic(), (cpu_seconds(pid) if pid else 0.0), time.process_time()
    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    wall = time.monotonic() - t0
    cpu, me = (cpu_seconds(pid) if pid else 0.0) - cpu0, time.process_time() - me0
    extra_max, raw_max, lags, failed, events = [], [], [], Counter(), 0
    for r in results:
        if isinstance(r, BaseException):
            failed[type(r).__name__] += 1
            continue
        status, stamps = r
        if status != 200 or len(stamps) < tokens:
            failed[f"status {status}, {len(stamps)}/{tokens} events"] += 1
        if len(stamps) < 2:
            continue
        a = np.array(stamps)
        events += len(a)
        recv, sent = a[:, 0], a[:, 1]
        extra_max.append(float((np.diff(recv) - np.diff(sent)).max()))
        raw_max.append(float(np.diff(recv).max()))
        lags.append(recv - sent)
    lag = np.concatenate(lags) if lags else np.array([])
    return {
        "streams": n,
        "tokens_each": tokens,
        "events_received": events,
        "wall_s": wall,
        "failed": dict(failed),
        "max_gap_beyond_backend_ms": max(extra_max) * 1e3 if extra_max else None,
        "per_stream_max_gap_beyond_backend_ms": _pct(extra_max),
        "max_gap_seen_ms": max(raw_max) * 1e3 if raw_max else None,
        "delivery_lag_ms": _pct(lag),  # client arrival - backend write, per event
        "router_cpu_share": cpu / wall,
        "router_cpu_us_per_event": cpu / events * 1e6 if events else None,
        "client_cpu_share": me / wall,
    }


def poll_cost(args: argparse.Namespace, logs: Path) -> dict | None:
    """`router_poll_bench.py` at 256 instances, schema 2: the poll-cost target."""
    out = logs / "poll"
    cmd = [
        sys.executable, str(ROOT / "benchmark" / "router_poll_bench.py"), "--instances", "256", "--formats", "v2",
        "--cycles", str(args.poll_cycles), "--live-seconds", str(args.poll_live_seconds), "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        log(f"poll bench failed: {r.stderr[-2000:]}")
        return None
    res = json.loads((out / "router_poll_bench.json").read_text())["results"][0]
    return {
        "command": " ".join(["python", "benchmark/router_poll_bench.py", *cmd[2:-2]]),
        "instances": res["instances"],
        "round_p99_ms": res["round"]["p99_ms"],
        "router_cpu_per_round_p50_ms": res["router_cpu_per_round"]["p50_ms"],
        "live_router_cpu_share": res["live"]["router_cpu_share"],
        "live_rounds_per_s": res["live"]["rounds_per_s"],
        "loop_lag": res["live"].get("loop_lag"),
    }


async def workers_phase(args: argparse.Namespace, prefill: str, decode: str, backend_pid: int, logs: Path) -> dict:
    """ARES at each of `args.workers` worker counts, one router at a time on the same backend: throughput and CPU
    per request of the whole router process tree (brain + workers) at `args.workers_clients` clients."""
    rows = []
    for n in args.workers:
        port = free_ports(1)[0]
        argv = router_argv("ares", prefill, decode, port, args) + (["--workers", str(n)] if n > 1 else [])
        proc = subprocess.Popen(argv, start_new_session=True, stdout=open(logs / f"ares-workers{n}.log", "wb"),  # noqa: SIM115
                                stderr=subprocess.STDOUT)  # fmt: skip
        url = f"http://{HOST}:{port}"
        try:
            await asyncio.to_thread(wait_http, url + "/health", 120, proc)
            await _ready(url)
            await asyncio.sleep(1.0)
            for stream in (False, True):
                b0, brain0, t0 = cpu_seconds(backend_pid), cpu_seconds(proc.pid, tree=False), time.monotonic()
                r = await closed_loop(url, proc.pid, args.workers_clients, stream, args.duration, args.warmup_s)
                wall = time.monotonic() - t0  # warm-up included: these two shares are over the whole row
                r["backend_cpu_share"] = (cpu_seconds(backend_pid) - b0) / wall
                # N >= 2: the brain process alone (the router's own pid; its workers are its children)
                r["brain_cpu_share"] = (cpu_seconds(proc.pid, tree=False) - brain0) / wall if n > 1 else None
                r["workers"], r["loadavg"] = n, loadavg()
                rows.append(r)
                log(f"ARES --workers {n}, {args.workers_clients} clients {'stream' if stream else 'non-stream'}: "
                    f"{r['req_per_s']:.0f} req/s, {_num(r['router_cpu_ms_per_request'], 3)} ms CPU/request, router "
                    f"{r['router_cpu_share']:.0%} of a core (brain {_num(r['brain_cpu_share'], 2)}), backend "
                    f"{r['backend_cpu_share']:.0%}, client "
                    f"{r['client_cpu_share']:.0%}, errors {r['errors']}")  # fmt: skip
        finally:
            stop(proc)
    return {"clients": args.workers_clients, "rows": rows}


def workers_target(w: dict | None) -> dict:
    """`2 workers >= 1.7x one worker` (throughput at the phase's clients, stream and non-stream both)."""
    if not w:
        return {"met": None, "note": "not measured in this run (--workers)"}
    by = {(r["workers"], r["stream"]): r for r in w["rows"]}
    cases = []
    for stream in (False, True):
        one, two = by.get((1, stream)), by.get((2, stream))
        if one and two and one["req_per_s"]:
            ratio = two["req_per_s"] / one["req_per_s"]
            cases.append({"stream": stream, "one_req_per_s": one["req_per_s"], "two_req_per_s": two["req_per_s"],
                          "ratio": ratio, "met": ratio >= 1.7})  # fmt: skip
    return {"clients": w["clients"], "cores": os.cpu_count(), "cases": cases,
            "met": all(c["met"] for c in cases) if cases else None}  # fmt: skip


def run_workers_only(args: argparse.Namespace) -> int:
    """`--workers-only`: the workers phase alone, merged into the existing results (targets and report redone)."""
    path = OUT / "router_vs_sglang.json"
    doc = json.loads(path.read_text())
    logs = Path(tempfile.mkdtemp(prefix="ares-router-workers-"))
    log(f"logs in {logs}")
    pp, dp = free_ports(2)
    backend = start_backend(pp, dp, 16, 0.1, logs / "backend.log")
    t0, before = time.time(), loadavg()
    try:
        wait_http(f"http://{HOST}:{dp}/health", proc=backend)
        w = asyncio.run(workers_phase(args, f"http://{HOST}:{pp}", f"http://{HOST}:{dp}", backend.pid, logs))
    finally:
        stop(backend)
    w.update(command=" ".join(["python", "benchmark/router_vs_sglang.py", *sys.argv[1:]]), git=record(ROOT),
             loadavg_before=before, loadavg_after=loadavg(), wall_s=time.time() - t0, duration=args.duration,
             warmup_s=args.warmup_s, machine=f"{platform.machine()}, {os.cpu_count()} CPUs")  # fmt: skip
    doc["workers"] = w
    doc["targets"] = targets_met(doc)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    (OUT / "router_vs_sglang.md").write_text(md)
    plot(doc, OUT / "router_vs_sglang.png")
    print(md)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------------------------------
def _package(file: str) -> str:
    """The package a frame's file belongs to: `aiohttp`, `numpy`, `asyncio`, or `ares_router/<module>.py`."""
    if "/ares_router/" in file:
        return "ares_router/" + file.split("/ares_router/", 1)[1]
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1].split("/")[0]
    parts = file.split("/")
    if len(parts) > 1 and parts[-2].startswith("python3"):
        return "stdlib " + parts[-1]
    return parts[-2] if len(parts) > 1 else file


def summarise_profile(collapsed: Path, top: int = 25) -> dict:
    """From py-spy's collapsed stacks (`func (file:line);... count`, full file names): self time by function and by
    package, and inclusive time of the ARES router's own functions."""
    self_fn: Counter = Counter()
    self_pkg: Counter = Counter()
    incl_ares: Counter = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        seen = set()
        for f in frames:
            func, _, loc = f.rpartition(" (")
            file = loc.rsplit(":", 1)[0]
            if "/ares_router/" in file and not file.endswith(("/cli.py", "/__main__.py")):  # not the roots
                key = f"{func} ({_package(file)})"
                if key not in seen:
                    seen.add(key)
                    incl_ares[key] += n
        func, _, loc = frames[-1].rpartition(" (")
        file = loc.rsplit(":", 1)[0]
        self_fn[f"{func} ({file.rsplit('/', 1)[-1]})"] += n
        self_pkg[_package(file)] += n
    pct = (lambda n: round(100.0 * n / total, 1)) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "self_top": [[k, pct(v)] for k, v in self_fn.most_common(top)],
        "self_by_package": [[k, pct(v)] for k, v in self_pkg.most_common(top)],
        "inclusive_ares_router": [[k, pct(v)] for k, v in incl_ares.most_common(top)],
    }


async def profile_ares(base: str, pid: int, seconds: float, out: Path) -> dict:
    """py-spy on the ARES router while 64 clients stream through it."""
    spy = Path(sys.executable).parent / "py-spy"
    opts = ["--duration", str(int(seconds)), "--rate", "200", "--format", "raw", "--full-filenames", "--nonblocking"]
    proc = await asyncio.create_subprocess_exec(
        str(spy), "record", "--pid", str(pid), *opts, "-o", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    load = await closed_loop(base, pid, 64, True, seconds, 0.0)
    _, err = await proc.communicate()
    if proc.returncode != 0 or not out.exists():
        return {"error": err.decode()[-1000:], "load": load}
    return {"command": "py-spy record --pid PID " + " ".join(opts), "load": load, **summarise_profile(out)}


# ---------------------------------------------------------------------------------------------------------------
# Targets, report
# ---------------------------------------------------------------------------------------------------------------
def targets_met(doc: dict) -> dict:
    """Issue 21's targets, each with the figures it was judged on and `met` (None: not measured in this run)."""
    thr = {(r["router"], r["clients"], r["stream"]): r for r in doc["throughput"]}
    lat = doc["latency"]
    out: dict = {}

    def cpu(router: str, clients: int, stream: bool) -> float | None:
        r = thr.get((router, clients, stream))
        return r["router_cpu_ms_per_request"] if r else None

    pairs = []
    for clients in doc["config"]["clients"]:
        for stream in (False, True):
            a, s = cpu("ares", clients, stream), cpu("sglang", clients, stream)
            if a is not None and s is not None:
                pairs.append({"clients": clients, "stream": stream, "ares_ms": a, "sglang_ms": s, "met": a <= s})
    out["cpu_per_request_le_sglang"] = {"cases": pairs, "met": all(p["met"] for p in pairs) if pairs else None}
    a, s = thr.get(("ares", 64, False)), thr.get(("sglang", 64, False))
    out["non_stream_throughput_64_ge_sglang"] = {
        "ares_req_per_s": a and a["req_per_s"],
        "sglang_req_per_s": s and s["req_per_s"],
        "met": (a["req_per_s"] >= s["req_per_s"]) if a and s else None,
    }
    ns, st = lat["non_stream"], lat["stream"]
    out["added_p50_le_sglang_non_stream"] = {
        "ares_ms": ns["ares"]["added_p50_ms"],
        "sglang_ms": ns["sglang"]["added_p50_ms"],
        "met": ns["ares"]["added_p50_ms"] <= ns["sglang"]["added_p50_ms"],
    }
    out["added_p50_stream_le_1ms"] = {"ares_ms": st["ares"]["added_p50_ms"], "met": st["ares"]["added_p50_ms"] <= 1.0}
    out["idle_cpu_le_5ms_per_s"] = {"ares_ms_per_s": doc["idle_cpu_ms_per_s"]["ares"],
                                   "met": doc["idle_cpu_ms_per_s"]["ares"] <= 5.0}  # fmt: skip
    poll = doc.get("poll")
    # Judged on CPU time per round over the interval (what a core must give the poller), not on the live loop's CPU
    # share: on a shared, oversubscribed machine the share is capped by what the scheduler grants the process.
    share = poll and poll["router_cpu_per_round_p50_ms"] / 100.0
    out["poll_round_256_le_10pct_core"] = {
        "cpu_per_round_ms": poll and poll["router_cpu_per_round_p50_ms"],
        "core_fraction_at_100ms": share,
        "live_router_cpu_share": poll and poll["live_router_cpu_share"],
        "loop_lag_p99_ms": poll and (poll.get("loop_lag") or {}).get("p99_ms"),
        "met": (share <= 0.10) if poll else None,
    }
    big = [r for r in doc["streams"] if r["target"] == "ares" and r["streams"] == max(doc["config"]["streams"])]
    gap = big[0]["max_gap_beyond_backend_ms"] if big else None
    out[f"no_gap_above_100ms_at_{max(doc['config']['streams'])}_streams"] = {
        "ares_max_gap_beyond_backend_ms": gap,
        "failed": big[0]["failed"] if big else None,
        "met": (gap is not None and gap <= 100.0 and not big[0]["failed"]) if big else None,
    }
    out["two_workers_ge_1_7x_one"] = workers_target(doc.get("workers"))
    return out


def markdown(doc: dict) -> str:
    cfg = doc["config"]
    L = [
        "# ARES router vs SGLang's Rust router (sglang-router 0.3.2, PD, round robin)",
        "",
        f"`{doc['command']}` at commit `{doc['git']['commit'][:12]}`"
        f"{DIRTY if doc['git'].get('dirty') else ''}. Machine: {doc['machine']}. Load average "
        f"(1/5/15 min) before: {doc['loadavg_before']}, after: {doc['loadavg_after']} (shared machine: other jobs "
        f"ran beside it). ARES policy `{cfg['ares_policy']}`; both routers log at warning level.",
        "",
        "Loopback backend (`benchmark/router_loopback.py`): one prefill + one decode port answering instantly (a "
        "16-event stream or one JSON body), or streaming at 10 tok/s. Client: lean keep-alive HTTP/1.1, this "
        "process. Router CPU from `/proc/<pid>/stat` (user + system, process tree).",
        "",
        "## Targets",
        "",
        "| target | figures | met |",
        "|---|---|---|",
    ]
    for name, t in doc["targets"].items():
        figs = {k: v for k, v in t.items() if k != "met"}
        L.append(f"| {name} | `{json.dumps(_rounded(figs))}` | {_flag(t['met'])} |")
    L += ["", "## Added latency, one client (ms)", ""]
    L += ["| request | direct p50 / p99 | ARES added p50 / p99 | SGLang added p50 / p99 |", "|---|---|---|---|"]
    for mode in ("non_stream", "stream"):
        r = doc["latency"][mode]
        L.append(
            f"| {mode.replace('_', '-')} | {r['direct']['p50']:.3f} / {r['direct']['p99']:.3f} | "
            f"{r['ares']['added_p50_ms']:.3f} / {r['ares']['added_p99_ms']:.3f} | "
            f"{r['sglang']['added_p50_ms']:.3f} / {r['sglang']['added_p99_ms']:.3f} |"
        )
    L += ["", f"{doc['latency']['non_stream']['requests_each']} requests per path and mode.", "",
          "## Throughput and router CPU per request", "",
          "| clients | request | router | req/s | latency p50 / p99 (ms) | router CPU/request (ms) | router CPU "
          "share | client CPU share | errors |", "|---:|---|---|---:|---|---:|---:|---:|---|"]  # fmt: skip
    for r in doc["throughput"]:
        L.append(
            f"| {r['clients']} | {'stream' if r['stream'] else 'non-stream'} | {r['router']} | {r['req_per_s']:.0f} | "
            f"{r['latency_ms']['p50']:.1f} / {r['latency_ms']['p99']:.1f} | "
            f"{_num(r['router_cpu_ms_per_request'], 3)} | {r['router_cpu_share']:.0%} | {r['client_cpu_share']:.0%} | "
            f"{r['errors'] or ''} |"
        )
    L += ["", f"{cfg['duration']} s per row after {cfg['warmup_s']} s of warm-up.", "",
          "## Idle CPU", "", "| router | ms of CPU per second |", "|---|---:|"]  # fmt: skip
    for k, v in doc["idle_cpu_ms_per_s"].items():
        L.append(f"| {k} | {v:.1f} |")
    L += workers_markdown(doc.get("workers"))
    L += ["", f"## Paced streams ({cfg['stream_tokens']} events at 10 tok/s each, started over "
          f"{cfg['stream_spread_s']} s)", "",
          "| streams | path | max gap beyond the backend's (ms) | per-stream max gap p50 / p99 (ms) | max gap seen "
          "(ms) | delivery lag p50 / p99 / max (ms) | router CPU share | router CPU/event (us) | client CPU share "
          "| failed |", "|---:|---|---:|---|---:|---|---:|---:|---:|---|"]  # fmt: skip
    for r in doc["streams"]:
        pm, lg = r["per_stream_max_gap_beyond_backend_ms"], r["delivery_lag_ms"]
        L.append(
            f"| {r['streams']} | {r['target']} | {_num(r['max_gap_beyond_backend_ms'], 1)} | {pm['p50']:.1f} / "
            f"{pm['p99']:.1f} | {_num(r['max_gap_seen_ms'], 1)} | {lg['p50']:.1f} / {lg['p99']:.1f} / "
            f"{lg['max']:.1f} | {r['router_cpu_share']:.0%} | {_num(r['router_cpu_us_per_event'], 1)} | "
            f"{r['client_cpu_share']:.0%} | {r['failed'] or ''} |"
        )
    L += ["", "`direct`: the client on the decode port, no router: what the client and the backend add by "
          "themselves on this machine.", ""]  # fmt: skip
    poll = doc.get("poll")
    if poll:
        cpu_round = poll["router_cpu_per_round_p50_ms"]
        L += [
            "## Poll cost (256 instances x 256 running requests, schema 2)",
            "",
            f"`{poll['command']}`: round p99 {poll['round_p99_ms']:.1f} ms, router CPU {cpu_round:.1f} ms per round; "
            f"live loop at 100 ms: {poll['live_router_cpu_share']:.0%} of a core, "
            f"{poll['live_rounds_per_s']:.2f} rounds/s.",
            "",
        ]
    prof = doc.get("profile")
    if prof and "self_top" in prof:
        L += ["## Profile: ARES router, 64 clients streaming", "",
              f"`{prof['command']}` ({prof['samples']} samples; {prof['load']['req_per_s']:.0f} req/s meanwhile). "
              "Collapsed stacks: `router_vs_sglang_profile.txt`.", "",
              "| function (file), self time | % of samples |", "|---|---:|"]  # fmt: skip
        L += [f"| `{k}` | {v} |" for k, v in prof["self_top"][:20]]
        L += ["", "| package, self time | % of samples |", "|---|---:|"]
        L += [f"| `{k}` | {v} |" for k, v in prof["self_by_package"][:15]]
        L += ["", "| ARES router function, inclusive | % of samples |", "|---|---:|"]
        L += [f"| `{k}` | {v} |" for k, v in prof["inclusive_ares_router"][:20]]
        L.append("")
    if doc.get("profile_notes"):
        L += ["### Where the time went", "", doc["profile_notes"], ""]
    return "\n".join(L) + "\n"


def workers_markdown(w: dict | None) -> list[str]:
    """The workers phase as a table (nothing when it did not run)."""
    if not w:
        return []
    L = ["", f"## ARES with relay workers (`--workers N`, {w['clients']} clients)", ""]
    if w.get("command"):
        L += [f"`{w['command']}` at commit `{w['git']['commit'][:12]}`{DIRTY if w['git'].get('dirty') else ''}, "
              f"load average before {w['loadavg_before']}, after {w['loadavg_after']}; {w['duration']} s per row "
              f"after {w['warmup_s']} s of warm-up.", ""]  # fmt: skip
    L += ["| workers | request | req/s | latency p50 / p99 (ms) | router CPU/request (ms) | router CPU share | "
          "of which the brain | backend CPU share | client CPU share | errors |",
          "|---:|---|---:|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in w["rows"]:
        L.append(
            f"| {r['workers']} | {'stream' if r['stream'] else 'non-stream'} | {r['req_per_s']:.0f} | "
            f"{r['latency_ms']['p50']:.1f} / {r['latency_ms']['p99']:.1f} | {_num(r['router_cpu_ms_per_request'], 3)} "
            f"| {r['router_cpu_share']:.0%} | {_share(r.get('brain_cpu_share'))} | {r['backend_cpu_share']:.0%} | "
            f"{r['client_cpu_share']:.0%} | "
            f"{r['errors'] or ''} |"
        )
    L += ["", "1 worker is the single-process router; N >= 2 is one brain process and N relay workers on one port "
          "(CPU of the whole process tree). Router, backend and client share the machine's cores.", ""]  # fmt: skip
    return L


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _rounded(x: object) -> object:
    """`x` with every float rounded to 3 digits (readable figures in a table cell)."""
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_rounded(v) for v in x]
    return x


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _flag(met: bool | None) -> str:
    return "not measured" if met is None else ("yes" if met else "**no**")


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    colors = {"ares": "tab:blue", "sglang": "tab:orange", "direct": "tab:gray"}
    w = 0.38
    # (a) added latency
    modes = ("non_stream", "stream")
    for i, r in enumerate(ROUTERS):
        p50 = [doc["latency"][m][r]["added_p50_ms"] for m in modes]
        p99 = [doc["latency"][m][r]["added_p99_ms"] for m in modes]
        x = np.arange(len(modes)) + (i - 0.5) * w
        ax[0, 0].bar(x, p50, w, color=colors[r], label=f"{r} p50")
        ax[0, 0].scatter(x, p99, color="k", marker="_", s=200, zorder=3, label="p99" if i == 0 else None)
    ax[0, 0].set_xticks(range(len(modes)), ["non-stream", "stream (16 events)"])
    ax[0, 0].set_ylabel("added latency, one client (ms)")
    ax[0, 0].legend()
    # (b) throughput, (c) CPU per request
    cases = [(c, s) for c in doc["config"]["clients"] for s in (False, True)]
    labels = [f"{c} cl.\n{'stream' if s else 'non-str.'}" for c, s in cases]
    thr = {(r["router"], r["clients"], r["stream"]): r for r in doc["throughput"]}
    for i, r in enumerate(ROUTERS):
        x = np.arange(len(cases)) + (i - 0.5) * w
        ax[0, 1].bar(x, [thr[(r, c, s)]["req_per_s"] if (r, c, s) in thr else 0 for c, s in cases], w,
                     color=colors[r], label=r)  # fmt: skip
        ax[1, 0].bar(x, [(thr[(r, c, s)]["router_cpu_ms_per_request"] or 0) if (r, c, s) in thr else 0
                         for c, s in cases], w, color=colors[r], label=r)  # fmt: skip
    for a, yl in ((ax[0, 1], "requests / s"), (ax[1, 0], "router CPU per request (ms)")):
        a.set_xticks(range(len(cases)), labels)
        a.set_ylabel(yl)
        a.legend()
    # (d) paced streams: the largest gap beyond the backend's
    ns = doc["config"]["streams"]
    for i, t in enumerate(("direct", *ROUTERS)):
        vals = [next((r["max_gap_beyond_backend_ms"] or 0 for r in doc["streams"] if r["target"] == t and
                      r["streams"] == n), 0) for n in ns]  # fmt: skip
        ax[1, 1].bar(np.arange(len(ns)) + (i - 1) * 0.27, vals, 0.27, color=colors[t], label=t)
    ax[1, 1].axhline(100, color="r", ls="--", lw=1, label="target (ARES)")
    ax[1, 1].set_xticks(range(len(ns)), [f"{n} streams\n10 tok/s" for n in ns])
    ax[1, 1].set_ylabel("largest gap beyond the backend's (ms)")
    ax[1, 1].legend()
    fig.suptitle(
        f"ARES router vs SGLang router 0.3.2 (loopback, {doc['machine']}, load avg {doc['loadavg_before'][0]})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
async def run(args: argparse.Namespace, urls: dict[str, str], pids: dict[str, int], logs: Path) -> dict:
    doc: dict = {}
    for base in (urls["ares"], urls["sglang"]):
        await _ready(base)
    log("both routers answer; settling before the idle window")
    await asyncio.sleep(2.0)
    doc["idle_cpu_ms_per_s"] = await idle_cpu(pids, args.idle_seconds)
    log(f"idle CPU (ms/s): {doc['idle_cpu_ms_per_s']}")
    doc["latency"] = {}
    for stream in (False, True):
        mode = "stream" if stream else "non_stream"
        doc["latency"][mode] = r = await latency(
            {"direct": urls["direct"], "ares": urls["ares"], "sglang": urls["sglang"]}, args.requests, 50, stream
        )
        log(f"latency {mode}: added p50 ares {r['ares']['added_p50_ms']:.2f} ms, sglang "
            f"{r['sglang']['added_p50_ms']:.2f} ms")  # fmt: skip
    doc["throughput"] = []
    for clients in args.clients:
        for stream in (False, True):
            for router in ROUTERS:
                r = await closed_loop(urls[router], pids[router], clients, stream, args.duration, args.warmup_s)
                r["router"], r["loadavg"] = router, loadavg()
                doc["throughput"].append(r)
                log(f"{clients} clients {'stream' if stream else 'non-stream'} {router}: {r['req_per_s']:.0f} req/s, "
                    f"{_num(r['router_cpu_ms_per_request'], 3)} ms CPU/request, errors {r['errors']}")  # fmt: skip
    doc["streams"] = []
    for n in args.streams:
        for target in ("direct", *ROUTERS):
            r = await paced_streams(urls[target], pids.get(target), n, args.stream_tokens, args.stream_spread_s)
            r["target"], r["loadavg"] = target, loadavg()
            doc["streams"].append(r)
            log(f"{n} paced streams {target}: max gap beyond backend {_num(r['max_gap_beyond_backend_ms'], 1)} ms, "
                f"lag p99 {r['delivery_lag_ms']['p99']:.1f} ms, failed {r['failed']}")  # fmt: skip
            await asyncio.sleep(1.0)  # closed connections drain
    if args.profile_seconds > 0:
        log(f"profiling the ARES router for {args.profile_seconds:g} s under 64 streaming clients")
        doc["profile"] = await profile_ares(urls["ares"], pids["ares"], args.profile_seconds,
                                            OUT / "router_vs_sglang_profile.txt")  # fmt: skip
    return doc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a cut-down run (fewer requests, shorter windows)")
    p.add_argument("--requests", type=int, default=2000, help="latency: measured requests per path and mode")
    p.add_argument("--clients", default="64,512", help="throughput: comma-separated closed-loop client counts")
    p.add_argument("--duration", type=float, default=10.0, help="throughput: measured seconds per row")
    p.add_argument("--warmup-s", type=float, default=2.0, help="throughput: seconds before measuring")
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--streams", default="500,2000", help="comma-separated concurrent paced stream counts")
    p.add_argument("--stream-tokens", type=int, default=100, help="events per paced stream (10 s at 10 tok/s)")
    p.add_argument("--stream-spread-s", type=float, default=1.0, help="paced streams start evenly over this")
    p.add_argument("--ares-policy", default="ares")
    p.add_argument("--profile-seconds", type=float, default=15.0, help="py-spy on ARES (0: no profile)")
    p.add_argument("--skip-poll", action="store_true", help="no poll-cost phase (its target is then not judged)")
    p.add_argument("--workers", default="1,2,4", help="ARES --workers counts to measure (empty: no workers phase)")
    p.add_argument("--workers-clients", type=int, default=64, help="workers phase: closed-loop clients")
    p.add_argument(
        "--workers-only",
        action="store_true",
        help="run only the workers phase and merge it into the existing router_vs_sglang.json (targets redone)",
    )
    p.add_argument("--poll-cycles", type=int, default=50)
    p.add_argument("--poll-live-seconds", type=float, default=5.0)
    p.add_argument(
        "--profile-notes", type=Path, help="a markdown file with a reading of the profile, copied into the markdown"
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="no measurement: rewrite the markdown and PNG from the existing JSON (e.g. with --profile-notes)",
    )
    args = p.parse_args()
    if args.render_only:
        doc = json.loads((OUT / "router_vs_sglang.json").read_text())
        if args.profile_notes:
            doc["profile_notes"] = args.profile_notes.read_text().strip()
            doc["profile_notes_file"] = str(args.profile_notes)
            (OUT / "router_vs_sglang.json").write_text(json.dumps(doc, indent=1) + "\n")
        (OUT / "router_vs_sglang.md").write_text(markdown(doc))
        plot(doc, OUT / "router_vs_sglang.png")
        return 0
    if args.quick:
        args.requests, args.duration, args.warmup_s, args.idle_seconds = 300, 4.0, 1.0, 5.0
        args.stream_tokens, args.profile_seconds, args.poll_cycles, args.poll_live_seconds = 30, 8.0, 20, 3.0
    args.clients = [int(x) for x in str(args.clients).split(",") if x]
    args.streams = [int(x) for x in str(args.streams).split(",") if x]
    args.workers = [int(x) for x in str(args.workers).split(",") if x]
    if args.stream_tokens <= INSTANT_MAX_TOKENS:
        p.error(f"--stream-tokens must be above {INSTANT_MAX_TOKENS} (the backend paces only those)")
    raise_nofile()
    use_uvloop()
    if args.workers_only:
        return run_workers_only(args)
    t0 = time.time()
    doc: dict = {
        "command": " ".join(["python", "benchmark/router_vs_sglang.py", *sys.argv[1:]]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "loadavg_before": loadavg(),
    }
    logs = Path(tempfile.mkdtemp(prefix="ares-router-vs-sglang-"))  # process logs, kept for a look after the run
    log(f"logs in {logs}")
    pp, dp, ap, sp = free_ports(4)
    backend = start_backend(pp, dp, 16, 0.1, logs / "backend.log")
    procs = {}
    try:
        wait_http(f"http://{HOST}:{dp}/health", proc=backend)
        for kind, port in (("ares", ap), ("sglang", sp)):
            procs[kind] = subprocess.Popen(
                router_argv(kind, f"http://{HOST}:{pp}", f"http://{HOST}:{dp}", port, args),
                start_new_session=True,
                stdout=open(logs / f"{kind}.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
            )
        urls = {"direct": f"http://{HOST}:{dp}", "ares": f"http://{HOST}:{ap}", "sglang": f"http://{HOST}:{sp}"}
        for kind in ROUTERS:
            wait_http(urls[kind] + "/health", timeout_s=120, proc=procs[kind])
        doc.update(asyncio.run(run(args, urls, {k: p.pid for k, p in procs.items()}, logs)))
        for proc in procs.values():  # the workers phase starts its own ARES routers
            stop(proc)
        procs = {}
        if args.workers:
            doc["workers"] = asyncio.run(workers_phase(args, f"http://{HOST}:{pp}", f"http://{HOST}:{dp}",
                                                       backend.pid, logs))  # fmt: skip
    finally:
        for proc in procs.values():
            stop(proc)
        stop(backend)
    if not args.skip_poll:
        log("poll cost at 256 instances (router_poll_bench.py)")
        doc["poll"] = poll_cost(args, logs)
    doc["loadavg_after"] = loadavg()
    doc["wall_s"] = time.time() - t0
    doc["git"] = record(ROOT)
    doc["targets"] = targets_met(doc)
    doc["profile_notes"] = args.profile_notes.read_text().strip() if args.profile_notes else ""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "router_vs_sglang.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    (OUT / "router_vs_sglang.md").write_text(md)
    plot(doc, OUT / "router_vs_sglang.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
