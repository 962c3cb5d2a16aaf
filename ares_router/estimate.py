"""Initial output-length estimate of a request, used until the decode server's length head reports on it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OutputEstimator:
    """estimate = clip(base + per_prompt_token * prompt_tokens, floor, cap), never above the request's max_tokens.

    A prior, not a predictor: it only has to rank requests roughly until the head's first report (one decode step
    after the request starts). The defaults are deliberately plain; tune them per workload with the router flags.
    """

    base_tokens: float = 128.0
    per_prompt_token: float = 0.5
    floor_tokens: float = 16.0
    cap_tokens: float = 4096.0

    def total(self, prompt_tokens: int, max_tokens: int | None) -> float:
        """Expected output tokens of a new request."""
        est = min(max(self.base_tokens + self.per_prompt_token * prompt_tokens, self.floor_tokens), self.cap_tokens)
        return float(min(est, max_tokens)) if max_tokens is not None else float(est)

    def total_array(self, prompt_tokens: np.ndarray, max_tokens: np.ndarray) -> np.ndarray:
        """`total` over columns (one row per request); NaN in `max_tokens` means no cap."""
        cap = np.where(np.isnan(max_tokens), np.inf, max_tokens)
        est = np.clip(self.base_tokens + self.per_prompt_token * prompt_tokens, self.floor_tokens, self.cap_tokens)
        return np.minimum(est, cap)

    def remaining(self, prompt_tokens: int, max_tokens: int | None, generated: int) -> float:
        """Expected tokens still to come after `generated`; a request past its estimate is assumed to run on for
        as long again as it has so far (capped by max_tokens), rather than to stop right now."""
        cap = np.nan if max_tokens is None else max_tokens
        return float(self.remaining_array(np.array([prompt_tokens]), np.array([cap]), np.array([generated]))[0])

    def remaining_array(self, prompt_tokens: np.ndarray, max_tokens: np.ndarray, generated: np.ndarray) -> np.ndarray:
        """`remaining` over columns (one row per request); NaN in `max_tokens` means no cap."""
        cap = np.where(np.isnan(max_tokens), np.inf, max_tokens)
        total = self.total_array(prompt_tokens, max_tokens)
        rem = np.where(generated < total, total - generated, np.maximum(generated, self.floor_tokens))
        return np.maximum(np.minimum(rem, cap - generated), 0.0)
