"""The engine's pure pieces: per-request prediction records, the auxiliary output's `consume`, the report rows and the
device-side feature assembly (stand-in requests; the real path runs in test_engine_e2e.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from ares.config import SHIPPED_PREDICTOR
from ares.engine.aux_output import TRACE_KEY, HeadDeviceOutput
from ares.engine.decode_head import DecodeHead
from ares.engine.request_state import ATTR, EMA_ALPHA, RequestPrediction
from ares.engine.state_report import request_rows
from ares.predictor.head import load_head


@dataclass
class FakeReq:
    rid: str
    origin_input_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    done: bool = False
    customized_info: dict | None = None  # SGLang's per-token response extras

    def finished(self) -> bool:
        return self.done


@dataclass(frozen=True)
class Commit:
    output_index: int
    token_ids: tuple[int, ...]


@dataclass
class FakeBatch:
    reqs: list[FakeReq]


def test_prediction_record_counts_down_and_smooths_the_implied_total():
    rec = RequestPrediction.first(point=100.0, p90=180.0, generated=10, step=1)
    # After the step that made it, 11 tokens exist: 99 to come (the step's own token is out).
    assert rec.remaining(11) == 99.0 and rec.p90_remaining(11) == 179.0 and rec.smoothed_remaining(11) == 99.0
    rec.update(point=60.0, p90=None, generated=11, step=2)
    # EMA of implied totals 110 and 71: 0.3 * 71 + 0.7 * 110 = 98.3; 98.3 - 12 generated.
    assert rec.smoothed_remaining(12) == pytest.approx(EMA_ALPHA * 71 + (1 - EMA_ALPHA) * 110 - 12)
    assert rec.remaining(12) == 59.0 and rec.p90_remaining(12) is None and rec.updates == 2
    assert rec.remaining(500) == 0.0  # past the prediction: nothing negative


def test_consume_stores_predictions_aligned_with_the_batch():
    reqs = [FakeReq("a", [1] * 5, [7, 7, 7]), FakeReq("b", [1] * 9, [7]), FakeReq("c", [1] * 2, [7, 7], done=True)]
    preds = torch.tensor([[40.0, 90.0], [3.0, 8.0], [5.0, 6.0]])
    host = HeadDeviceOutput(preds).copy_to_host(lambda t: t.cpu())
    host.consume(FakeBatch(reqs), [Commit(2, (7,)), None, Commit(1, (7,))])
    a = getattr(reqs[0], ATTR)
    assert (a.latest, a.p90, a.generated_at) == (40.0, 90.0, 2)
    assert not hasattr(reqs[1], ATTR)  # no visible token this step: nothing to record
    assert not hasattr(reqs[2], ATTR)  # finished: leaves the report
    assert all(r.customized_info is None for r in reqs)  # no trace unless --ares-return-predictions


def test_returned_predictions_stay_aligned_with_the_output_tokens():
    req = FakeReq("a", [1] * 5, [7])  # the first token came from the prefill server
    for step, point in enumerate([50.0, 49.0, 47.5]):
        req.output_ids.append(8)  # SGLang commits the step's token before `consume`
        host = HeadDeviceOutput(torch.tensor([[point, point * 2]]), trace=True).copy_to_host(lambda t: t)
        host.consume(FakeBatch([req]), [Commit(1 + step, (8,))])
    assert req.customized_info[TRACE_KEY] == [None, 50.0, 49.0, 47.5]
    req.output_ids.append(9)
    req.done = True  # the last step's prediction is returned too, though the request leaves the report
    host = HeadDeviceOutput(torch.tensor([[1.0, 2.0]]), trace=True).copy_to_host(lambda t: t)
    host.consume(FakeBatch([req]), [Commit(4, (9,))])
    assert req.customized_info[TRACE_KEY] == [None, 50.0, 49.0, 47.5, 1.0] and getattr(req, ATTR).latest == 47.5


def test_report_rows_follow_the_schema():
    reqs = [FakeReq("a", [1] * 5, [7, 7, 7]), FakeReq("b", [1] * 9, [7]), FakeReq("c", [1], [7], done=True)]
    setattr(reqs[0], ATTR, RequestPrediction.first(40.0, 90.0, 2, 1))
    rows = request_rows(reqs)
    assert [r["rid"] for r in rows] == ["a", "b"]
    assert rows[0] == {
        "rid": "a",
        "prompt_tokens": 5,
        "generated_tokens": 3,
        "predicted_remaining": 39.0,
        "predicted_p90": 89.0,
        "smoothed_remaining": 39.0,
        "predicted_at_generated": 2,
        "prediction_step": 1,
    }
    assert rows[1]["predicted_remaining"] is None and rows[1]["predicted_p90"] is None


def test_decode_head_features_come_from_seq_lens_and_the_prompt_table():
    """generated = seq_lens - prompt_len, read through the request-pool rows; padded rows are harmless."""
    dh = DecodeHead(str(SHIPPED_PREDICTOR), hidden_size=576)
    dh.set_prompt_lengths([3, 1], [20, 7], "cpu", pool_rows=8)
    hidden = torch.randn(3, 576)
    seq_lens = torch.tensor([25, 8, 1])  # rows 3 and 1: 5 and 1 generated; a padded row at pool row 0
    pool = torch.tensor([3, 1, 0])
    out = dh(hidden, seq_lens, pool)
    head = load_head(SHIPPED_PREDICTOR)
    with torch.inference_mode():
        point, p90 = head(hidden[:2], head.make_extra(torch.tensor([5, 1]), torch.tensor([20, 7])))
    torch.testing.assert_close(out[:2, 0], point, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out[:2, 1], p90, rtol=1e-5, atol=1e-4)
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    assert dh.backend.startswith("torch reference")


def test_rows_and_columns_reports_parse_to_the_same_load():
    """The server's two report forms (schema 1 rows, schema 2 base64 columns) read back identically by the router."""
    import orjson

    from ares.engine.state_report import request_columns
    from ares_router.reports import parse_ares_state

    reqs = [FakeReq("a", [1] * 5, [7, 7, 7]), FakeReq("b", [1] * 9, [7]), FakeReq("c", [1], [7], done=True)]
    setattr(reqs[0], ATTR, RequestPrediction.first(40.0, 90.0, 2, 1))
    head = {"capacity_tokens": 100, "used_tokens": 20, "queued_reqs": 1}
    v1 = parse_ares_state(orjson.loads(orjson.dumps({"version": 1, **head, "requests": request_rows(reqs)})))
    v2 = parse_ares_state(orjson.loads(orjson.dumps({"version": 2, **head, **request_columns(reqs)})))
    assert v1.rids == v2.rids == ("a", "b")
    for col in ("prompt_tokens", "generated_tokens", "predicted_remaining", "predicted_p90"):
        np.testing.assert_array_equal(getattr(v1, col), getattr(v2, col))
    assert np.isnan(v2.predicted_remaining[1]) and v2.predicted_remaining[0] == 39.0
