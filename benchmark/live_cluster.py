"""Live CPU cluster benchmark: round_robin, least_kv, current_migrate and ares on one set of real SGLang servers
(1 prefill + 2 `--ares` decode, SmolLM2-135M with the shipped head), the same held-out long-tail request list per
seed, R1 arrivals; then the simulator with the cost profile measured from the same servers, side by side.

Writes benchmark/results/live_cluster.{json,md,png} and, with --write-profile (on by default here), the simulator's
`cpu-smollm2-135m-measured` preset (python/ares/sim/cost_profiles.json). Server and router logs go to
.ares/live_cluster/logs. The same as `ares bench live` with the recorded-results defaults; every flag of that
command applies (`--help`), e.g. `--seeds 1 --policies round_robin,ares` to cut it down.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ares.live.run import add_arguments, run_live

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, output_dir=str(ROOT / "benchmark" / "results"))
    p.set_defaults(write_profile=True, log_dir=str(ROOT / ".ares" / "live_cluster" / "logs"))
    return run_live(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
