"""ARES router overhead: added latency on loopback, and policy decision time at scale.

1. Added latency. A loopback backend process (`router_loopback.py`) answers SGLang's endpoints instantly (prefill
   and decode roles on two ports; the decode role returns a fixed OpenAI chat completion, streamed as
   `--stream-chunks` SSE events or whole).
   The real router (`python -m ares_router`, its own process) sits in front of it. One client sends requests one at
   a time, alternating direct-to-decode and through-the-router, in the same run; the difference is what the router
   adds (validation, policy, bootstrap, the concurrent prefill request, relaying). Backend time is ~0 by design, so
   the difference is the router's own cost, not model noise.
2. Decision time. `RouterState.choose_decode` (the policy's dispatch plus the incremental snapshot update the
   router does per request) on a snapshot of `--instances` decode instances x `--running` running requests each,
   per policy; plus the per-poll snapshot rebuild (`RouterState.refresh`) at that scale.

Writes benchmark/results/router_overhead.json and .md. Rerun: `python benchmark/router_overhead.py`
(flags: --requests, --warmup, --stream-chunks, --instances, --running, --decisions, --policy,
--router-log-level).
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
from pathlib import Path

import numpy as np
from provenance import record
from router_loopback import HOST, start_backend, stop, wait_http

from ares.cluster.launcher import free_ports

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmark" / "results"


# ---------------------------------------------------------------------------------------------------------------
# Added latency
# ---------------------------------------------------------------------------------------------------------------
async def _measure(router: str, decode: str, n: int, warmup: int, stream: bool) -> dict[str, np.ndarray]:
    import aiohttp

    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, "stream": stream}
    ).encode()
    headers = {"Content-Type": "application/json"}
    out: dict[str, list[float]] = {"direct": [], "router": [], "direct_first": [], "router_first": []}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4)) as s:
        for i in range(warmup + n):
            # Alternate which path goes first, so slow drifts of the machine hit both equally.
            order = (("direct", decode), ("router", router)) if i % 2 else (("router", router), ("direct", decode))
            for name, base in order:
                t0 = time.perf_counter()
                async with s.post(base + "/v1/chat/completions", data=body, headers=headers) as r:
                    assert r.status == 200, r.status
                    await r.content.readany()
                    t1 = time.perf_counter()
                    await r.read()
                if i >= warmup:
                    out[name].append(time.perf_counter() - t0)
                    out[name + "_first"].append(t1 - t0)
    return {k: np.array(v) for k, v in out.items()}


def _pct(x: np.ndarray) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(x, 50) * 1e3), "p99_ms": float(np.percentile(x, 99) * 1e3)}


def added_latency(args: argparse.Namespace) -> dict:
    """Start the loopback backend and a router; measure direct vs routed latency, non-streaming and streaming."""
    pp, dp, rp = free_ports(3)
    logs = Path(tempfile.mkdtemp(prefix="ares-router-overhead-"))  # process logs, kept for a look after the run
    backend = start_backend(pp, dp, args.stream_chunks, 0.1, logs / "backend.log")
    router = None
    try:
        wait_http(f"http://{HOST}:{dp}/health")
        router_argv = [
            sys.executable, "-m", "ares_router", "--prefill", f"http://{HOST}:{pp}", "8998",
            "--decode", f"http://{HOST}:{dp}", "--policy", args.policy, "--host", HOST, "--port", str(rp),
            "--log-level", args.router_log_level,
        ]  # fmt: skip
        router = subprocess.Popen(
            router_argv,
            start_new_session=True,
            stdout=open(logs / "router.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        wait_http(f"http://{HOST}:{rp}/health")
        res = {}
        for stream in (False, True):
            lat = asyncio.run(
                _measure(f"http://{HOST}:{rp}", f"http://{HOST}:{dp}", args.requests, args.warmup, stream)
            )
            paired = lat["router"] - lat["direct"]
            res["stream" if stream else "non_stream"] = {
                "requests_each": int(len(paired)),
                "direct": _pct(lat["direct"]),
                "router": _pct(lat["router"]),
                "added_p50_ms": float(np.percentile(lat["router"], 50) - np.percentile(lat["direct"], 50)) * 1e3,
                "added_p99_ms": float(np.percentile(lat["router"], 99) - np.percentile(lat["direct"], 99)) * 1e3,
                "added_paired_median_ms": float(np.median(paired) * 1e3),
                "first_chunk_added_p50_ms": float(
                    np.percentile(lat["router_first"], 50) - np.percentile(lat["direct_first"], 50)
                )
                * 1e3,
            }
        return res
    finally:
        if router is not None:
            stop(router)
        stop(backend)


# ---------------------------------------------------------------------------------------------------------------
# Decision time
# ---------------------------------------------------------------------------------------------------------------
def decision_time(args: argparse.Namespace) -> dict:
    """Per-dispatch time of `RouterState.choose_decode` at instances x running, per policy; snapshot rebuild time."""
    from ares_router.state import DecodeLoad, ReportedRequest, RouterState

    rng = np.random.default_rng(0)
    out = {}
    for policy in ("ares", "least_kv", "round_robin", "random"):
        state = RouterState.create(
            [("http://p0", 8998)], [f"http://d{i}" for i in range(args.instances)], policy, seed=0
        )
        state.poll_ok(state.prefills[0], None, now=0.0)
        for d in state.decodes:
            reqs = tuple(
                ReportedRequest(
                    f"{d.index}-{k}",
                    int(rng.integers(100, 2000)),
                    int(rng.integers(1, 2000)),
                    float(rng.integers(1, 4000)),
                    None,
                )
                for k in range(args.running)
            )
            used = sum(r.prompt_tokens + r.generated_tokens for r in reqs)
            load = DecodeLoad.from_reports(max(used * 2, 1), int(used), reqs)
            state.poll_ok(d, load, now=0.0)
        t0 = time.perf_counter()
        for _ in range(5):
            state.refresh(now=0.0)
        rebuild = (time.perf_counter() - t0) / 5
        times = np.empty(args.decisions)
        for i in range(args.decisions):
            if i % 500 == 0:
                state.refresh(now=0.0)  # as after a poll: the incremental updates start over
            t = time.perf_counter()
            state.choose_decode(int(rng.integers(100, 2000)), 1024)
            times[i] = time.perf_counter() - t
        out[policy] = {
            "decision_us_p50": float(np.percentile(times, 50) * 1e6),
            "decision_us_p99": float(np.percentile(times, 99) * 1e6),
            "decision_us_mean": float(times.mean() * 1e6),
            "snapshot_rebuild_ms": rebuild * 1e3,
        }
    return out


def _markdown(doc: dict) -> str:
    lat, dec = doc["added_latency"], doc["decision_time"]
    lines = [
        "# ARES router overhead",
        "",
        f"Loopback backend, one client, requests one at a time, direct and routed interleaved in one run "
        f"({lat['non_stream']['requests_each']} each; streaming: {doc['config']['stream_chunks']} SSE events). "
        f"Machine: {doc['machine']}.",
        "",
        "| request | direct p50 / p99 (ms) | via router p50 / p99 (ms) | added p50 (ms) | added p99 (ms) | "
        "added p50, first chunk (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("non_stream", "stream"):
        r = lat[name]
        lines.append(
            f"| {name.replace('_', '-')} | {r['direct']['p50_ms']:.3f} / {r['direct']['p99_ms']:.3f} | "
            f"{r['router']['p50_ms']:.3f} / {r['router']['p99_ms']:.3f} | {r['added_p50_ms']:.3f} | "
            f"{r['added_p99_ms']:.3f} | {r['first_chunk_added_p50_ms']:.3f} |"
        )
    lines += [
        "",
        f"Policy decision (`RouterState.choose_decode`: dispatch + incremental snapshot update) at "
        f"{doc['config']['instances']} decode instances x {doc['config']['running']} running requests each, "
        f"{doc['config']['decisions']} decisions:",
        "",
        "| policy | p50 (us) | p99 (us) | mean (us) | snapshot rebuild per poll (ms) |",
        "|---|---|---|---|---|",
    ]
    for name, r in dec.items():
        lines.append(
            f"| {name} | {r['decision_us_p50']:.1f} | {r['decision_us_p99']:.1f} | {r['decision_us_mean']:.1f} | "
            f"{r['snapshot_rebuild_ms']:.1f} |"
        )
    lines += ["", f"Targets: added p50 < 1 ms; decision < 100 us. Load average during the run: {doc['loadavg']}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="measured requests per path and mode")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--stream-chunks", type=int, default=16, help="SSE events per streamed response")
    p.add_argument("--policy", default="ares", help="router policy for the latency run")
    p.add_argument("--router-log-level", default="info", help="router log level (info: one line per request)")
    p.add_argument("--instances", type=int, default=64)
    p.add_argument("--running", type=int, default=256)
    p.add_argument("--decisions", type=int, default=5000)
    args = p.parse_args()
    t0 = time.time()
    doc = {
        "config": vars(args),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "loadavg": None,
        "decision_time": decision_time(args),
        "added_latency": added_latency(args),
    }
    doc["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    doc["wall_s"] = time.time() - t0
    doc["provenance"] = record(ROOT)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "router_overhead.json").write_text(json.dumps(doc, indent=1))
    md = _markdown(doc)
    (OUT / "router_overhead.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
