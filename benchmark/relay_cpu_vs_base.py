"""Relay CPU per request of the ARES router at HEAD beside the router as it was before issue 19's relay rewrite, in
one run on one loopback backend (issue 19's last target: "Relay CPU per streamed request with no move pending no
higher than today's").

The base ("today's" router) defaults to the parent of 4032287 ("Migration: any number of moves per request"), the
commit that replaced the one-switch relay in app.py by the hop loop of ares_router/relay.py with its byte fast path;
every later router change of issue 19 builds on it, so its parent is the last router before that work began.

Both routers run from `git worktree add --detach` checkouts under /tmp (HEAD's too, so other engineers' uncommitted
edits in this tree are not measured), each started as `python -m ares_router` with `cwd` and `PYTHONPATH` at its
worktree (checked before the run: `ares_router.__file__` lies in that worktree), with the same flags (`--policy`,
default round_robin; no rebalancing, no `--ares` servers, so no move is ever pending). They sit side by side in
front of one loopback prefill + decode pair (`router_loopback.py`: 16-event streams, answered at once), both up for
the whole run, and are measured in turn: per round, stream then non-stream, each router for `--duration` s after
`--warmup-s` s under `--clients` closed-loop keep-alive clients (`router_vs_sglang.closed_loop`: requests completed
in the window, router CPU = user + system time of the router's process tree from /proc over the window). The order
alternates per round (HEAD base, base HEAD, ...) so a drift of the shared machine hits both alike.

`met` (stream): HEAD's mean CPU per request over the rounds is at most base's mean plus the measured round-to-round
spread (the larger of the two routers' half-ranges, (max - min) / 2); `met_strict` drops the allowance.

Writes benchmark/results/relay_cpu_vs_base.{json,md}. Run (under the heavy-job lock): `python
benchmark/relay_cpu_vs_base.py` (~3 minutes; cut down: `--rounds 1 --duration 4`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from provenance import record
from router_loopback import HOST, cpu_seconds, raise_nofile, start_backend, stop, use_uvloop, wait_http
from router_vs_sglang import _ready, closed_loop, loadavg, log

from ares.cluster.launcher import free_ports

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmark" / "results"
NAMES = ("head", "base")
BASE_DEFAULT = "4032287^"  # see the module docstring
BASE_REASON = (
    "parent of 4032287 'Migration: any number of moves per request (A->B->C->A)', the first commit of issue 19's "
    "relay work (the hop loop of ares_router/relay.py and its byte fast path replaced app.py's one-switch relay); "
    "the router of that parent is the one issue 19 calls today's"
)


def git(*argv: str) -> str:
    """A git command in this repository; its stdout, stripped."""
    return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def add_worktree(commit: str, label: str) -> Path:
    """A detached worktree of `commit` under /tmp."""
    path = Path(tempfile.mkdtemp(prefix=f"ares-relay-{label}-"))
    path.rmdir()  # git creates it
    git("worktree", "add", "--detach", "--quiet", str(path), commit)
    return path


def remove_worktree(path: Path) -> None:
    """`git worktree remove --force` (and the directory, should git leave it)."""
    try:
        git("worktree", "remove", "--force", str(path))
    except subprocess.CalledProcessError as e:
        log(f"git worktree remove {path} failed: {e.stderr.strip()}")
    shutil.rmtree(path, ignore_errors=True)


def router_env(tree: Path) -> dict[str, str]:
    """The environment that makes `python -m ares_router` import the package of `tree`."""
    return {**os.environ, "PYTHONPATH": str(tree)}


def imported_from(tree: Path) -> str:
    """Where `ares_router` is imported from when started in `tree` (raises unless inside `tree`)."""
    r = subprocess.run([sys.executable, "-c", "import ares_router; print(ares_router.__file__)"], cwd=tree,
                       env=router_env(tree), capture_output=True, text=True, check=True)  # fmt: skip
    where = r.stdout.strip()
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"ares_router from {where}, not from the worktree {tree}")
    return where


def router_argv(prefill: str, decode: str, port: int, policy: str) -> list[str]:
    """The same command line for both routers."""
    return [
        sys.executable, "-m", "ares_router", "--prefill", prefill, "8998", "--decode", decode, "--policy", policy,
        "--host", HOST, "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip


def _stats(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
            "half_range": float(a.max() - a.min()) / 2, "std": float(a.std(ddof=1)) if a.size > 1 else 0.0}  # fmt: skip


def summarise(rows: list[dict]) -> dict:
    """Per mode: each router's CPU per request and req/s over the rounds, HEAD/base ratios, and (stream) `met`."""
    out: dict = {}
    for stream in (True, False):
        mode = "stream" if stream else "non_stream"
        by = {n: sorted((r for r in rows if r["router"] == n and r["stream"] == stream), key=lambda r: r["round"])
              for n in NAMES}  # fmt: skip
        if not all(by.values()):
            continue
        cpu = {n: _stats([r["router_cpu_ms_per_request"] for r in by[n]]) for n in NAMES}
        rps = {n: _stats([r["req_per_s"] for r in by[n]]) for n in NAMES}
        paired = [h["router_cpu_ms_per_request"] / b["router_cpu_ms_per_request"]
                  for h, b in zip(by["head"], by["base"], strict=True)]  # fmt: skip
        s: dict = {
            "cpu_ms_per_request": cpu,
            "req_per_s": rps,
            "cpu_ratio_head_over_base": cpu["head"]["mean"] / cpu["base"]["mean"],
            "cpu_ratio_per_round": paired,
            "req_per_s_ratio_head_over_base": rps["head"]["mean"] / rps["base"]["mean"],
        }
        if stream:
            allowance = max(cpu["head"]["half_range"], cpu["base"]["half_range"])
            s["allowance_ms"] = allowance
            s["met_strict"] = cpu["head"]["mean"] <= cpu["base"]["mean"]
            s["met"] = cpu["head"]["mean"] <= cpu["base"]["mean"] + allowance
        out[mode] = s
    return out


async def measure(args: argparse.Namespace, urls: dict[str, str], pids: dict[str, int]) -> list[dict]:
    """The interleaved rounds (see the module docstring)."""
    for url in urls.values():
        await _ready(url)
    await asyncio.sleep(2.0)
    rows = []
    for rnd in range(args.rounds):
        order = NAMES if rnd % 2 == 0 else NAMES[::-1]
        for stream in (True, False):
            for name in order:
                other = next(n for n in NAMES if n != name)
                o0, t0 = cpu_seconds(pids[other]), time.monotonic()
                r = await closed_loop(urls[name], pids[name], args.clients, stream, args.duration, args.warmup_s)
                r["other_router_cpu_share"] = (cpu_seconds(pids[other]) - o0) / (time.monotonic() - t0)
                r.update(router=name, round=rnd, loadavg=loadavg())
                rows.append(r)
                log(f"round {rnd + 1}/{args.rounds} {'stream' if stream else 'non-stream'} {name}: "
                    f"{r['req_per_s']:.0f} req/s, {r['router_cpu_ms_per_request']:.3f} ms CPU/request, router "
                    f"{r['router_cpu_share']:.0%} of a core, errors {r['errors']}")  # fmt: skip
    return rows


def markdown(doc: dict) -> str:
    """The report."""
    g = doc["git"]
    c = doc["commits"]
    L = [
        "# Relay CPU per request: HEAD vs the router before issue 19's relay rewrite",
        "",
        f"`{g['command']}` at commit `{g['commit'][:12]}`{' (dirty)' if g['dirty'] else ''}; machine "
        f"{doc['machine']}; load average before {doc['loadavg_before']}, after {doc['loadavg_after']}; "
        f"wall {doc['wall_s']:.0f} s.",
        "",
        f"- HEAD router: `{c['head'][:12]}` (worktree, `ares_router` from `{doc['imported_from']['head']}`)",
        f"- base router: `{c['base'][:12]}` ({c['base_spec']}: {c['base_reason']}; `ares_router` from "
        f"`{doc['imported_from']['base']}`)",
        f"- both: `python -m ares_router --policy {doc['config']['policy']}` (no rebalancing, no move ever pending) "
        "in front of one loopback prefill + decode pair (16-event streams, `/v1/chat/completions`); "
        f"{doc['config']['clients']} closed-loop keep-alive clients, {doc['config']['rounds']} rounds, "
        f"{doc['config']['duration']:g} s measured after {doc['config']['warmup_s']:g} s warm-up per row, order "
        "alternating per round; CPU = user + system of the router's process tree (/proc) over the window.",
        "",
        "| request | router | CPU/request per round (ms) | mean (ms) | req/s per round | mean req/s |",
        "|---|---|---|---:|---|---:|",
    ]
    rows = doc["rows"]
    for stream in (True, False):
        for name in NAMES:
            rs = sorted((r for r in rows if r["router"] == name and r["stream"] == stream), key=lambda r: r["round"])
            if not rs:
                continue
            cpus = [r["router_cpu_ms_per_request"] for r in rs]
            rps = [r["req_per_s"] for r in rs]
            L.append(f"| {'stream' if stream else 'non-stream'} | {name} | {', '.join(f'{x:.3f}' for x in cpus)} | "
                     f"{np.mean(cpus):.3f} | {', '.join(f'{x:.0f}' for x in rps)} | {np.mean(rps):.0f} |")  # fmt: skip
    L += ["", "| request | CPU/request HEAD / base (of means) | per round | req/s HEAD / base |", "|---|---:|---|---:|"]
    for mode, s in doc["summary"].items():
        L.append(f"| {mode.replace('_', '-')} | {s['cpu_ratio_head_over_base']:.3f} | "
                 f"{', '.join(f'{x:.3f}' for x in s['cpu_ratio_per_round'])} | "
                 f"{s['req_per_s_ratio_head_over_base']:.3f} |")  # fmt: skip
    st = doc["summary"].get("stream")
    if st:
        h, b = st["cpu_ms_per_request"]["head"]["mean"], st["cpu_ms_per_request"]["base"]["mean"]
        L += [
            "",
            f"**Target** (stream CPU/request of HEAD <= base's, allowing the round-to-round spread): HEAD {h:.3f} ms, "
            f"base {b:.3f} ms, allowance {st['allowance_ms']:.3f} ms (the larger half-range over the rounds): "
            f"met = **{'yes' if st['met'] else 'no'}** "
            f"(strictly lower or equal: {'yes' if st['met_strict'] else 'no'}).",
        ]
    errs = [r for r in rows if r["errors"]]
    L += ["", f"Errors: {'none' if not errs else [(r['router'], r['round'], r['errors']) for r in errs]}.", ""]
    return "\n".join(L) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=BASE_DEFAULT, help="the base commit (default: see the module docstring)")
    p.add_argument("--head", default="HEAD", help="the commit measured as HEAD")
    p.add_argument("--rounds", type=int, default=3, help="rounds (each: both routers, stream and non-stream)")
    p.add_argument("--clients", type=int, default=64, help="closed-loop clients")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per row")
    p.add_argument("--warmup-s", type=float, default=2.0, help="seconds of load before each measured window")
    p.add_argument("--policy", default="round_robin", help="both routers' --policy")
    p.add_argument("--out", type=Path, default=OUT / "relay_cpu_vs_base", help="results path without suffix")
    args = p.parse_args()
    raise_nofile()
    use_uvloop()
    t0 = time.time()
    # Stamped at the start, when HEAD is resolved (others may commit while this runs).
    stamp = record(ROOT, [ROOT / "benchmark" / "router_loopback.py", ROOT / "benchmark" / "router_vs_sglang.py"])
    commits = {"head": git("rev-parse", args.head), "base": git("rev-parse", args.base)}
    doc: dict = {
        "git": stamp,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "commits": {
            **commits,
            "base_spec": args.base,
            "base_reason": BASE_REASON if args.base == BASE_DEFAULT else "given with --base",
        },  # fmt: skip
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "loadavg_before": loadavg(),
    }
    logs = Path(tempfile.mkdtemp(prefix="ares-relay-cpu-"))
    log(f"HEAD {commits['head'][:12]}, base {commits['base'][:12]}; logs in {logs}")
    trees: dict[str, Path] = {}
    procs: dict[str, subprocess.Popen] = {}
    backend = None
    try:
        for name in NAMES:
            trees[name] = add_worktree(commits[name], name)
        doc["imported_from"] = {n: imported_from(trees[n]) for n in NAMES}
        pp, dp, *ports = free_ports(2 + len(NAMES))
        prefill, decode = f"http://{HOST}:{pp}", f"http://{HOST}:{dp}"
        backend = start_backend(pp, dp, 16, 0.1, logs / "backend.log")
        wait_http(decode + "/health", proc=backend)
        urls = {}
        for name, port in zip(NAMES, ports, strict=True):
            procs[name] = subprocess.Popen(
                router_argv(prefill, decode, port, args.policy), cwd=trees[name], env=router_env(trees[name]),
                start_new_session=True, stdout=open(logs / f"{name}.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
            )  # fmt: skip
            urls[name] = f"http://{HOST}:{port}"
        for name in NAMES:
            wait_http(urls[name] + "/health", timeout_s=120, proc=procs[name])
        log("both routers up")
        doc["rows"] = asyncio.run(measure(args, urls, {n: p.pid for n, p in procs.items()}))
    finally:
        for proc in procs.values():
            stop(proc)
        if backend is not None:
            stop(backend)
        for tree in trees.values():
            remove_worktree(tree)
    doc["summary"] = summarise(doc["rows"])
    doc["loadavg_after"] = loadavg()
    doc["wall_s"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
