"""`ares model prepare|path`: build or locate the cached model directories."""

from __future__ import annotations

import argparse

from ares.models.prepare import MODEL_NAMES, prepare_model


def _prepare(args: argparse.Namespace) -> int:
    for name in args.models:
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
        default=list(MODEL_NAMES),
        choices=MODEL_NAMES,
        metavar="MODEL",
        help=f"models to prepare (default: all of {', '.join(MODEL_NAMES)})",
    )
    prep.add_argument("--force", action="store_true", help="rebuild even when cached")
    prep.set_defaults(func=_prepare)
