"""What `--ares` costs a decode server, measured side by side in one run (CPU, SmolLM2-135M).

One cluster: 1 prefill + 2 decode servers, decode0 with `--ares` (the length head in every decode step, the state
service) and decode1 without. Each decode server gets its own ARES router (one decode each), so a batch goes exactly
where it should. For each batch size the two servers are measured in turn, `--reps` times, alternating.

Decode tokens/s of a batch: streaming requests with `ignore_eos` and equal `max_new_tokens`; the window runs from
the moment every request has its first token to the moment the first one finishes, so only steps with the whole
batch decoding count (prefill of the batch is excluded). Then `/ares/state` latency with `--poll-reqs` requests
running on decode0: sequential GETs, p50/p99.

    python benchmark/engine_overhead.py                       # batch 1, 8, 32; 3 reps; 64 requests polled
    python benchmark/engine_overhead.py --batches 1,8 --reps 1 --tokens 48   # cut down
Writes benchmark/results/engine_overhead.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import numpy as np
from provenance import commit_label
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "test"))

from http_helpers import ares_router  # noqa: E402

from ares.cluster import Cluster, ClusterSpec  # noqa: E402
from ares.models import prepare_model  # noqa: E402

PROMPT = "Write a long story about a dragon who learns to read."


async def _stream_one(session: aiohttp.ClientSession, url: str, ids: list[int], tokens: int) -> list[float]:
    """Arrival times of every output event of one streaming /generate request."""
    body = {
        "input_ids": ids,
        "stream": True,
        "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True},
    }
    times: list[float] = []
    async with session.post(url + "/generate", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"data:") and not line.startswith(b"data: [DONE]"):
                times.append(time.monotonic())
    return times


async def batch_throughput(url: str, ids: list[int], batch: int, tokens: int) -> float:
    """Decode tokens/s of `batch` concurrent requests while all of them decode."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
        streams = await asyncio.gather(*(_stream_one(s, url, ids, tokens) for _ in range(batch)))
    start = max(t[0] for t in streams)  # every request has its first token
    end = min(t[-1] for t in streams)  # the first request is done
    if end <= start:
        raise RuntimeError("no window with the whole batch decoding: raise --tokens")
    n = sum(sum(1 for x in t if start < x <= end) for t in streams)
    return n / (end - start)


async def poll_latency(state_url: str, url: str, ids: list[int], n_reqs: int, tokens: int, polls: int) -> dict:
    """`/ares/state` latency (ms) while `n_reqs` requests run."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
        runs = [asyncio.create_task(_stream_one(s, url, ids, tokens)) for _ in range(n_reqs)]
        while True:  # wait until all are running
            async with s.get(state_url) as r:
                running = len((await r.json())["requests"])
            if running >= n_reqs:
                break
            if all(t.done() for t in runs):
                raise RuntimeError(f"only {running} of {n_reqs} ran at once: raise --tokens or the KV pool")
            await asyncio.sleep(0.2)
        lat, ctl, sizes = [], [], []
        control_url = state_url.replace("/ares/state", "/model_info")
        for _ in range(polls):  # interleaved with a route the launcher answers alone: the HTTP + OS floor
            t0 = time.perf_counter()
            async with s.get(state_url) as r:
                body = await r.json()
            lat.append((time.perf_counter() - t0) * 1e3)
            sizes.append(len(body["requests"]))
            t0 = time.perf_counter()
            async with s.get(control_url) as r:
                await r.read()
            ctl.append((time.perf_counter() - t0) * 1e3)
        for t in runs:  # done measuring: disconnect, so the router aborts them on the servers
            t.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
    return {
        "running_reqs_min": min(sizes),
        "polls": polls,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(max(lat)),
        "control_model_info_p50_ms": float(np.percentile(ctl, 50)),
        "control_model_info_p99_ms": float(np.percentile(ctl, 99)),
    }


def head_step_cost(batches: list[int], reps: int = 200) -> dict[str, float]:
    """Microseconds ARES adds to one CPU decode step at each batch size, in this process on one thread: the head on
    `[bs, 576]` hidden states (the server's code path, `DecodeHead`) plus `consume` storing the predictions."""
    import torch

    from ares.config import SHIPPED_PREDICTOR
    from ares.engine.aux_output import HeadDeviceOutput
    from ares.engine.request_state import ATTR

    class Req:  # what consume reads of SGLang's Req
        def __init__(self) -> None:
            self.output_ids = [0]

        def finished(self) -> bool:
            return False

    class Commit:
        output_index = 1

    from ares.engine.decode_head import DecodeHead

    torch.set_num_threads(1)
    dh = DecodeHead(str(SHIPPED_PREDICTOR), hidden_size=576)
    dh.set_prompt_lengths(list(range(max(batches))), [40] * max(batches), "cpu", pool_rows=max(batches))
    out = {}
    for bs in batches:
        hidden, seq = torch.randn(bs, 576), torch.full((bs,), 60)
        pool = torch.arange(bs)
        batch = type("Batch", (), {"reqs": [Req() for _ in range(bs)]})()
        commits = [Commit()] * bs
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            host = HeadDeviceOutput(dh(hidden, seq, pool)).copy_to_host(lambda t: t)
            host.consume(batch, commits)
            times.append(time.perf_counter() - t0)
        assert all(hasattr(r, ATTR) for r in batch.reqs)
        out[str(bs)] = float(np.median(times) * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32", help="batch sizes")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions per batch size and server")
    ap.add_argument("--tokens", type=int, default=96, help="max_new_tokens per request (ignore_eos)")
    ap.add_argument("--poll-reqs", type=int, default=64, help="running requests during the /ares/state polls")
    ap.add_argument("--polls", type=int, default=300, help="sequential /ares/state polls")
    ap.add_argument(
        "--max-total-tokens",
        type=int,
        default=49152,
        help="KV pool per server (decode admission reserves ~512 tokens per running request: 64 need > 35k)",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmark" / "results" / "engine_overhead"), help="output stem")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    from transformers import AutoTokenizer

    from ares.predictor.collect import chat_prompt_ids

    model = prepare_model("smollm2")
    ids = chat_prompt_ids(AutoTokenizer.from_pretrained(model), PROMPT)
    spec = ClusterSpec(
        model_path=str(model),
        n_prefill=1,
        n_decode=2,
        ares=True,
        ares_decodes=(0,),
        max_total_tokens=args.max_total_tokens,
        router="ares",
    )
    log_dir = ROOT / ".ares" / "engine_overhead_logs"  # server logs of this run (ignored by git)
    log_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    with Cluster(spec, log_dir=log_dir) as cluster, ExitStack() as stack:
        prefill = [(p["url"], p["bootstrap_port"]) for p in cluster.state()["processes"] if p["role"] == "prefill"]
        routers = {
            name: stack.enter_context(ares_router(log_dir, prefill, [url], "round_robin"))
            for name, url in zip(("ares", "plain"), cluster.decode_urls, strict=True)
        }
        poll = asyncio.run(
            poll_latency(
                cluster.decode_urls[0] + "/ares/state",
                routers["ares"].url,
                ids,
                args.poll_reqs,
                max(args.tokens, 256),
                args.polls,
            )
        )
        results: dict[str, dict[str, list[float]]] = {str(b): {"ares": [], "plain": []} for b in batches}
        bar = tqdm(total=len(batches) * args.reps * 2, desc="batches")
        for b in batches:
            for rep in range(args.reps):
                order = ("ares", "plain") if rep % 2 == 0 else ("plain", "ares")
                for name in order:
                    tps = asyncio.run(batch_throughput(routers[name].url, ids, b, args.tokens))
                    results[str(b)][name].append(tps)
                    bar.set_postfix(batch=b, server=name, tok_s=f"{tps:.1f}")
                    bar.update()
        bar.close()
    added_us = head_step_cost(batches)
    rows = []
    for b in batches:
        a, p = results[str(b)]["ares"], results[str(b)]["plain"]
        step_us = b / statistics.median(p) * 1e6  # one plain decode step of the whole batch
        ratios = [x / y for x, y in zip(a, p, strict=True)]
        rows.append(
            {
                "batch": b,
                "ares_tok_s": statistics.median(a),
                "plain_tok_s": statistics.median(p),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "head_added_us_per_step": added_us[str(b)],
                "head_share_of_plain_step": added_us[str(b)] / step_us,
                "ratio_from_added_cost": step_us / (step_us + added_us[str(b)]),
                "ares_runs": a,
                "plain_runs": p,
            }
        )
    out = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_commit": commit_label(ROOT),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "loadavg_after": os.getloadavg(),
        },
        "device": "cpu (no GPU)",
        "model": "SmolLM2-135M-Instruct (float32), SGLang 0.5.23 CPU mode",
        "inputs": {"prompt": PROMPT, "prompt_tokens": len(ids), **vars(args)},
        "wall_s": round(time.time() - t_start, 1),
        "throughput": rows,
        "targets": {"ratio_at_least": 0.98, "poll_p99_ms_below": 5.0},
        "ares_state_poll": poll,
    }
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# `--ares` overhead on one decode server (CPU, SmolLM2-135M)",
        "",
        f"Command: `python benchmark/{out['command']}`; commit {out['git_commit']}; {os.cpu_count()} cores; "
        f"{args.reps} alternating reps, {args.tokens} tokens per request.",
        "",
        "| batch | plain tok/s | --ares tok/s | ratio (median) | ratio range | head + consume per step | "
        "share of a plain step | ratio implied by that cost |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['plain_tok_s']:.1f} | {r['ares_tok_s']:.1f} | {r['ratio_median']:.3f} | "
            f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f} | {r['head_added_us_per_step']:.0f} us | "
            f"{100 * r['head_share_of_plain_step']:.2f}% | {r['ratio_from_added_cost']:.4f} |"
        )
    lines += [
        "",
        f"`/ares/state` with {poll['running_reqs_min']}+ running requests, {poll['polls']} sequential polls: "
        f"p50 {poll['p50_ms']:.2f} ms, p99 {poll['p99_ms']:.2f} ms, max {poll['max_ms']:.2f} ms; "
        "interleaved control `/model_info` (answered by the launcher alone): "
        f"p50 {poll['control_model_info_p50_ms']:.2f} ms, p99 {poll['control_model_info_p99_ms']:.2f} ms "
        "(targets: ratio >= 0.98, p99 < 5 ms).",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
