"""Remaining-length predictor accuracy: trained heads vs constant, tokens-so-far and prompt-only proxy baselines.

Writes benchmark/results/predictor_accuracy.{json,md,png}. Prerequisites (same defaults as the CLI):
  ares predictor collect            # generations -> benchmark/data/predictor_generations.jsonl.gz (+ hidden states)
  ares predictor train              # heads -> ~/.cache/ares/predictor/heads
                                    # ("ours" also -> python/ares/predictor/checkpoints)
Then: python benchmark/predictor_accuracy.py   (same as `ares predictor eval`)
"""

from __future__ import annotations

import sys

from ares.cli import main

if __name__ == "__main__":
    sys.exit(main(["predictor", "eval", *sys.argv[1:]]))
