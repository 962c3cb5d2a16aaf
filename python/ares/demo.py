"""`ares demo`: the demo cluster on SmolLM2-135M under a short workload, measured with SGLang's own benchmark client.

Brings up 1 prefill + 2 decode servers and the ARES router on 127.0.0.1, runs `python -m sglang.benchmark.serving`
against the router (OpenAI chat API), prints the latency summary, writes the raw result JSON lines, and stops
everything.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from ares.cluster import Cluster, ClusterSpec
from ares.cluster.cli import resolve_model
from ares.cluster.launcher import default_state_file

SUMMARY_KEYS = (
    "completed",
    "request_throughput",
    "output_throughput",
    "mean_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "p99_tpot_ms",
    "mean_e2e_latency_ms",
)


def benchmark_command(router_url: str, model_dir: str, args: argparse.Namespace, output_file: Path) -> list[str]:
    """The `sglang.benchmark.serving` command line the demo runs."""
    return [
        sys.executable,
        "-m",
        "sglang.benchmark.serving",
        "--backend",
        "sglang-oai-chat",
        "--base-url",
        router_url,
        "--model",
        model_dir,
        "--tokenizer",
        model_dir,
        "--dataset-name",
        "random-ids",
        "--num-prompts",
        str(args.num_prompts),
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--random-range-ratio",
        "0.5",
        "--request-rate",
        str(args.request_rate),
        "--seed",
        str(args.seed),
        "--output-file",
        str(output_file),
        "--disable-tqdm",
    ]


def demo_spec(args: argparse.Namespace, model_dir: str) -> ClusterSpec:
    """The demo's cluster: 1 prefill, `--decode` decode servers, the router and policy asked for."""
    return ClusterSpec(
        model_path=model_dir,
        n_prefill=1,
        n_decode=args.decode,
        ares=args.ares,
        max_total_tokens=args.max_total_tokens,
        router=args.router,  # the router asked for (ClusterSpec's own default is SGLang's router)
        router_policy=args.router_policy,  # None: that router's default (ares for the ARES router)
    )


def _exit_on_sigterm(signum: int, _frame) -> None:
    # Turn SIGTERM into SystemExit so the cluster's context manager stops every server it started.
    sys.exit(128 + signum)


def run_demo(args: argparse.Namespace) -> int:
    """Start the cluster, run the workload, print and save the summary, stop the cluster."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    model_dir = resolve_model(args.model)
    spec = demo_spec(args, model_dir)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "demo_serving.jsonl"
    raw.unlink(missing_ok=True)
    t0 = time.monotonic()
    with Cluster(spec, log_dir=default_state_file("demo").with_suffix(""), state_file=default_state_file("demo")) as c:
        startup_s = time.monotonic() - t0
        print(
            f"cluster up in {startup_s:.0f}s: router {c.router_url}, decode {', '.join(c.decode_urls)}",
            flush=True,
        )
        bench = subprocess.run(benchmark_command(c.router_url, model_dir, args, raw))
        if bench.returncode != 0:
            print(f"benchmark failed with exit code {bench.returncode}")
            return bench.returncode
    result = json.loads(raw.read_text().strip().splitlines()[-1])
    summary = {
        "model": args.model,
        "router": f"{spec.router}:{spec.router_policy}",
        "decode_instances": args.decode,
        "ares": args.ares,
        "cluster_startup_s": round(startup_s, 1),
        **{k: result.get(k) for k in SUMMARY_KEYS},
    }
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    failed = args.num_prompts - int(result.get("completed", 0))
    if failed:
        print(f"{failed} of {args.num_prompts} requests failed")
    return 1 if failed else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `ares demo`."""
    p = sub.add_parser("demo", help="demo cluster on SmolLM2 + a short workload via sglang.benchmark.serving")
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | a model directory")
    p.add_argument("--decode", type=int, default=2, help="decode instances")
    p.add_argument(
        "--ares",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start the decode servers with --ares (the length head; the ares policy's predictions)",
    )
    p.add_argument("--router", default="ares", choices=["ares", "sglang"], help="which PD router to start")
    p.add_argument(
        "--router-policy", default=None, help="the router's placement policy (default: ares; round_robin for sglang)"
    )
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=96)
    p.add_argument("--request-rate", type=float, default=2.0, help="requests per second (Poisson)")
    p.add_argument("--max-total-tokens", type=int, default=16384, help="KV cache tokens per server")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--output-dir",
        default=".ares/demo",
        help="where demo_summary.json and the raw results go (a user's run never overwrites the repo's results)",
    )
    p.set_defaults(func=run_demo)
