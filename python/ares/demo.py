"""`ares demo` (`make demo`): SGLang's own PD router against ARES on a real CPU cluster, side by side.

The live benchmark (`ares.live`) cut down to one short replay: 1 prefill + 2 `--ares` decode SGLang servers
(SmolLM2-135M with the shipped length head, a small KV pool), held-out prompts whose own answers form a long tail,
R1 arrivals at a load picked for this machine (`--rate auto`: see `ares.live.autorate`); SGLang's router
(`sglang_power_of_two`, what a user would otherwise run), then an ARES router (`ares`), over the same servers and
the same request list. Shows requests done and each decode server's KV while it runs, then prints the side-by-side
table and writes `.ares/demo/demo.{json,md,png}` (never the repository's recorded results). Ctrl-C stops every
process it started.
"""

from __future__ import annotations

import argparse

from ares.live.run import add_arguments, run_live


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `ares demo`."""
    p = sub.add_parser(
        "demo",
        help="SGLang's router vs ARES on a real CPU cluster (SmolLM2 + the length head), side by side",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p, output_dir=".ares/demo", name="demo")
    p.set_defaults(policies="sglang_power_of_two,ares", seeds="1", num_requests=24, rate="auto", func=run_live)
