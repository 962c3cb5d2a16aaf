"""Predictor error models: what the simulated length head reports for a request's remaining tokens.

Parametric: multiplicative log-normal noise, persistent per request (a head is consistently wrong on a
request, not freshly wrong every step), shrinking as the request progresses:

    predicted = true_remaining * exp(sigma(f) * z),  z ~ N(0, 1) drawn once per request,
    sigma(f) = sigma0 * (1 - f) + sigma_end * f,     f = generated / output length

Empirical: `benchmark/results/predictor_accuracy.json` (written by the predictor work). Read fields:
  * optional `"log_sigma_by_progress": {"progress": [f0, f1, ...], "sigma": [s0, s1, ...]}`, either at the top
    level or per method under `"methods": {name: {...}}`: sigma(f) is interpolated from it;
  * else `"mae": {method: tokens}`: sigma0 is calibrated so that the model's mean absolute error of the
    remaining length, at a uniformly random point of each request of the workload, equals the method's MAE.
Everything else in the file is ignored; a missing or malformed file falls back to the parametric model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Z90 = 1.2815515655446004  # standard normal 90th percentile, for the upper quantile


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


def _mae(sigma0: float, outputs: np.ndarray, u: np.ndarray, z: np.ndarray) -> float:
    model = ErrorModel.parametric(sigma0)
    rem = outputs * (1 - u)
    return float(np.mean(np.abs(model.predict(rem, u, z) - rem)))


def calibrate_sigma(mae_tokens: float, outputs: np.ndarray, seed: int = 0) -> float:
    """sigma0 whose remaining-length MAE on these outputs equals `mae_tokens` (bisection, fixed seed)."""
    rng = np.random.default_rng(seed)
    outs = rng.choice(np.asarray(outputs, float), size=min(20000, max(len(outputs), 1)))
    u = rng.random(len(outs))
    z = rng.standard_normal(len(outs))
    lo, hi = 0.0, 5.0
    if _mae(hi, outs, u, z) < mae_tokens:
        return hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _mae(mid, outs, u, z) < mae_tokens else (lo, mid)
    return (lo + hi) / 2


def load_error_model(
    path: str | Path, outputs: np.ndarray | None = None, method: str | None = None
) -> ErrorModel | None:
    """Error model from a predictor accuracy JSON (see module docstring); None when unusable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    methods = data.get("methods") if isinstance(data.get("methods"), dict) else {}
    maes = {k: float(v) for k, v in (data.get("mae") or {}).items() if _is_number(v)}
    chosen = method or (min(maes, key=maes.get) if maes else None)
    for block, label in ((methods.get(chosen) if chosen else None, chosen), (data, "file")):
        prof = block.get("log_sigma_by_progress") if isinstance(block, dict) else None
        try:
            f = tuple(float(x) for x in prof["progress"])
            s = tuple(float(x) for x in prof["sigma"])
            if len(f) == len(s) >= 1 and all(b > a for a, b in zip(f, f[1:], strict=False)):
                return ErrorModel(f, s, f"empirical profile ({label}) from {path}")
        except (TypeError, KeyError, ValueError):
            pass
    if chosen in maes and outputs is not None and len(outputs):
        sigma0 = calibrate_sigma(maes[chosen], outputs)
        model = ErrorModel.parametric(sigma0)
        return ErrorModel(model.progress, model.sigma, f"calibrated to MAE {maes[chosen]:g} of {chosen!r}")
    return None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
