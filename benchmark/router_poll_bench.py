"""ARES router at scale: the cost of one poll cycle (every decode server's `/ares/state` fetched and parsed, then the
snapshot rebuilt) with 64 and 256 decode instances x 256 running requests each, on one core.

Stand-in servers: `--server-procs` processes (pinned to the cores the router does not use), each serving a share of
the instances on one port per instance (aiohttp, 127.0.0.1). Each instance answers `/ares/state` with a realistic
body: version 1 (rows, with the extra per-request fields the ARES engine's report carries today) or, when asked
with `?format=columns`, version 2 (columns; schema in `ares_router/poller.py`). The bodies change between polls:
`--variants` precomputed states per instance, served in turn, in which every request has grown by one token, its
prediction has moved, and a few requests have finished and been replaced by new ones.

Router side: the real `Poller` and `RouterState` (policy `ares`, uvloop as `python -m ares_router` runs) in this
process, pinned to `--router-core` with `os.sched_setaffinity`. The router relays `--tracked` of the reported
requests itself (it dispatched them), as it would in production, so the rebuild joins its own bookkeeping with the
reports. Two measurements per configuration:

1. back to back: `--cycles` poll rounds (after `--warmup`), each timed in its two phases: HTTP + parse (all
   servers concurrently, `Poller.last_fetch_s`) and snapshot rebuild (`RouterState.refresh`, `last_refresh_s`),
   plus the router process's CPU time per round;
2. live: the poller's own loop at `--interval` (100 ms) for `--live-seconds`: rounds achieved per second, and the
   router's CPU share.

"Holds" = the p99 round (HTTP + parse + rebuild) fits in the interval and the live loop keeps >= 95% of its rounds.

Writes benchmark/results/router_poll_bench.json and .md. Run: `python benchmark/router_poll_bench.py`
(cut it down: `--instances 64 --reqs 64 --cycles 20 --live-seconds 2`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
from provenance import record
from router_loopback import use_uvloop

OUT = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# Stand-in decode servers (own processes: `router_poll_bench.py --serve FIRST COUNT ...`)
# ---------------------------------------------------------------------------------------------------------------
def _base(index: int, reqs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """One instance's running requests at the first poll: prompt, generated, predicted remaining, rids."""
    rng = np.random.default_rng([seed, index])
    prompt = np.clip(rng.lognormal(6.0, 1.0, reqs), 16, 8000).astype(np.int64)
    generated = rng.integers(1, 2000, reqs)
    remaining = np.clip(rng.lognormal(5.5, 1.0, reqs), 1, 16000)
    rids = [f"{index:06x}{k:06x}" + rng.bytes(10).hex() for k in range(reqs)]  # 32 hex, like the router's
    return prompt, generated, remaining, rids


def _churn(reqs: int) -> int:
    return max(1, reqs // 64)  # requests that finish (and are replaced) between two polls


def stable_rids(index: int, reqs: int, variants: int, seed: int) -> list[str]:
    """The rids of one instance that stay running for the whole run (no variant replaces them)."""
    return _base(index, reqs, seed)[3][_churn(reqs) * variants :]


FORMATS = ("v1", "v2", "v2-lists")  # rows; columns in base64 binary (the fast form); columns as JSON arrays


def _b64(values: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode("ascii")


def instance_states(index: int, reqs: int, variants: int, seed: int) -> dict[str, list[bytes]]:
    """Precomputed `/ares/state` bodies of one instance, per format (`FORMATS`) and variant. Variant v is the state
    v polls later: every request one token further, its prediction moved (the head's estimate shrinks by ~1 per
    token, with noise), and `_churn` requests per poll finished and replaced by new ones."""
    prompt, generated, remaining, rids = _base(index, reqs, seed)
    churn = _churn(reqs)
    bodies: dict[str, list[bytes]] = {f: [] for f in FORMATS}
    for v in range(variants):
        rng = np.random.default_rng([seed, index, v + 1])
        vr = list(rids)
        for k in range(v * churn, min((v + 1) * churn, reqs)):  # these finished; new requests took their slots
            vr[k] = f"{index:06x}{k:06x}" + f"{v:04x}" + rng.bytes(8).hex()
        gen = generated + v
        pred = np.maximum(remaining - v + rng.normal(0, 3, reqs), 1.0).round(2)
        p90 = (pred * 1.8).round(2)
        used = int((prompt + gen).sum())
        common = {"capacity_tokens": int(used * 1.25), "used_tokens": used, "queued_reqs": int(v % 3)}
        rows = [
            {
                "rid": vr[k],
                "prompt_tokens": int(prompt[k]),
                "generated_tokens": int(gen[k]),
                "predicted_remaining": float(pred[k]),
                "predicted_p90": float(p90[k]),
                # What the ARES engine's version-1 report also carries today (the router ignores them).
                "smoothed_remaining": float(pred[k]),
                "predicted_at_generated": int(gen[k]),
                "prediction_step": int(gen[k]),
            }
            for k in range(reqs)
        ]
        bodies["v1"].append(orjson.dumps({"version": 1, **common, "requests": rows}))
        columns = {"version": 2, **common, "rids": vr}
        bodies["v2-lists"].append(
            orjson.dumps(
                {
                    **columns,
                    "prompt_tokens": prompt.tolist(),
                    "generated_tokens": gen.tolist(),
                    "predicted_remaining": pred.tolist(),
                    "predicted_p90": p90.tolist(),
                }
            )
        )
        bodies["v2"].append(
            orjson.dumps(
                {
                    **columns,
                    "prompt_tokens": _b64(prompt, "<i4"),
                    "generated_tokens": _b64(gen, "<i4"),
                    "predicted_remaining": _b64(pred, "<f4"),
                    "predicted_p90": _b64(p90, "<f4"),
                }
            )
        )
    return bodies


async def _serve(first: int, count: int, reqs: int, variants: int, seed: int, slow: int, slow_delay: float) -> None:
    from aiohttp import web

    bodies = [instance_states(i, reqs, variants, seed) for i in range(first, first + count)]
    turn = [0] * count
    port_of_slot: dict[int, int] = {}
    loads = orjson.dumps({"loads": [{"num_running_reqs": 0, "num_used_tokens": 0, "max_total_num_tokens": 10**6}]})
    models = orjson.dumps({"object": "list", "data": [{"id": "bench-model", "object": "model"}]})

    async def state(request: web.Request) -> web.Response:
        slot = port_of_slot[request.transport.get_extra_info("sockname")[1]]
        v = turn[slot] % variants
        turn[slot] += 1  # the next poll sees the next state
        # Version 2 when asked with ?format=columns; `bench` (this benchmark only) picks the column encoding.
        fmt = "v1" if request.query.get("format") != "columns" else request.query.get("bench", "v2")
        if first + slot < slow:  # a slow server: its answer comes `slow_delay` late (an overloaded CPU server)
            await asyncio.sleep(slow_delay)
        return web.Response(body=bodies[slot][fmt][v], content_type="application/json")

    async def fixed(request: web.Request) -> web.Response:
        return web.Response(body=models if request.path == "/v1/models" else loads, content_type="application/json")

    app = web.Application()
    app.router.add_get("/ares/state", state)
    app.router.add_get("/v1/loads", fixed)
    app.router.add_get("/v1/models", fixed)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = []
    for slot in range(count):
        site = web.TCPSite(runner, HOST, 0, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
        port_of_slot[port] = slot
        ports.append(port)
    print(json.dumps({"ports": ports}), flush=True)  # the parent reads this line
    await asyncio.Event().wait()


# ---------------------------------------------------------------------------------------------------------------
# Router side
# ---------------------------------------------------------------------------------------------------------------
def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_servers(
    n: int, args: argparse.Namespace, cores: set[int], slow: int = 0
) -> tuple[list[subprocess.Popen], list[str]]:
    """`args.server_procs` stand-in processes serving `n` instances (the first `slow` answer `args.slow_delay` s
    late); their URLs in instance order."""
    procs, urls = [], []
    per = -(-n // args.server_procs)
    for first in range(0, n, per):
        count = min(per, n - first)
        p = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(first), str(count), "--reqs", str(args.reqs),
             "--variants", str(args.variants), "--seed", str(args.seed), "--slow-instances", str(slow),
             "--slow-delay", str(args.slow_delay)],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        if cores:
            os.sched_setaffinity(p.pid, cores)  # off the router's core
        procs.append(p)
    for p in procs:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError("a stand-in server process exited before listening")
        urls += [f"http://{HOST}:{port}" for port in json.loads(line)["ports"]]
    return procs, urls


def stop_servers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _pct(x: list[float] | np.ndarray) -> dict | None:
    a = np.asarray(x) * 1e3
    if not a.size:
        return None
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "max_ms": float(a.max()),
    }


async def _lag_probe(out: list[float], period: float = 0.002) -> None:
    """How late the event loop wakes a task that asked to sleep `period`: what every relayed stream waits while the
    loop is busy (a snapshot rebuild on it stalls them all)."""
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(period)
        out.append(loop.time() - t - period)


async def measure(urls: list[str], fmt: str, args: argparse.Namespace, progress: bool, slow: int = 0) -> dict:
    """Back-to-back rounds, then the live loop, for one configuration. With `slow` instances (the first ones, each
    answering `args.slow_delay` s late) only the live loop runs, and what it measures is how old the other servers'
    reports are in each snapshot."""
    from tqdm import tqdm

    from ares_router.poller import Poller
    from ares_router.state import RouterState
    from ares_router.wire import STATE_PATH, STATE_QUERY

    n = len(urls)
    state = RouterState.create([(urls[0], 8998)], urls, "ares", seed=0)
    # The router relays (tracks) `--tracked` of the requests that stay for the whole run, as after dispatching them.
    tracked = 0
    for j in range(n):
        stable = stable_rids(j, args.reqs, args.variants, args.seed)
        for rid in stable[: int(len(stable) * args.tracked)]:
            t = state.start(rid, decode=j, prefill=0, prompt_tokens=500, max_tokens=4096)
            t.started = True
            tracked += 1
    poller = Poller(state, interval_s=3600.0, timeout_s=args.poll_timeout)  # rounds run by hand below
    if fmt == "v1":
        poller.ares_state_url_path = STATE_PATH  # ask as a router that only knew version 1 did (no query)
    elif fmt == "v2-lists":  # the stand-in then answers version 2 with JSON arrays (a server's choice)
        poller.ares_state_url_path = STATE_PATH + STATE_QUERY + "&bench=v2-lists"
    await poller.start()
    for _ in range(min(args.warmup, 2) if slow else args.warmup):
        await poller.poll_once()
    assert all(d.healthy and d.load.source == "ares_state" for d in state.decodes), [
        d.last_error for d in state.decodes if not d.healthy
    ]
    reported = sum(d.load.running_reqs for d in state.decodes)
    fetch, refresh, cpu = [], [], []
    cycles = 0 if slow else args.cycles
    bar = tqdm(range(cycles), desc=f"{n} instances, {fmt}", disable=not progress, leave=False)
    for _ in bar:
        c0 = time.process_time()
        await poller.poll_once()
        cpu.append(time.process_time() - c0)
        fetch.append(poller.last_fetch_s)
        refresh.append(poller.last_refresh_s)
    await poller.stop()
    total = np.array(fetch) + np.array(refresh)
    # Live: the poller's own loop at the target interval.
    ends: list[float] = []  # when each live round (snapshot) ended
    # How old the prompt servers' information is that a dispatch would see now: the snapshot in use holds, for each
    # server, its last report before that snapshot was built; sampled every 20 ms, independently of the rounds (a
    # sample taken right after a round would flatter a poller whose rounds wait for everyone).
    oldest = [time.monotonic()]  # the oldest prompt server's report time in the current snapshot
    ages: list[float] = []

    def on_round() -> None:
        ends.append(time.monotonic())
        oldest[0] = min(d.last_ok for d in state.decodes[slow:] if d.last_ok is not None)

    async def sample_ages() -> None:
        # From the first round of the loop on: start()'s own round waited for every server, the slow one included.
        while len(ends) < 2:
            await asyncio.sleep(0.005)
        while True:
            await asyncio.sleep(0.02)
            ages.append(time.monotonic() - oldest[0])

    live = Poller(state, interval_s=args.interval, timeout_s=args.poll_timeout, on_round=on_round)
    live.ares_state_url_path = poller.ares_state_url_path
    await live.start()
    lags: list[float] = []
    probe = asyncio.create_task(_lag_probe(lags))
    sampler = asyncio.create_task(sample_ages())
    w0, c0 = time.monotonic(), time.process_time()
    await asyncio.sleep(args.live_seconds)
    wall, cpu_live = time.monotonic() - w0, time.process_time() - c0
    probe.cancel()
    sampler.cancel()
    await live.stop()
    gaps = np.diff(ends[1:])  # the first round is start()'s own
    rounds = len(gaps)
    kept = args.interval / float(gaps.mean()) if rounds else 0.0
    p99 = float(np.percentile(total, 99) * 1e3) if total.size else float("nan")
    return {
        "instances": n,
        "requests_per_instance": args.reqs,
        "format": fmt,
        "reported_requests": reported,
        "tracked_requests": tracked,
        "body_bytes_per_instance": len(instance_states(0, args.reqs, 1, args.seed)[fmt][0]),
        "slow_instances": slow,
        "slow_delay_s": args.slow_delay if slow else None,
        "cycles": cycles,
        "http_parse": _pct(fetch),
        "rebuild": _pct(refresh),
        "round": _pct(total),
        "router_cpu_per_round": _pct(cpu),
        "live": {
            "interval_s": args.interval,
            "seconds": round(wall, 2),
            "rounds": rounds,
            "rounds_per_s": 1.0 / float(gaps.mean()) if rounds else 0.0,
            "round_gap_ms": _pct(gaps) if rounds else None,
            "kept_fraction": kept,
            "loop_lag": _pct(lags),  # event-loop lateness seen by a 2 ms sleeper: what relayed streams wait
            "prompt_servers_report_age": _pct(ages),
            "router_cpu_share": cpu_live / wall,
        },
        "holds_interval": bool(p99 <= args.interval * 1e3 and kept >= 0.95),
        "loadavg_after": list(os.getloadavg()),
    }


def machine(router_core: int | None, server_cores: set[int]) -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "router_core": router_core,
        "server_cores": sorted(server_cores),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def markdown(doc: dict) -> str:
    m, cfg = doc["machine"], doc["config"]
    lines = [
        "# ARES router: poll cycle cost at scale" + (f" ({doc['label']})" if doc.get("label") else ""),
        "",
        f"`{doc['command']}` at commit `{doc['git']['commit'][:12]}`"
        f"{' (working tree modified)' if doc['git']['dirty'] else ''}. Machine: {m['cpu_model']}, "
        f"{m['cpus']} CPUs; router pinned to core {m['router_core']}, {cfg['server_procs']} stand-in server "
        f"processes on cores {m['server_cores']}. Load average (1/5/15 min) before: {doc['loadavg_before']}, "
        f"after: {doc['loadavg_after']}.",
        "",
        f"Each instance reports {cfg['reqs']} running requests; bodies change every poll ({cfg['variants']} states "
        f"per instance in turn). The router tracks {cfg['tracked']:.0%} of the long-running requests itself. "
        f"{cfg['cycles']} back-to-back rounds after {cfg['warmup']} warm-up rounds; then the poller's own loop at "
        f"{cfg['interval'] * 1e3:.0f} ms for {cfg['live_seconds']} s.",
        "",
        "| instances | format | slow servers | body/instance | HTTP+parse p50 / p99 (ms) | rebuild p50 / p99 (ms) | "
        "round p50 / p99 (ms) | router CPU/round p50 (ms) | live rounds/s (kept) | router CPU share | "
        "loop lag p99 / max (ms) | prompt servers' oldest report in the snapshot in use, p50 / max (ms) | "
        f"{cfg['interval'] * 1e3:.0f} ms holds | load avg after |",
        "|---:|---|---|---:|---|---|---|---:|---|---:|---|---|---|---:|",
    ]

    def pair(x: dict | None, a: str = "p50_ms", b: str = "p99_ms") -> str:
        return "-" if x is None else f"{x[a]:.1f} / {x[b]:.1f}"

    for r in doc["results"]:
        lv = r["live"]
        slow = f"{r['slow_instances']} x {r['slow_delay_s']:g} s late" if r.get("slow_instances") else "none"
        cpu_round = r["router_cpu_per_round"]
        lines.append(
            f"| {r['instances']} | {r['format']} | {slow} | {r['body_bytes_per_instance'] / 1024:.1f} KiB | "
            f"{pair(r['http_parse'])} | {pair(r['rebuild'])} | {pair(r['round'])} | "
            f"{'-' if cpu_round is None else format(cpu_round['p50_ms'], '.1f')} | "
            f"{lv['rounds_per_s']:.2f} ({lv['kept_fraction']:.0%}) | {lv['router_cpu_share']:.0%} | "
            f"{pair(lv.get('loop_lag'), 'p99_ms', 'max_ms')} | "
            f"{pair(lv.get('prompt_servers_report_age'), 'p50_ms', 'max_ms')} | "
            f"{'yes' if r['holds_interval'] else 'no'} | {r['loadavg_after'][0]:.2f} |"
        )
    lines += ["", doc["conclusion"], ""]
    return "\n".join(lines)


def conclusion(results: list[dict], interval: float) -> str:
    ms = interval * 1e3
    parts = []
    for r in results:
        lv = r["live"]
        lag = lv.get("loop_lag") or {}
        if r.get("slow_instances"):
            age = lv.get("prompt_servers_report_age") or {}
            parts.append(
                f"{r['instances']} instances with {r['slow_instances']} answering {r['slow_delay_s']:g} s late: "
                f"the other servers' reports are at most {age.get('max_ms', float('nan')):.0f} ms old in a snapshot"
            )
            continue
        parts.append(
            f"{r['instances']} instances, {r['format']}: round p99 {r['round']['p99_ms']:.0f} ms, router CPU "
            f"{r['router_cpu_per_round']['p50_ms']:.0f} ms per round ({lv['router_cpu_share']:.0%} of the core "
            f"polling every {ms:.0f} ms), event-loop lag p99 {lag.get('p99_ms', float('nan')):.1f} ms / max "
            f"{lag.get('max_ms', float('nan')):.1f} ms: {'holds' if r['holds_interval'] else 'does not hold'}"
        )
    return "Result: " + "; ".join(parts) + "."


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", default="64,256", help="comma-separated decode instance counts")
    p.add_argument("--reqs", type=int, default=256, help="running requests per instance")
    p.add_argument("--cycles", type=int, default=200, help="back-to-back rounds measured per configuration")
    p.add_argument("--warmup", type=int, default=10, help="rounds before measuring")
    p.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help="report forms to measure: v1 (rows), v2 (columns, base64 binary), v2-lists (columns, JSON arrays)",
    )
    p.add_argument("--interval", type=float, default=0.1, help="poll interval to check (s)")
    p.add_argument("--live-seconds", type=float, default=10.0, help="seconds of the poller's own loop")
    p.add_argument("--poll-timeout", type=float, default=5.0, help="per-poll timeout (s)")
    p.add_argument("--tracked", type=float, default=1.0, help="fraction of long-running requests the router relays")
    p.add_argument("--variants", type=int, default=16, help="precomputed states per instance, served in turn")
    p.add_argument("--server-procs", type=int, default=2, help="stand-in server processes")
    p.add_argument("--router-core", type=int, default=0, help="the core the router process is pinned to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--slow-delay",
        type=float,
        default=0.0,
        help="> 0: per instance count, one more live run in which one server answers this many seconds late",
    )
    p.add_argument("--slow-instances", type=int, default=0, help=argparse.SUPPRESS)  # stand-in servers only
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", default=str(OUT), help="directory for router_poll_bench.{json,md}")
    p.add_argument("--label", default="", help="what this run measures, e.g. which poller (goes into the title)")
    p.add_argument("--serve", nargs=2, type=int, metavar=("FIRST", "COUNT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    _raise_nofile()
    if args.serve:
        asyncio.run(
            _serve(args.serve[0], args.serve[1], args.reqs, args.variants, args.seed, args.slow_instances,
                   args.slow_delay)
        )  # fmt: skip
        return 0
    for name, value in (("--reqs", args.reqs), ("--cycles", args.cycles), ("--variants", args.variants)):
        if value < 1:
            p.error(f"{name} must be >= 1")
    counts = [int(x) for x in args.instances.split(",") if x.strip()]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not counts or min(counts) < 1 or not formats or any(f not in FORMATS for f in formats):
        p.error(f"--instances takes positive integers, --formats some of {', '.join(FORMATS)}")
    available = os.sched_getaffinity(0)
    if args.router_core not in available:
        p.error(f"--router-core {args.router_core} is not one of this process's cores {sorted(available)}")
    server_cores = available - {args.router_core}
    use_uvloop()
    from tqdm import tqdm

    loadavg_before = list(os.getloadavg())
    results = []
    configs = [(n, f, 0) for n in counts for f in formats]
    if args.slow_delay > 0:  # one server answering late, the others promptly (live loop only)
        configs += [(n, "v2", 1) for n in counts]
    progress = not args.no_progress
    for n, fmt, slow in tqdm(configs, desc="configurations", disable=not progress):
        procs, urls = start_servers(n, args, server_cores, slow)
        os.sched_setaffinity(0, {args.router_core})  # the router: one core (servers were started off it)
        try:
            results.append(asyncio.run(measure(urls, fmt, args, progress, slow)))
        finally:
            os.sched_setaffinity(0, available)
            stop_servers(procs)
        r = results[-1]
        lv = r["live"]
        age, lag = lv["prompt_servers_report_age"] or {}, lv["loop_lag"] or {}
        tqdm.write(
            f"{n} instances {fmt}{f', {slow} slow' if slow else ''}: round p99 "
            f"{(r['round'] or {}).get('p99_ms', float('nan')):.1f} ms, live {lv['rounds_per_s']:.2f} rounds/s, "
            f"CPU share {lv['router_cpu_share']:.0%}, loop lag p99 {lag.get('p99_ms', float('nan')):.1f} ms, "
            f"prompt servers' report age max {age.get('max_ms', float('nan')):.0f} ms"
        )
    doc = {
        "command": " ".join(["python", "benchmark/router_poll_bench.py", *sys.argv[1:]]),
        "label": args.label,
        "poller_file": sys.modules["ares_router.poller"].__file__,  # which poller ran (a `--label`led run may differ)
        "git": record(ROOT),
        "machine": machine(args.router_core, server_cores),
        "config": {k: v for k, v in vars(args).items() if k not in ("serve", "out", "no_progress")},
        "loadavg_before": loadavg_before,
        "loadavg_after": list(os.getloadavg()),
        "results": results,
        "conclusion": conclusion(results, args.interval),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "router_poll_bench.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "router_poll_bench.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
