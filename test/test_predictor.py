"""Length predictor: head training, checkpoints, labels and the by-prompt split (synthetic data, CPU, fast)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from ares.predictor.features import SPLITS, build_points, split_of
from ares.predictor.generations import Generation, append_generations, read_generations
from ares.predictor.head import HeadConfig, LengthHead, count_params, head_flops, load_head, save_head
from ares.predictor.metrics import evaluate
from ares.predictor.train import TrainConfig, predict, train_head


def _synthetic(n: int, hidden: int, seed: int):
    """Hidden states whose first two dims encode log(remaining): a head must learn to read them."""
    rng = np.random.default_rng(seed)
    remaining = rng.integers(1, 600, n).astype(np.float32)
    x = rng.normal(size=(n, hidden)).astype(np.float32)
    x[:, 0] = np.log1p(remaining) + rng.normal(scale=0.05, size=n)
    x[:, 1] = -x[:, 0]
    return x, remaining


def test_training_converges_on_synthetic():
    xtr, ytr = _synthetic(3000, 16, 0)
    xva, yva = _synthetic(500, 16, 1)
    cfg = HeadConfig(16, [32], target="log", quantiles=[0.9])
    head, info = train_head(
        cfg, (xtr, None, ytr), (xva, None, yva), TrainConfig(epochs=25, batch_size=128), log=lambda *_: None
    )
    point, upper = predict(head, xva, None)
    mae = np.abs(point - yva).mean()
    const = np.abs(np.median(ytr) - yva).mean()
    assert mae < 0.25 * const, (mae, const)
    assert info["best_val_mae"] == pytest.approx(mae, rel=1e-4)
    assert 0.75 < (yva <= upper).mean() < 0.99  # the P90 output covers about 90%


def test_checkpoint_round_trip_is_identical(tmp_path):
    cfg = HeadConfig(24, [16, 8], extra_features=["log_generated", "log_prompt_len"], quantiles=[0.9])
    torch.manual_seed(0)
    head = LengthHead(cfg)
    head.in_mean.normal_()
    head.in_std.uniform_(0.5, 2.0)
    save_head(head, tmp_path / "h")
    loaded = load_head(tmp_path / "h.json", model_hidden_size=24)
    h, e = torch.randn(7, 24), torch.randn(7, 2)
    (p1, u1), (p2, u2) = head.eval()(h, e), loaded(h, e)
    assert torch.equal(p1, p2) and torch.equal(u1, u2)
    assert loaded.cfg == cfg and count_params(loaded) == count_params(head)


def test_bf16_checkpoint_loads_close(tmp_path):
    head = LengthHead(HeadConfig(24, [16]))
    save_head(head, tmp_path / "h", dtype=torch.bfloat16)
    loaded = load_head(tmp_path / "h")
    h = torch.randn(5, 24)
    assert torch.allclose(head.eval()(h)[0], loaded(h)[0], rtol=0.05)


def test_hidden_size_mismatch_names_both_sizes(tmp_path):
    save_head(LengthHead(HeadConfig(576, [8])), tmp_path / "h")
    with pytest.raises(ValueError, match=r"checkpoint hidden size 576 does not match model hidden size 64"):
        load_head(tmp_path / "h", model_hidden_size=64)
    head = load_head(tmp_path / "h")
    with pytest.raises(ValueError, match="64.*576"):
        head(torch.randn(2, 64))


def _gens(k: int, rng, prefix: str = "src") -> list[Generation]:
    out = []
    for i in range(k):
        n = int(rng.integers(2, 30))
        finish = "length" if i % 7 == 0 else "eos"
        out.append(Generation(f"{prefix}:{i}", "src", [1] * int(rng.integers(3, 9)), [5] * (n - 1) + [2], finish, 64))
    return out


def test_split_is_by_prompt_and_labels_count_down():
    rng = np.random.default_rng(0)
    gens = _gens(300, rng)
    states = {g.id: {"final_norm": rng.normal(size=(len(g.response), 4)).astype(np.float16)} for g in gens}
    by_split = {s: [g for g in gens if split_of(g.id) == s] for s in SPLITS}
    assert all(split_of(g.id) == split_of(g.id) for g in gens)  # deterministic
    assert 150 < len(by_split["train"]) < 270 and len(by_split["test"]) > 30
    points = {s: build_points(by_split[s], states) for s in SPLITS}
    ids = [set(points[s].ids) for s in SPLITS]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    ps = points["train"]
    truncated = {g.id for g in gens if g.finish == "length"}
    assert not truncated & set(ps.ids)  # censored responses are excluded
    first = ps.request[0]
    m = ps.request == first
    n = len(next(g for g in gens if g.id == ps.ids[first]).response)
    assert list(ps.remaining[m]) == list(range(n, 0, -1))  # label = tokens still to produce, EOS included
    assert list(ps.position[m]) == list(range(n))
    gid = ps.ids[first]
    assert np.array_equal(ps.hidden["final_norm"][m], states[gid]["final_norm"])


def test_generations_file_survives_a_torn_tail(tmp_path):
    path = tmp_path / "g.jsonl.gz"
    rng = np.random.default_rng(1)
    a, b = _gens(3, rng), _gens(2, rng, prefix="other")
    append_generations(path, a)
    append_generations(path, b)
    assert [g.id for g in read_generations(path)] == [g.id for g in a + b]
    with open(path, "ab") as f:  # a run killed mid-write leaves half a gzip member
        f.write(gzip.compress(b'{"id": "x"}\n')[:10])
    assert len(read_generations(path)) == 5


def test_metrics_buckets_and_flops():
    true = np.array([10.0, 5.0, 1.0, 100.0])
    pred = np.array([12.0, 5.0, 2.0, 50.0])
    r = evaluate(pred, true, np.array([0.0, 0.5, 0.95, 0.0]), np.array([10, 10, 10, 100]), upper=true + 1)
    assert r["mae"] == pytest.approx(53 / 4)
    assert r["mae_by_progress"]["0-10%"] == pytest.approx(26.0)
    assert r["mae_by_length"]["1-63"] == pytest.approx(1.0)
    assert r["p90_coverage"] == 1.0
    cfg = HeadConfig(576, [2048, 512, 64])
    assert head_flops(cfg) > 2 * count_params(LengthHead(cfg)) - 10_000


def test_cli_registers_predictor_commands():
    from ares.cli import build_parser

    args = build_parser().parse_args(["predictor", "collect", "--limit", "5", "--max-new-tokens", "1024"])
    assert args.limit == 5 and callable(args.func)
    args = build_parser().parse_args(["predictor", "train", "--epochs", "2"])
    assert args.epochs == 2 and callable(args.func)


def test_make_extra_matches_training_features():
    from ares.predictor.features import extra_features

    head = LengthHead(HeadConfig(8, [4], extra_features=["log_generated", "log_prompt_len"]))
    g, p = np.array([0, 5, 300]), np.array([12, 40, 900])
    torch_extra = head.make_extra(torch.tensor(g), torch.tensor(p))
    np.testing.assert_allclose(torch_extra.numpy(), extra_features(g, p), rtol=1e-6)
    assert LengthHead(HeadConfig(8, [4])).make_extra(torch.tensor(g), torch.tensor(p)) is None


def test_merge_generations_keeps_first_copy(tmp_path):
    from ares.predictor.generations import merge_generations

    rng = np.random.default_rng(2)
    a, b = _gens(3, rng), _gens(5, rng)  # same ids src:0..2 in both
    append_generations(tmp_path / "a.gz", a)
    append_generations(tmp_path / "b.gz", b)
    assert merge_generations(tmp_path / "a.gz", tmp_path / "b.gz") == 5
    got = read_generations(tmp_path / "a.gz")
    assert [g.response for g in got[:3]] == [g.response for g in a]
