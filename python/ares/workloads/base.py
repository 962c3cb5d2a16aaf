"""Workload = requests with arrival times and token counts; arrival processes and rate scaling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ares.shared_data import data_root


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival (seconds from 0), with prompt and output token counts."""

    name: str
    arrival_s: np.ndarray  # float64, non-decreasing
    prompt_tokens: np.ndarray  # int64, >= 1
    output_tokens: np.ndarray  # int64, >= 1

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if not (len(self.prompt_tokens) == len(self.output_tokens) == n):
            raise ValueError("arrival, prompt and output arrays must have the same length")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        """Time of the last arrival."""
        return float(self.arrival_s[-1]) if len(self) else 0.0

    @property
    def rate(self) -> float:
        """Mean arrival rate (requests/s) over the span."""
        return len(self) / self.duration_s if len(self) > 1 and self.duration_s > 0 else 0.0

    def head(self, duration_s: float) -> Workload:
        """Requests arriving before `duration_s`."""
        keep = self.arrival_s < duration_s
        return Workload(self.name, self.arrival_s[keep], self.prompt_tokens[keep], self.output_tokens[keep])


def traces_dir() -> Path:
    """`<data root>/traces`."""
    return data_root() / "traces"


def rescale_to_rate(arrival_s: np.ndarray, rate: float | None) -> np.ndarray:
    """Compress or stretch time so that the mean rate over the span becomes `rate` (None: unchanged)."""
    t = np.asarray(arrival_s, dtype=np.float64) - float(arrival_s[0])
    if rate is None or len(t) < 2 or t[-1] <= 0:
        return t
    natural = len(t) / t[-1]
    return t * (natural / rate)


def renewal_arrivals(rng: np.random.Generator, rate: float, duration_s: float, cv: float = 1.0) -> np.ndarray:
    """Arrival times of a renewal process on [0, duration): Poisson when cv == 1, else Gamma gaps with the
    given coefficient of variation (cv > 1 bursty, < 1 regular)."""
    if rate <= 0 or duration_s <= 0:
        return np.zeros(0)
    n_guess = int(rate * duration_s * 1.2 + 10 * np.sqrt(rate * duration_s) + 10)
    out = []
    t0 = 0.0
    while t0 < duration_s:
        if abs(cv - 1.0) < 1e-9:
            gaps = rng.exponential(1.0 / rate, n_guess)
        else:
            shape = 1.0 / cv**2
            gaps = rng.gamma(shape, 1.0 / (rate * shape), n_guess)
        times = t0 + np.cumsum(gaps)
        out.append(times)
        t0 = float(times[-1])
    t = np.concatenate(out)
    return t[t < duration_s]
