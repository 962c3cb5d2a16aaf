"""`ares cluster up|down|status`: a local PD cluster of real SGLang servers on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path

from ares.cluster.launcher import Cluster, ClusterError, default_state_file, load_state, stop_state
from ares.cluster.spec import DEFAULT_ROUTER_POLICY, ClusterSpec
from ares.models import MODEL_NAMES, prepare_model


def resolve_model(model: str) -> str:
    """A prepared model name ('smollm2', 'tiny') or a path to a model directory."""
    return str(prepare_model(model)) if model in MODEL_NAMES else model


def spec_from_args(args: argparse.Namespace, model_path: str) -> ClusterSpec:
    """The cluster `ares cluster up` starts for these flags (a ValueError names a bad combination)."""
    return ClusterSpec(
        model_path=model_path,
        n_prefill=args.prefill,
        n_decode=args.decode,
        ares=args.ares,
        max_total_tokens=args.max_total_tokens,
        router=args.router,
        router_policy=args.router_policy,  # None: the chosen router's own default
        **({"python": args.python} if getattr(args, "python", None) else {}),
    )


def _up(args: argparse.Namespace) -> int:
    state_file = default_state_file(args.name)
    if state_file.exists():
        print(f"cluster {args.name!r} already recorded in {state_file}; run `ares cluster down --name {args.name}`")
        return 1
    try:
        spec = spec_from_args(args, resolve_model(args.model))
    except ValueError as e:  # e.g. a policy the chosen router does not have: say so before starting anything
        print(f"ares cluster up: {e}")
        return 2
    log_dir = Path(args.log_dir or state_file.with_suffix(""))
    cluster = Cluster(spec, log_dir=log_dir, state_file=state_file)
    t0 = time.monotonic()
    try:
        cluster.start(timeout_s=args.timeout)
    except ClusterError as e:
        print(f"cluster failed to start (everything stopped): {e}")
        return 1
    print(f"cluster {args.name!r} up in {time.monotonic() - t0:.0f}s (logs: {log_dir})")
    for p in cluster.state()["processes"]:
        print(f"  {p['name']:<10} {p['url']:<28} pid {p['pid']}")
    print(f"router: {cluster.router_url}  (OpenAI API at {cluster.router_url}/v1)")
    if not args.foreground:
        print(f"stop with: ares cluster down --name {args.name}")
        return 0
    print("running in the foreground; Ctrl-C stops it")
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # delivered to sigwait, not to Python's handlers
    try:
        signal.sigwait(stop_signals)
    finally:
        cluster.stop()
    return 0


def _recorded(name: str) -> Path | None:
    """The state file of cluster `name`, or None (with a message) when no such cluster is recorded."""
    state_file = default_state_file(name)
    if state_file.exists():
        return state_file
    print(f"no cluster named {name!r} is recorded ({state_file})")
    return None


def _down(args: argparse.Namespace) -> int:
    if not (state_file := _recorded(args.name)):
        return 1
    pids = stop_state(state_file)
    print(f"stopped {args.name!r}: pids {' '.join(map(str, pids))}")
    return 0


def _status(args: argparse.Namespace) -> int:
    if not (state_file := _recorded(args.name)):
        return 1
    print(json.dumps(load_state(state_file), indent=2))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `ares cluster ...`."""
    p = sub.add_parser("cluster", help="run a local PD cluster (real SGLang servers + router on 127.0.0.1)")
    csub = p.add_subparsers(dest="cluster_command", required=True)
    up = csub.add_parser("up", help="start prefill/decode servers and a router, wait for health, print URLs/PIDs")
    up.add_argument("--prefill", type=int, default=1, help="number of prefill servers")
    up.add_argument("--decode", type=int, default=2, help="number of decode servers")
    up.add_argument("--ares", action="store_true", help="start the decode servers with --ares")
    up.add_argument("--model", default="smollm2", help=f"{' | '.join(MODEL_NAMES)} | a model directory")
    up.add_argument("--max-total-tokens", type=int, default=8192, help="KV cache tokens per server")
    up.add_argument("--router", default="sglang", choices=["sglang", "ares"], help="which PD router to start")
    up.add_argument(
        "--router-policy",
        default=None,
        help="placement policy of the router (default: its own, "
        + ", ".join(f"{r}: {p}" for r, p in DEFAULT_ROUTER_POLICY.items())
        + ")",
    )
    up.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the servers' health")
    up.add_argument(
        "--python", default=None, help="the interpreter that runs the servers and router, e.g. another venv's with "
        "SGLang (default: this one)"
    )  # fmt: skip
    up.add_argument("--log-dir", default=None, help="server logs (default: next to the state file)")
    up.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops the cluster")
    for q in (
        up,
        csub.add_parser("down", help="stop exactly the processes `up` started"),
        csub.add_parser("status", help="print the recorded URLs and PIDs"),
    ):
        q.add_argument("--name", default="default", help="cluster name (several may run side by side)")
    up.set_defaults(func=_up)
    csub.choices["down"].set_defaults(func=_down)
    csub.choices["status"].set_defaults(func=_status)
