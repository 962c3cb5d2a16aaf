"""The `ares` command: one subcommand per feature, each registered by its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes `add_parser(subparsers)`, which registers its subcommand and sets `func`.
# Adding a command touches this list only.
COMMAND_MODULES = [
    "ares.models.cli",
    "ares.cluster.cli",
    "ares.demo",
    "ares.live.run",
    "ares.predictor.cli",
    "ares.sim.cli",
    "ares_router.cli",
]


def build_parser() -> argparse.ArgumentParser:
    """The full `ares` argument parser."""
    parser = argparse.ArgumentParser(prog="ares", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ares` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
