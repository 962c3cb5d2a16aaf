"""`ares predictor ...`: collect generations, build features, train heads, evaluate against baselines."""

from __future__ import annotations

import argparse
from pathlib import Path

from ares.predictor.loops import LOOP_SPAN
from ares.provenance import record

_ROOT = Path(__file__).resolve().parents[3]  # the checkout of an editable install (results record its commit)


def _collect(args: argparse.Namespace) -> int:
    from ares.predictor.collect import CollectConfig, collect

    cfg = CollectConfig(
        model=args.model,
        out=Path(args.out),
        limit=args.limit,
        offset=args.offset,
        max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        batch_size=args.batch_size,
        sources=tuple(args.sources),
        seed=args.seed,
        threads=args.threads,
        loop_span=args.stop_loops,
        states_dir=None if args.no_states else Path(args.states_dir),
    )
    n = collect(cfg)
    print(f"{n} generations in {cfg.out}")
    return 0


def add_parser(subparsers) -> None:
    """Register `ares predictor` and its subcommands."""
    from ares.predictor.generations import DEFAULT_PATH
    from ares.predictor.hidden_store import DEFAULT_STATES_DIR
    from ares.predictor.prompts import SOURCES

    p = subparsers.add_parser("predictor", help="remaining-length predictor: collect / features / train / eval")
    sub = p.add_subparsers(dest="predictor_command", required=True)

    c = sub.add_parser("collect", help="let the model answer real prompts (greedy), resumable")
    c.add_argument("--model", default="smollm2")
    c.add_argument("--out", default=str(DEFAULT_PATH))
    c.add_argument("--states-dir", default=str(DEFAULT_STATES_DIR), help="captured hidden states (outside repo)")
    c.add_argument("--no-states", action="store_true", help="do not keep hidden states captured while decoding")
    c.add_argument("--limit", type=int, default=None, help="only the first N prompts of the interleaved list")
    c.add_argument("--offset", type=int, default=0, help="skip the first N prompts (for a second worker)")
    c.add_argument("--max-new-tokens", type=int, default=1024)
    c.add_argument("--max-prompt-tokens", type=int, default=1024, help="skip longer (templated) prompts")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument(
        "--stop-loops",
        type=int,
        default=LOOP_SPAN,
        metavar="SPAN",
        help="stop a response whose last SPAN tokens repeat a cycle of <= 64 tokens (finish 'loop'); 0: never",
    )
    c.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    c.set_defaults(func=_collect)
    _add_later_commands(sub)


def _merge(args: argparse.Namespace) -> int:
    from ares.predictor.generations import merge_generations

    n = merge_generations(Path(args.generations), *(Path(x) for x in args.parts))
    print(f"{n} generations in {args.generations}")
    return 0


def _features(args: argparse.Namespace) -> int:
    """Dataset summary + check that captured decode-step states equal teacher-forced ones (or fill gaps)."""
    import json

    from ares.predictor.features_cmd import features_command

    doc = features_command(Path(args.generations), Path(args.states_dir), args.verify, args.recompute, args.model)
    doc["provenance"] = record(_ROOT, [Path(args.generations)])
    print(json.dumps(doc, indent=1))
    return 0


def _train(args: argparse.Namespace) -> int:
    from ares.predictor.pipeline import load_data, train_heads
    from ares.predictor.train import TrainConfig

    data = load_data(Path(args.generations), Path(args.states_dir), train_cap=args.train_cap)
    tc = TrainConfig(epochs=args.epochs, threads=args.threads, max_seconds=args.max_seconds, dropout=args.dropout)
    from ares.predictor.pipeline import HEADS_DIR

    # Only a run on the default data and output updates the checkpoint shipped in the repo.
    train_heads(data, Path(args.heads_dir), args.heads or None, tc, repo_copy=Path(args.heads_dir) == HEADS_DIR)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from ares.predictor.baselines import MiniLMConfig
    from ares.predictor.pipeline import evaluate_all, load_data, write_report

    torch.set_num_threads(args.threads)
    data = load_data(Path(args.generations), Path(args.states_dir), train_cap=args.train_cap)
    res = evaluate_all(
        data, Path(args.heads_dir), MiniLMConfig(epochs=args.minilm_epochs, max_seconds=args.minilm_max_seconds)
    )
    res["provenance"] = record(_ROOT, [Path(args.generations)])
    for path in write_report(res, Path(args.out_dir)):
        print(f"wrote {path}")
    print(Path(args.out_dir, "predictor_accuracy.md").read_text())
    return 0


def _add_later_commands(sub) -> None:
    from ares.predictor.generations import DEFAULT_PATH
    from ares.predictor.hidden_store import DEFAULT_STATES_DIR
    from ares.predictor.pipeline import HEADS_DIR, REPO

    def common(p):
        p.add_argument("--generations", default=str(DEFAULT_PATH))
        p.add_argument("--states-dir", default=str(DEFAULT_STATES_DIR))
        p.add_argument("--threads", type=int, default=1)

    m = sub.add_parser("merge", help="fold other workers' generation files into --generations (first copy wins)")
    m.add_argument("parts", nargs="+", help="generation files written by `collect --out`")
    m.add_argument("--generations", default=str(DEFAULT_PATH))
    m.set_defaults(func=_merge)

    f = sub.add_parser("features", help="summarise data; verify captured states against teacher forcing")
    common(f)
    f.add_argument("--model", default="smollm2")
    f.add_argument("--verify", type=int, default=4, help="teacher-force N requests and compare their states")
    f.add_argument("--recompute", action="store_true", help="teacher-force every request lacking states")
    f.set_defaults(func=_features)

    t = sub.add_parser("train", help="train the heads (paper shape, ours, ablations)")
    common(t)
    t.add_argument("--heads-dir", default=str(HEADS_DIR))
    t.add_argument("--heads", nargs="*", default=[], help="subset of head names (default: all)")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--train-cap", type=int, default=256, help="points per training request")
    t.add_argument("--max-seconds", type=float, default=None, help="wall-clock budget per head")
    t.add_argument("--dropout", type=float, default=0.3, help="dropout after hidden activations (training only)")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="baselines + trained heads on held-out prompts -> benchmark/results")
    common(e)
    e.add_argument("--heads-dir", default=str(HEADS_DIR))
    e.add_argument("--train-cap", type=int, default=256)
    e.add_argument("--minilm-epochs", type=int, default=3)
    e.add_argument("--minilm-max-seconds", type=float, default=None)
    e.add_argument("--out-dir", default=str(REPO / "benchmark" / "results"))
    e.set_defaults(func=_eval)
