"""Matplotlib PNGs for simulator results (headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_tpot_vs_rate(runs: list[dict], path: Path, title: str, slo_tpot_s: float | None = None) -> None:
    """P99 TPOT against offered rate, one line per policy."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for policy in dict.fromkeys(r["policy"] for r in runs):
        pts = sorted((r["offered_rate"], r["tpot_p99"] * 1e3) for r in runs if r["policy"] == policy)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
    if slo_tpot_s:
        ax.axhline(slo_tpot_s * 1e3, color="grey", ls="--", lw=1, label="TPOT SLO")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("P99 TPOT (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_goodput_bars(summary: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """Grouped bars: goodput per policy for each workload."""
    workloads = list(summary)
    policies = list(dict.fromkeys(p for w in workloads for p in summary[w]))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / max(len(policies), 1)
    x = np.arange(len(workloads))
    for k, p in enumerate(policies):
        ax.bar(x + k * width, [summary[w].get(p, 0.0) for w in workloads], width, label=p)
    ax.set_xticks(x + width * (len(policies) - 1) / 2, workloads)
    ax.set_ylabel("goodput (req/s, >= 90% meet TTFT and TPOT SLOs)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kv_usage(traces: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> None:
    """KV usage of every decode instance over time, one panel per policy."""
    fig, axes = plt.subplots(len(traces), 1, figsize=(7.5, 2.4 * len(traces)), sharex=True, squeeze=False)
    for ax, (policy, (times, frac)) in zip(axes[:, 0], traces.items(), strict=True):
        if frac.size:
            ax.plot(times, frac * 100, lw=0.6)
        ax.set_ylabel("KV used (%)")
        ax.set_ylim(0, 105)
        ax.set_title(policy, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
