"""Accuracy metrics of remaining-length predictions over decode-step points."""

from __future__ import annotations

import numpy as np

PROGRESS_BUCKETS = [(i / 10, (i + 1) / 10) for i in range(10)]
LENGTH_BUCKETS = [(1, 64), (64, 128), (128, 256), (256, 512), (512, 1025)]


def kendall_tau(pred: np.ndarray, true: np.ndarray, max_points: int = 20000, seed: int = 0) -> float:
    """Kendall's tau-b between predicted and true remaining tokens (on a fixed random subsample if large)."""
    from scipy.stats import kendalltau

    if len(pred) > max_points:
        idx = np.random.default_rng(seed).choice(len(pred), max_points, replace=False)
        pred, true = pred[idx], true[idx]
    tau = float(kendalltau(pred, true).statistic)
    return tau if np.isfinite(tau) else 0.0  # a constant predictor ranks nothing: tau 0, not NaN


def evaluate(
    pred: np.ndarray, true: np.ndarray, progress: np.ndarray, length: np.ndarray, upper: np.ndarray | None = None
) -> dict:
    """MAE overall, by progress bucket (position / length) and by true total-length bucket; tau; P90 coverage.

    `mean_remaining_by_progress`: the mean true remaining length of each progress bucket's points, so that
    MAE / mean remaining is the relative error by progress the simulator applies to other workloads' lengths.
    """
    err = np.abs(pred - true)
    out = {
        "mae": float(err.mean()),
        "mae_by_progress": {},
        "mean_remaining_by_progress": {},
        "mae_by_length": {},
        "kendall_tau": kendall_tau(pred, true),
        "median_ae": float(np.median(err)),
    }
    for lo, hi in PROGRESS_BUCKETS:
        m = (progress >= lo) & (progress < hi)
        out["mae_by_progress"][f"{int(lo * 100)}-{int(hi * 100)}%"] = float(err[m].mean()) if m.any() else None
        out["mean_remaining_by_progress"][f"{int(lo * 100)}-{int(hi * 100)}%"] = (
            float(true[m].mean()) if m.any() else None
        )
    for lo, hi in LENGTH_BUCKETS:
        m = (length >= lo) & (length < hi)
        out["mae_by_length"][f"{lo}-{hi - 1}"] = float(err[m].mean()) if m.any() else None
    if upper is not None:
        out["p90_coverage"] = float((true <= upper).mean())
        out["p90_mean_excess"] = float(np.maximum(upper - true, 0).mean())
    return out
