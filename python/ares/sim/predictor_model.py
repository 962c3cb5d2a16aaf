"""Predictor error models: what the simulated length head reports for a request's remaining tokens.

Relative, multiplicative log-normal error, persistent per request (a head is consistently wrong on a request,
not freshly wrong every step), with a spread that depends on progress f = generated / output length:

    predicted = true_remaining * exp(sigma(f) * z),  z ~ N(0, 1) drawn once per request,

sigma(f) piecewise linear between knots. Because the error is relative, it applies to any workload's own
lengths (R1's thousands of tokens as well as the test set's hundreds).

Empirical (`load_error_model`): sigma(f) from the head's measured error by progress in
`benchmark/results/predictor_accuracy.json`, method "ours" (the shipped head) unless another is named:
  * if the file has `"log_sigma_by_progress": {"progress": [...], "sigma": [...]}` (top level or in the
    method's `metrics` block) it is used as is;
  * else, per progress bucket (0-10%, ..., 90-100%): relative MAE = the method's `mae_by_progress` / the mean
    true remaining length of the bucket's test points (`mean_remaining_by_progress`, written by
    `ares predictor eval`; files written before it had that field get it from the test split of the
    generations file, checked against the file's `n_test_requests` and `n_test_points`), and sigma is the one
    whose log-normal error has that relative MAE: E|exp(sigma z) - 1| = exp(sigma^2 / 2) (2 Phi(sigma) - 1).
    Knots sit at the bucket midpoints (sigma is held flat before the first and after the last).
A missing or unusable file leaves the caller's parametric model (`ErrorModel.parametric`).
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Z90 = 1.2815515655446004  # standard normal 90th percentile, for the upper quantile
DEFAULT_METHOD = "ours"  # the shipped head (python/ares/predictor/checkpoints)


@dataclass(frozen=True)
class ErrorModel:
    """sigma of the log error as a function of progress f in [0, 1] (piecewise linear)."""

    progress: tuple[float, ...] = (0.0, 1.0)
    sigma: tuple[float, ...] = (0.5, 0.1)
    source: str = "parametric"

    @classmethod
    def parametric(cls, sigma0: float, sigma_end: float | None = None) -> ErrorModel:
        """sigma0 at the start, sigma_end (default sigma0 / 5) at the end."""
        end = sigma0 / 5 if sigma_end is None else sigma_end
        return cls((0.0, 1.0), (float(sigma0), float(end)), f"parametric(sigma0={sigma0:g}, end={end:g})")

    def sigma_at(self, progress: np.ndarray | float) -> np.ndarray:
        """Interpolated sigma."""
        return np.interp(progress, self.progress, self.sigma)

    def predict(self, true_remaining: np.ndarray, progress: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Predicted remaining tokens (same shape as the inputs)."""
        return true_remaining * np.exp(self.sigma_at(progress) * z)

    def upper(self, predicted: np.ndarray, progress: np.ndarray) -> np.ndarray:
        """90th-percentile upper bound the head would report with its prediction."""
        return predicted * np.exp(Z90 * self.sigma_at(progress))


def relative_mae(sigma: float) -> float:
    """E|exp(sigma z) - 1| for z ~ N(0, 1): the relative MAE of the log-normal error model."""
    phi = 0.5 * (1.0 + math.erf(sigma / math.sqrt(2.0)))
    return math.exp(sigma * sigma / 2.0) * (2.0 * phi - 1.0)


def sigma_for_relative_mae(rel: float, hi: float = 5.0) -> float:
    """The sigma whose relative MAE is `rel` (bisection; `relative_mae` increases with sigma), capped at `hi`."""
    if rel <= 0:
        return 0.0
    lo = 0.0
    if relative_mae(hi) <= rel:
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if relative_mae(mid) < rel else (lo, mid)
    return (lo + hi) / 2


def _bucket_mid(key: str) -> float | None:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\s*%\s*", key)
    return (float(m.group(1)) + float(m.group(2))) / 200.0 if m else None


@functools.lru_cache(maxsize=4)
def test_split_remaining_by_progress(gen_path: str, seed: int = 0) -> tuple[dict[str, float], int, int]:
    """(mean true remaining per progress bucket, requests, points) of the predictor's test split.

    The points are every position of every EOS-ended test response, as `ares predictor eval` scores them.
    Imports the predictor package (torch) only here: needed only for accuracy files written before
    `mean_remaining_by_progress` was recorded.
    """
    from ares.predictor.features import split_of
    from ares.predictor.generations import read_generations
    from ares.predictor.metrics import PROGRESS_BUCKETS

    gens = read_generations(Path(gen_path))
    lengths = np.array([len(g.response) for g in gens if g.ended_with_eos and split_of(g.id, seed) == "test"], np.int64)
    if lengths.size == 0:
        return {}, 0, 0
    n = np.repeat(lengths, lengths)
    pos = np.arange(n.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    remaining, progress = n - pos, pos / n
    out = {}
    for lo, hi in PROGRESS_BUCKETS:
        m = (progress >= lo) & (progress < hi)
        if m.any():
            out[f"{int(lo * 100)}-{int(hi * 100)}%"] = float(remaining[m].mean())
    return out, int(lengths.size), int(n.size)


def _profile(block: object, label: str, path: Path) -> ErrorModel | None:
    prof = block.get("log_sigma_by_progress") if isinstance(block, dict) else None
    try:
        f = tuple(float(x) for x in prof["progress"])
        s = tuple(float(x) for x in prof["sigma"])
    except (TypeError, KeyError, ValueError):
        return None
    if len(f) == len(s) >= 1 and all(b > a for a, b in zip(f, f[1:], strict=False)):
        return ErrorModel(f, s, f"empirical sigma profile ({label}) from {path}")
    return None


def load_error_model(
    path: str | Path, method: str | None = None, generations: str | Path | None = None
) -> ErrorModel | None:
    """Error model from a predictor accuracy JSON (module docstring); None when unusable.

    `generations`: the generations file whose test split gives the mean remaining length by progress when the
    accuracy file does not record it (default: the predictor's `DEFAULT_PATH`).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
    maes = {k: v for k, v in (data.get("mae") or {}).items() if _is_number(v)}
    if method is None:
        method = DEFAULT_METHOD if DEFAULT_METHOD in metrics else (min(maes, key=maes.get) if maes else None)
    block = metrics.get(method) if method else None
    for b, label in ((block, method), (data, "file")):
        model = _profile(b, str(label), path)
        if model is not None:
            return model
    if not isinstance(block, dict) or not isinstance(block.get("mae_by_progress"), dict):
        return None
    mae = {k: v for k, v in block["mae_by_progress"].items() if _is_number(v)}
    denom = block.get("mean_remaining_by_progress") or data.get("mean_remaining_by_progress")
    how = "recorded"
    if not isinstance(denom, dict):
        if generations is None:
            from ares.predictor.generations import DEFAULT_PATH

            generations = DEFAULT_PATH
        if not Path(generations).exists():
            return None
        denom, n_req, n_pts = test_split_remaining_by_progress(str(generations))
        if (n_req, n_pts) != (data.get("n_test_requests"), data.get("n_test_points")):
            return None  # not the split the file was scored on
        how = f"from the test split of {Path(generations).name}"
    knots = sorted(
        (mid, mae[k] / denom[k])
        for k in mae
        if (mid := _bucket_mid(k)) is not None and _is_number(denom.get(k)) and denom[k] > 0
    )
    if not knots:
        return None
    rel = [r for _, r in knots]
    sigma = tuple(sigma_for_relative_mae(r) for r in rel)
    overall = maes.get(method, block.get("mae"))
    return ErrorModel(
        tuple(f for f, _ in knots),
        sigma,
        f"relative error by progress of {method!r} from {path.name} (MAE {overall:.2f} tokens on "
        f"{data.get('n_test_requests')} test requests; relative MAE {rel[0]:.2f} at {knots[0][0]:.0%} -> "
        f"{rel[-1]:.2f} at {knots[-1][0]:.0%}; mean remaining {how})",
    )


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
