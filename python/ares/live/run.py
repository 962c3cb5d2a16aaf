"""`ares bench live`: one set of real SGLang servers on CPU (1 prefill + N `--ares` decode, SmolLM2-135M with the
shipped head, a small KV pool), one ARES router per placement policy in turn, the same request list replayed
through each (`ares.live.workload`), for several seeds. Writes `live_cluster.{json,md,png}`.

Order of a run: start the servers; measure one request alone (its TTFT and TPOT fix the SLOs before any replay);
then per seed, per policy (the order rotates with the seed): start that policy's router, replay, read the servers'
retraction counts and the router's migrations, stop the router, wait until the servers hold no KV.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import sys
import time
import urllib.request
from pathlib import Path

from ares.cluster import Cluster, ClusterSpec
from ares.cluster.cli import resolve_model
from ares.cluster.router_proc import is_sglang, policy_router
from ares.live.client import Outcome, replay
from ares.live.monitor import Monitor, Trace, log_offsets, retractions
from ares.live.report import Slo, plot, summarize, write_results
from ares.live.workload import LiveRequest, live_workload

# Router flags per compared policy (beyond `--policy NAME`): whether running requests are rebalanced by migration.
POLICY_ARGS: dict[str, tuple[str, ...]] = {
    "round_robin": (),
    "least_kv": (),
    "current_migrate": ("--ares-rebalance", "on"),  # least_kv placement + moves by current KV
    "ares": ("--ares-rebalance", "on"),  # placement and moves by predicted load
    # the same, late bound: a request waits at the router while no decode server admits it
    "current_migrate_hold": ("--ares-rebalance", "on"),
    "ares_hold": ("--ares-rebalance", "on"),
    # SGLang's own PD router, what a user would otherwise run: load-aware power of two choices
    "sglang_power_of_two": (),
}


def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_idle(decode_urls: list[str], timeout_s: float = 300.0) -> list[int] | None:
    """Wait until no decode server runs a request or holds KV (a replay's leftovers never reach the next); None when
    they are idle, else the KV tokens each still holds after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = [_get(u + "/ares/state") for u in decode_urls]
        if all(s["used_tokens"] == 0 and not s["requests"] and not s["queued_reqs"] for s in states):
            return None
        if time.monotonic() > deadline:
            return [s["used_tokens"] for s in states]
        time.sleep(1.0)


def drain(server_urls: list[str], decode_urls: list[str], timeout_s: float = 300.0) -> dict | None:
    """After a replay: wait until the decode servers are idle; requests still held then (a client gave up on them
    and the router did not abort them on the servers: SGLang's router does not) are aborted on every server
    (SGLang's `/abort_request` with `abort_all`), and what was left is returned for the record; None when idle."""
    left = wait_idle(decode_urls, timeout_s)
    if left is None:
        return None
    for url in server_urls:
        req = urllib.request.Request(
            url + "/abort_request", json.dumps({"rid": "", "abort_all": True}).encode(), method="POST"
        )
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10):
            pass
    still = wait_idle(decode_urls, 120.0)
    if still is not None:
        raise RuntimeError(f"decode servers still hold {still} KV tokens after aborting every request")
    return {"kv_tokens_left": left, "aborted_after_s": timeout_s}


def migration_counts(router_url: str) -> dict:
    """Migrations the router ran, by final state."""
    try:
        records = _get(router_url + "/ares/migrations")
    except OSError:
        return {}
    items = records.get("migrations", records) if isinstance(records, dict) else records
    counts: dict[str, int] = {}
    for rec in items:
        counts[rec.get("state", "?")] = counts.get(rec.get("state", "?"), 0) + 1
    return counts


class Display:
    """A live console view: requests done per policy, per-server KV bars (rich), refreshed each second."""

    def __init__(self, n: int, enabled: bool = True):
        self.n = n
        self.enabled = enabled and sys.stdout.isatty()
        self.done: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.current = ""
        self.monitor: Monitor | None = None
        self._live = None

    def start(self) -> None:
        if self.enabled:
            from rich.live import Live

            self._live = Live(self._render(), refresh_per_second=2, transient=False)
            self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()
            self._live = None

    def begin(self, label: str, monitor: Monitor) -> None:
        self.current, self.monitor = label, monitor
        self.done[label], self.failed[label] = 0, 0
        if not self.enabled:
            print(f"[{time.strftime('%H:%M:%S')}] {label}: replaying {self.n} requests", flush=True)

    def request_done(self, o: Outcome) -> None:
        self.done[self.current] += 1
        self.failed[self.current] += not o.ok
        if self._live is not None:
            self._live.update(self._render())

    def tick(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _render(self):
        from rich.table import Table

        t = Table.grid(padding=(0, 2))
        for label, d in self.done.items():
            bad = f"  [red]{self.failed[label]} failed[/red]" if self.failed[label] else ""
            t.add_row(f"[bold]{label}[/bold]", f"{d}/{self.n} done{bad}")
        if self.monitor is not None:
            used, caps = self.monitor.latest()
            for j, (u, c) in enumerate(zip(used, caps, strict=False)):
                frac = min(u / c, 1.0) if c else 0.0
                bar = "█" * int(30 * frac) + "░" * (30 - int(30 * frac))
                t.add_row(f"  decode{j} KV", f"{bar} {100 * frac:3.0f}% ({u}/{c})")
        return t


async def _replay_with_ticks(
    url: str, reqs: list[LiveRequest], max_new: int, display: Display, request_timeout_s: float | None = None
) -> list[Outcome]:
    task = asyncio.create_task(
        replay(url, reqs, max_new, on_done=display.request_done, request_timeout_s=request_timeout_s)
    )
    while not task.done():
        display.tick()
        await asyncio.sleep(1.0)
    return task.result()


def calibrate(cluster: Cluster, log_dir: Path, prefill: list[tuple[str, int]], args: argparse.Namespace) -> dict:
    """TTFT and TPOT of one request alone (held-out prompts, `--calibration-tokens` tokens forced: this measures the
    servers, not the head), best of three in turn; warms every server up as a side effect."""
    reqs = live_workload(3, 1.0, seed=10_000 + args.seeds[0], long_fraction=0.0)
    outs: list[Outcome] = []
    with policy_router(log_dir, prefill, cluster.decode_urls, "round_robin") as r:
        for req in reqs:
            alone = LiveRequest(req.rid + "-cal", req.prompt_id, req.input_ids, 0.0, 0, "eos")
            outs += asyncio.run(replay(r.url, [alone], args.calibration_tokens, ignore_eos=True))
    ok = [o for o in outs if o.ok and o.tpot_s is not None]
    if not ok:
        raise RuntimeError(f"the calibration requests failed: {[o.error for o in outs]}")
    best = min(ok, key=lambda o: o.tpot_s)
    per_request = [
        {"prompt_tokens": len(r.input_ids), "ttft_s": o.ttft_s, "tpot_s": o.tpot_s}
        for r, o in zip(reqs, outs, strict=True)
        if o.ok
    ]
    return {
        "ttft_s": min(o.ttft_s for o in ok),
        "tpot_s": best.tpot_s,
        "tokens": best.n_output,
        "requests": per_request,
    }


def run_policy(
    cluster: Cluster,
    prefill: list[tuple[str, int]],
    policy: str,
    reqs: list[LiveRequest],
    slo: Slo,
    args: argparse.Namespace,
    display: Display,
    label: str,
) -> tuple[dict, list[Outcome], Trace]:
    """Replay `reqs` through a fresh router with `policy`; the figures, the client's outcomes, the servers' trace."""
    decode = cluster.decode_urls
    logs = [cluster.log_dir / f"decode{i}.log" for i in range(len(decode))]
    offsets = log_offsets(logs)
    extra = POLICY_ARGS[policy]
    if not is_sglang(policy):  # the ARES router's admission view needs the servers' reserve
        extra = (*extra, "--reserve-tokens", str(args.reserve_tokens))
    with policy_router(Path(args.log_dir), prefill, decode, policy, *extra) as router:
        with Monitor(decode, args.poll_interval) as mon:
            display.begin(label, mon)
            t0 = time.monotonic()
            outcomes = asyncio.run(
                _replay_with_ticks(router.url, reqs, args.max_new_tokens, display, args.request_timeout)
            )
            wall = time.monotonic() - t0
        migrations = migration_counts(router.url)
    leftovers = drain([*(url for url, _ in prefill), *decode], decode)
    summary = summarize(outcomes, mon.trace, slo, retractions(logs, offsets), migrations, wall)
    summary["leftovers_aborted"] = leftovers
    return summary, outcomes, mon.trace


def _exit_on_sigterm(signum: int, _frame) -> None:
    sys.exit(128 + signum)  # SystemExit unwinds the context managers: every process started here is stopped


def run_live(args: argparse.Namespace) -> int:
    """Start the servers, calibrate the SLOs, replay every seed through every policy, write the results."""
    from ares.provenance import record

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args.seeds = [int(x) for x in str(args.seeds).split(",")]
    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in POLICY_ARGS]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; choose from {', '.join(POLICY_ARGS)}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[3]
    from ares.predictor.generations import DEFAULT_PATH

    head = root / "python" / "ares" / "predictor" / "checkpoints" / "ours.safetensors"
    doc: dict = {
        "provenance": record(root, [DEFAULT_PATH, head]),
        "machine": {"platform": platform.platform(), "cpus": _cpus(), "device": "cpu (no GPU)"},
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "runs": {},
    }
    spec = ClusterSpec(
        model_path=resolve_model(args.model),
        n_prefill=1,
        n_decode=args.decode,
        ares=True,
        max_total_tokens=args.max_total_tokens,
        router="ares",
        start_router=False,
        extra_server_args=("--num-reserved-decode-tokens", str(args.reserve_tokens)),
    )
    display = Display(args.num_requests, enabled=not args.no_display)
    raw: dict[str, list[tuple[list[Outcome], Trace]]] = {p: [] for p in policies}
    t_start = time.monotonic()
    args.log_dir = args.log_dir or str(out / "logs")
    with Cluster(spec, log_dir=Path(args.log_dir) / "servers") as cluster:
        print(f"servers up in {time.monotonic() - t_start:.0f}s: decode {', '.join(cluster.decode_urls)}", flush=True)
        prefill = [(p["url"], p["bootstrap_port"]) for p in cluster.state()["processes"] if p["role"] == "prefill"]
        cal = calibrate(cluster, Path(args.log_dir), prefill, args)
        slo = Slo(ttft_s=args.ttft_slo_factor * cal["ttft_s"], tpot_s=args.tpot_slo_factor * cal["tpot_s"])
        doc["calibration"] = cal
        doc["slo"] = {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}
        print(
            f"one request alone: TTFT {cal['ttft_s']:.2f}s, TPOT {1e3 * cal['tpot_s']:.0f}ms -> SLO TTFT "
            f"{slo.ttft_s:.1f}s, TPOT {1e3 * slo.tpot_s:.0f}ms",
            flush=True,
        )
        if args.rate == "auto":
            from ares.live.autorate import pick_rate

            doc["rate_pick"] = pick_rate(cal)
            args.rate = doc["config"]["rate"] = doc["rate_pick"]["rate"]
            print(f"load picked for this cluster: {args.rate} req/s (the reference load x its speed)", flush=True)
        display.start()
        try:
            for k, seed in enumerate(args.seeds):
                reqs = live_workload(args.num_requests, args.rate, seed, args.long_fraction, args.long_min)
                doc.setdefault("workloads", {})[str(seed)] = [r.meta() for r in reqs]
                order = policies[k % len(policies) :] + policies[: k % len(policies)]  # no policy always first
                for policy in order:
                    summary, outcomes, trace = run_policy(
                        cluster, prefill, policy, reqs, slo, args, display, f"{policy} (seed {seed})"
                    )
                    summary["seed"] = seed
                    summary["outcomes"] = [
                        {"rid": o.rid, "backend_rid": o.backend_rid, "decode": o.decode, "n_output": o.n_output,
                         "finish": o.finish,
                         "ttft_s": o.ttft_s, "tpot_s": o.tpot_s, "error": o.error}
                        for o in outcomes
                    ]  # fmt: skip
                    doc["runs"].setdefault(policy, []).append(summary)
                    raw[policy].append((outcomes, trace))
                    write_results(out, doc)  # after every replay: a cut-short run keeps what it measured
        finally:
            display.stop()
    doc["wall_s"] = time.monotonic() - t_start
    from ares.live import simcheck

    doc["simulator"] = simcheck.check(doc)
    if args.write_profile:
        from ares.sim.cost_model import CostModel, write_measured

        profile = CostModel(**doc["simulator"]["profile"])
        write_measured(profile, {"fit": doc["simulator"]["fit"], "provenance": doc["provenance"]})
    write_results(out, doc)
    plot(raw, slo, out / f"{args.name}.png")
    print((out / f"{args.name}.md").read_text())
    lost = sum(r["lost"] + r["duplicated"] for runs in doc["runs"].values() for r in runs)
    return 1 if lost else 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _rate(text: str) -> float | str:
    if text == "auto":
        return text
    rate = float(text)
    if rate <= 0:
        raise argparse.ArgumentTypeError("the rate must be positive (or `auto`)")
    return rate


def add_arguments(p: argparse.ArgumentParser, output_dir: str, name: str = "live_cluster") -> None:
    """The live benchmark's flags (shared by `ares bench live`, `ares demo` and `benchmark/live_cluster.py`)."""
    p.add_argument("--model", default="smollm2", help="smollm2 | a model directory (the head must fit it)")
    p.add_argument("--decode", type=int, default=2, help="decode servers")
    p.add_argument("--policies", default="round_robin,least_kv,current_migrate,ares", help=", ".join(POLICY_ARGS))
    p.add_argument("--seeds", default="1,2", help="comma-separated: one replay of a fresh request list per seed")
    p.add_argument("--num-requests", type=int, default=24, help="requests per replay")
    p.add_argument(
        "--rate",
        type=_rate,
        default=0.2,
        help="mean arrival rate (req/s) of the R1 process, or `auto`: a measured reference load (0.12 req/s, least_kv "
        "at 94%% SLO attainment) scaled by this cluster's single-request speed (ares.live.autorate)",
    )
    p.add_argument("--long-fraction", type=float, default=0.25, help="share of prompts from the long tail")
    p.add_argument("--long-min", type=int, default=400, help="collected answer length that counts as long")
    p.add_argument("--max-new-tokens", type=int, default=512, help="one generous cap for every request")
    p.add_argument(
        "--max-total-tokens",
        type=int,
        default=1280,
        help="KV pool per server (tokens): small, so that output growth matters",
    )
    p.add_argument("--reserve-tokens", type=int, default=64, help="--num-reserved-decode-tokens (servers and routers)")
    p.add_argument("--calibration-tokens", type=int, default=64, help="tokens of the single-request measurement")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=900.0,
        help="seconds after which the client gives up on a request (counted lost, with the reason)",
    )
    p.add_argument("--tpot-slo-factor", type=float, default=4.0, help="TPOT SLO = this x one request's TPOT")
    p.add_argument("--ttft-slo-factor", type=float, default=10.0, help="TTFT SLO = this x one request's TTFT")
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between samples of the servers")
    p.add_argument("--no-display", action="store_true", help="plain progress lines instead of the live view")
    p.add_argument(
        "--write-profile",
        action="store_true",
        help="store the fitted CPU cost profile as the simulator's cpu-smollm2-135m-measured preset",
    )
    p.add_argument("--output-dir", default=output_dir, help="where NAME.{json,md,png} and the logs go")
    p.add_argument("--name", default=name, help="results file name")
    p.add_argument("--log-dir", default=None, help="server and router logs (default: OUTPUT_DIR/logs)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `ares bench live`."""
    bench = sub.add_parser("bench", help="benchmarks on a real local cluster").add_subparsers(
        dest="bench", required=True
    )
    p = bench.add_parser(
        "live", help=__doc__.splitlines()[0], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p, output_dir=".ares/live")
    p.set_defaults(func=run_live)
