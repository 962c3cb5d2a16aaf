"""The GPU check, on whatever CUDA device this machine has: the fused length-head kernel against torch and the HBM
floor, and the head's share of a 7B decode step (eager and CUDA-graph replay), written under
`benchmark/results/gpu/<device>/kernel_bench.{json,md}` with the device name, commit and command inside.

No install needed beyond torch, triton and transformers (run from the repository root):
    PYTHONPATH=python python benchmark/gpu_check.py            # full check (~5-8 min on an H100)
    PYTHONPATH=python python benchmark/gpu_check.py --quick    # fewer shapes and reps (~2 min)
Exits 2 with a message where no CUDA device is found. See docs/gpu.md for the GPU cluster recipe.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import kernel_bench

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--bs", "1", "8", "64", "256", "--hidden", "576", "3584", "--reps", "30", "--model-reps", "10"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes, hidden sizes and repetitions")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing measured", file=sys.stderr)
        return 2
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    out = ROOT / "benchmark" / "results" / "gpu" / slug
    print(f"gpu_check: {torch.cuda.get_device_name()} -> {out}", flush=True)
    return kernel_bench.main([*(QUICK if args.quick else []), "--out", str(out)])


if __name__ == "__main__":
    sys.exit(main())
