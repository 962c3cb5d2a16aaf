"""`ares model prepare`: build the cached model directories (idempotent) and print their paths."""

from __future__ import annotations

import argparse

from ares.models.prepare import MODEL_NAMES, prepare_model


def _model_name(name: str) -> str:
    # A `type` check, not `choices`: argparse would test an empty `nargs="*"` list against `choices` as a whole.
    if name not in MODEL_NAMES:
        raise argparse.ArgumentTypeError(f"unknown model {name!r} (choose from {', '.join(MODEL_NAMES)})")
    return name


def _prepare(args: argparse.Namespace) -> int:
    for name in args.models or MODEL_NAMES:
        print(f"{name}: {prepare_model(name, force=args.force)}", flush=True)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `ares model ...`."""
    p = sub.add_parser("model", help="prepare the models ARES serves (SmolLM2-135M, tiny random)")
    msub = p.add_subparsers(dest="model_command", required=True)
    prep = msub.add_parser("prepare", help="convert/build models into the cache (idempotent); prints their paths")
    prep.add_argument(
        "models",
        nargs="*",
        type=_model_name,
        metavar="MODEL",
        help=f"models to prepare (default: all of {', '.join(MODEL_NAMES)})",
    )
    prep.add_argument("--force", action="store_true", help="rebuild even when cached")
    prep.set_defaults(func=_prepare)
