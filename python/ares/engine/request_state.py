"""What the scheduler keeps per running request about the head's predictions (pure; no SGLang import).

A prediction made at the decode step whose input had `g` generated tokens counts the tokens still to produce,
that step's included (the head's training label, `ares.predictor.features`). After that step `g + 1` tokens exist;
at report time, with `G` tokens generated, what is still to come is `prediction - (G - g)`, never below 0.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTR = "_ares_prediction"  # attribute on SGLang's `Req` (a plain object) holding a `RequestPrediction`
EMA_ALPHA = 0.3  # weight of the newest implied total length (the offline evaluation's `ours_ema`)


@dataclass
class RequestPrediction:
    """Latest, smoothed and upper-quantile remaining-length prediction of one request."""

    latest: float  # tokens still to produce at the step it was made, that step included
    p90: float | None
    smoothed_total: float  # EMA of the implied total length (prediction + generated)
    generated_at: int  # tokens generated before the step that made the prediction
    step: int  # the server's decode-step counter when it was made
    updates: int = 1

    @classmethod
    def first(cls, point: float, p90: float | None, generated: int, step: int) -> RequestPrediction:
        """The record after a request's first prediction."""
        return cls(point, p90, point + generated, generated, step)

    def update(self, point: float, p90: float | None, generated: int, step: int, alpha: float = EMA_ALPHA) -> None:
        """Fold in the prediction of a later step."""
        self.latest, self.p90, self.generated_at, self.step = point, p90, generated, step
        self.smoothed_total = alpha * (point + generated) + (1.0 - alpha) * self.smoothed_total
        self.updates += 1

    def remaining(self, generated_now: int) -> float:
        """Tokens still to come after `generated_now` generated tokens, by the latest prediction."""
        return max(self.latest - (generated_now - self.generated_at), 0.0)

    def p90_remaining(self, generated_now: int) -> float | None:
        """The upper quantile of the same, if the head has one."""
        return None if self.p90 is None else max(self.p90 - (generated_now - self.generated_at), 0.0)

    def smoothed_remaining(self, generated_now: int) -> float:
        """Tokens still to come by the smoothed total length."""
        return max(self.smoothed_total - generated_now, 0.0)


def record(req: object, point: float, p90: float | None, generated: int, step: int) -> RequestPrediction:
    """Store one step's prediction on `req` (creating or updating its record); return the record."""
    rec = getattr(req, ATTR, None)
    if rec is None:
        rec = RequestPrediction.first(point, p90, generated, step)
        setattr(req, ATTR, rec)
    else:
        rec.update(point, p90, generated, step)
    return rec
