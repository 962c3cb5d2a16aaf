"""Migration cost vs KV length on the CPU cluster (SmolLM2-135M, Mooncake TCP on loopback), pre-copy vs
stop-and-copy, measured side by side in one run.

One cluster: 1 prefill + 2 `--ares` decode servers. Two ARES routers over it: the cluster's own (pre-copy: stages
while the request keeps decoding, then a pause for the last few positions) and a second one with
`--ares-migrate-max-stages 0` (stop-and-copy: pause first, copy everything). For each prompt length L and mode, a
streaming greedy request (`ignore_eos`) is moved to the other decode server once it has 8 tokens; per run:
- the migration record: total time, pause (A's pause to B's commit, as the router measures it), bytes, stages;
- the client's view: the gap between A's last token and B's first (the switch), in decode steps (the request's
  median token gap), i.e. what the move cost its TPOT at the switch. On this 2-core machine the three servers, the
  router and the client share the CPU, so the Mooncake transfer also slows A's decode steps while it runs: that
  shows in the step time, not in the switch gap;
- the transfer rate (bytes / total time);
- what the other requests lose: one long background stream runs on each decode server (placed there with the
  router's `X-Ares-Decode` header) during every run; its token rate while the migration runs, against its rate over
  an equally long window just before, on A and on B.
At the end the pre-copy runs are fitted to the link profile `cpu-loopback-measured` (setup + bytes / rate, median
pause; `ares_router/link_profile.py`), which the router and the simulator use, stored in
`ares_router/link_profiles.json` with this run's provenance.

    python benchmark/migration_bench.py                                   # L = 256 .. 4096, 3 reps
    python benchmark/migration_bench.py --lengths 256,1024 --reps 1       # cut down
Writes benchmark/results/migration_bench.{json,md,png} (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from provenance import git_state
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "test"))

from http_helpers import ares_router, request, stream_events, wait_for  # noqa: E402

from ares.cluster import Cluster, ClusterSpec  # noqa: E402
from ares.models import prepare_model  # noqa: E402
from ares_router.link_profile import fit_profile, write_measured  # noqa: E402

MOVE_AT = 8  # tokens before the move
BACKGROUND_TOKENS = 2000  # per background request (SmolLM2's context is 8192); a new one follows each


class Background:
    """Greedy streams pinned to one decode server through the router, one after another until `close`; records
    each token's arrival time."""

    def __init__(self, router: str, decode: str, seed: int):
        ids = np.random.default_rng(seed).integers(100, 40000, size=64).tolist()
        body = {
            "input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": BACKGROUND_TOKENS, "temperature": 0, "ignore_eos": True},
        }  # fmt: skip
        self._req = (router + "/generate", json.dumps(body).encode(), {"Content-Type": "application/json",
                     "X-Ares-Decode": decode})  # fmt: skip
        self.times: list[float] = []
        self._closed = threading.Event()
        self._resp = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        url, data, headers = self._req
        while not self._closed.is_set():
            try:
                self._resp = urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=3600)
                for line in self._resp:
                    if line.startswith(b"data:") and not line.startswith(b"data: [DONE]"):
                        self.times.append(time.monotonic())
            except (OSError, ValueError, AttributeError) as e:  # AttributeError: closed under the reader
                if not self._closed.is_set():
                    print(f"background stream on {headers['X-Ares-Decode']} failed: {e!r}; starting another")
                    time.sleep(1)

    def rate(self, t0: float, t1: float) -> float:
        """Tokens per second received in [t0, t1)."""
        t = np.asarray(self.times)
        return float(((t >= t0) & (t < t1)).sum() / max(t1 - t0, 1e-9))

    def close(self) -> None:
        """Hang up: the router aborts the request on its server."""
        self._closed.set()
        if self._resp is not None:
            self._resp.close()


def one_run(
    router: str, decode_urls: list[str], length: int, tokens: int, seed: int, background: list[Background]
) -> dict:
    """Stream one request of `length` prompt tokens through `router`, move it after MOVE_AT tokens; the background
    streams' (one per decode server, in `decode_urls` order) token rates during the move and just before."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(100, 40000, size=length).tolist()
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}}
    times: list[float] = []
    counts: list[int] = []
    answer: dict = {}
    mover = None
    for event in stream_events(router + "/generate", body):
        times.append(time.monotonic())
        meta = event["meta_info"]
        counts.append(meta["completion_tokens"])
        if mover is None and meta["completion_tokens"] >= MOVE_AT:
            rid = meta["id"]
            source = wait_for(lambda r=rid: _where(decode_urls, r), 30, "the request on its server") - 1
            answer["src_index"] = source

            def run(rid: str = rid, to: int = 1 - source) -> None:
                answer["t0"] = time.monotonic()
                status, _, raw = request(router + "/ares/migrate", {"rid": rid, "to": to}, timeout=600)
                answer.update(json.loads(raw), http_status=status, t1=time.monotonic())

            mover = threading.Thread(target=run)
            mover.start()
    assert mover is not None
    mover.join()
    t, c = np.array(times), np.array(counts)
    # The request's token gap: median over the whole stream (the switch is one gap among ~tokens).
    step = float(np.median(np.diff(t) / np.maximum(np.diff(c), 1)))
    switch = float("nan")
    n = answer.get("n_output")
    if answer.get("state") == "committed" and n is not None and (c > n).any() and (c <= n).any():
        # A's last token (count <= n) to B's first (count > n): what the client waits at the switch.
        switch = float(t[np.argmax(c > n)] - t[np.flatnonzero(c <= n)[-1]])
    t0, t1, src = answer["t0"], answer["t1"], answer["src_index"]
    # Background rates: during the move, and over an equally long window just before it (tokens/s).
    during = [b.rate(t0, t1) for b in background]
    before = [b.rate(2 * t0 - t1, t0) for b in background]
    return {
        "length": length,
        "bg_tps_before_A": before[src],
        "bg_tps_during_A": during[src],
        "bg_tps_before_B": before[1 - src],
        "bg_tps_during_B": during[1 - src],
        "state": answer.get("state"),
        "reason": answer.get("reason"),
        "kv_tokens": answer.get("kv_tokens"),
        "bytes": answer.get("bytes"),
        "stages": answer.get("stages"),
        "total_ms": answer.get("total_ms"),
        "pause_ms": answer.get("pause_ms"),
        "step_ms": step * 1e3,
        "switch_gap_ms": switch * 1e3,
        "switch_gap_steps": switch / step,
        "transfer_MBps": (answer.get("bytes") or 0) / max(answer.get("total_ms") or 1e-9, 1e-9) / 1e3,
    }


def _where(decode_urls: list[str], rid: str) -> int | None:
    for i, url in enumerate(decode_urls):
        status, _, raw = request(url + "/ares/state")
        if status == 200 and any(r["rid"] == rid for r in json.loads(raw)["requests"]):
            return i + 1  # +1: 0 would read as "not found" to wait_for
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="256,1024,2048,4096", help="prompt lengths (tokens), comma-separated")
    ap.add_argument("--reps", type=int, default=3, help="runs per (length, mode)")
    ap.add_argument("--tokens", type=int, default=48, help="output tokens per request")
    ap.add_argument("--max-total-tokens", type=int, default=16384, help="KV pool per server")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmark" / "results" / "migration_bench")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    commit, dirty = git_state(ROOT)
    spec = ClusterSpec(
        model_path=str(prepare_model("smollm2")),
        n_prefill=1,
        n_decode=2,
        ares=True,
        max_total_tokens=args.max_total_tokens,
        router="ares",
        router_policy="round_robin",
    )
    runs: list[dict] = []
    log_dir = ROOT / ".ares" / "migration_bench_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with Cluster(spec, log_dir=log_dir) as c:
        prefill = [(p["url"], p["bootstrap_port"]) for p in c.state()["processes"] if p["role"] == "prefill"]
        with ares_router(log_dir, prefill, c.decode_urls, "round_robin", "--ares-migrate-max-stages", "0") as sc:
            routers = {"precopy": c.router_url, "stop_and_copy": sc.url}
            plan = [(L, mode, rep) for rep in range(args.reps) for L in lengths for mode in routers]
            background = [Background(c.router_url, f"decode{i}", seed=i) for i in range(2)]
            try:
                wait_for(lambda: all(len(b.times) > 2 for b in background), 300, "the background streams")
                for L, mode, rep in tqdm(plan, desc="migrations"):
                    r = one_run(routers[mode], c.decode_urls, L, args.tokens, 1000 * rep + L, background)
                    runs.append({"mode": mode, "rep": rep, **r})
            finally:
                for b in background:
                    b.close()
    summary = []
    for mode in ("precopy", "stop_and_copy"):
        for L in lengths:
            ok = [r for r in runs if r["mode"] == mode and r["length"] == L and r["state"] == "committed"]
            if not ok:
                summary.append({"mode": mode, "length": L, "committed": 0})
                continue

            def med(k: str, ok: list[dict] = ok) -> float:
                return statistics.median(r[k] for r in ok)

            summary.append({
                "mode": mode, "length": L, "committed": len(ok),
                "runs": sum(r["mode"] == mode and r["length"] == L for r in runs),
                "kv_tokens": med("kv_tokens"), "MB": med("bytes") / 1e6, "stages": med("stages"),
                "total_ms": med("total_ms"), "pause_ms": med("pause_ms"), "step_ms": med("step_ms"),
                "switch_gap_steps": med("switch_gap_steps"), "switch_gap_ms": med("switch_gap_ms"),
                "transfer_MBps": med("transfer_MBps"),
                **{k: med(k) for k in ("bg_tps_before_A", "bg_tps_during_A", "bg_tps_before_B", "bg_tps_during_B")},
            })  # fmt: skip
    result = {
        "benchmark": "migration_bench",
        "commit": commit,
        "dirty": dirty,
        "command": " ".join(["python", "benchmark/migration_bench.py", *sys.argv[1:]]),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), no GPU",
        "inputs": {
            "model": "SmolLM2-135M-Instruct",
            "lengths": lengths,
            "reps": args.reps,
            "tokens": args.tokens,
            "move_at_tokens": MOVE_AT,
            "max_total_tokens": args.max_total_tokens,
            "transport": "Mooncake TCP, loopback",
        },  # fmt: skip
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Migration cost vs KV length (commit {commit[:10]}{' dirty' if dirty else ''})",
        "",
        f"`{result['command']}` on {result['device']}; {result['inputs']['transport']}; medians over committed runs.",
        "",
        "| mode | prompt tokens | committed | KV tokens | MB | stages | total ms | pause ms | step ms "
        "| switch gap ms | switch gap (steps) | MB/s | others on A, tok/s (before → during) "
        "| others on B, tok/s (before → during) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        if not s["committed"]:
            lines.append(f"| {s['mode']} | {s['length']} | 0 | | | | | | | | | | | |")
            continue
        lines.append(
            f"| {s['mode']} | {s['length']} | {s['committed']}/{s['runs']} | {s['kv_tokens']:.0f} | {s['MB']:.1f} | "
            f"{s['stages']:.0f} | {s['total_ms']:.0f} | {s['pause_ms']:.0f} | {s['step_ms']:.1f} | "
            f"{s['switch_gap_ms']:.0f} | {s['switch_gap_steps']:.1f} | {s['transfer_MBps']:.0f} | "
            f"{s['bg_tps_before_A']:.1f} → {s['bg_tps_during_A']:.1f} | "
            f"{s['bg_tps_before_B']:.1f} → {s['bg_tps_during_B']:.1f} |"
        )
    precopy = [r for r in runs if r["mode"] == "precopy" and r["state"] == "committed"]
    try:
        profile = fit_profile(
            "cpu-loopback-measured", precopy,
            f"fitted by benchmark/migration_bench.py to {len(precopy)} pre-copy migrations (SmolLM2-135M, Mooncake TCP "
            f"on loopback, {result['device']})",
        )  # fmt: skip
    except ValueError as e:
        print(f"link profile not updated: {e}")
    else:
        write_measured(profile, {k: result[k] for k in ("commit", "dirty", "command", "device", "inputs")})
        lines += [
            "",
            f"Link profile `{profile.name}` (ares_router/link_profiles.json): {profile.bytes_per_s / 1e6:.1f} MB/s, "
            f"setup {profile.setup_s * 1e3:.0f} ms, pause {profile.pause_s * 1e3:.0f} ms.",
        ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(summary, args.out.with_suffix(".png"))
    print("\n".join(lines))


def _plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in ("precopy", "stop_and_copy"):
        rows = [s for s in summary if s["mode"] == mode and s["committed"]]
        x = [s["kv_tokens"] for s in rows]
        axes[0].plot(x, [s["pause_ms"] for s in rows], "o-", label=mode)
        axes[1].plot(x, [s["switch_gap_steps"] for s in rows], "o-", label=mode)
    axes[0].set(xlabel="KV tokens moved", ylabel="pause (ms, A's pause to B's commit)", title="pause")
    axes[1].set(xlabel="KV tokens moved", ylabel="client's gap at the switch (decode steps)", title="client")
    axes[1].axhline(3, color="grey", ls="--", lw=1)
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
