"""`ares predictor features`: what the data holds, and proof that the captured states are the model's states.

Hidden states are captured while decoding (the exact decode-step tensors; teacher forcing all responses again
would cost as much CPU as generating them). This command teacher-forces a few requests (prompt + response,
one forward pass) and compares, and with ``--recompute`` fills in states for requests that lack them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ares.predictor.features import teacher_forced_states
from ares.predictor.generations import Generation, read_generations
from ares.predictor.hidden_store import read_state_shards, write_state_shard
from ares.predictor.loops import LOOP_SPAN, has_loop


def _load_model(name: str):
    import torch
    from transformers import AutoModelForCausalLM

    from ares.models import prepare_model

    return AutoModelForCausalLM.from_pretrained(prepare_model(name), dtype=torch.float32).eval()


def loop_stats(gens: list[Generation], span: int = LOOP_SPAN) -> dict[str, dict[str, int]]:
    """Per finish reason: responses, and those with a `span`-token repeating stretch at one of the collector's
    check points (every 16 tokens). Evidence for `--stop-loops`: EOS-ended answers should have none."""
    out: dict[str, dict[str, int]] = {}
    for g in gens:
        row = out.setdefault(g.finish, {"responses": 0, "with_loop": 0})
        row["responses"] += 1
        row["with_loop"] += has_loop(g.response, span)
    return out


def features_command(gen_path: Path, states_dir: Path, verify: int, recompute: bool, model_name: str) -> dict:
    """Summary dict: counts, and max / mean abs difference of captured vs teacher-forced states."""
    from ares.predictor.pipeline import dataset_summary

    gens = read_generations(gen_path)
    states = read_state_shards(states_dir)
    missing = [g for g in gens if g.id not in states]
    out: dict = {
        "dataset": dataset_summary(gens),
        "loops_256": loop_stats(gens),
        "with_states": len(gens) - len(missing),
        "missing": len(missing),
    }
    if not verify and not (recompute and missing):
        return out
    model = _load_model(model_name)
    mid = model.config.num_hidden_layers // 2
    checks = []
    # Shortest first: the check is about equality, not coverage, and CPU is scarce.
    for g in sorted([g for g in gens if g.id in states], key=lambda g: len(g.prompt) + len(g.response))[:verify]:
        tf = teacher_forced_states(model, g.prompt, g.response, mid)
        for layer, arr in tf.items():
            cap = states[g.id][layer].astype(np.float32)
            ref = arr.astype(np.float32)
            cos = (cap * ref).sum(1) / (np.linalg.norm(cap, axis=1) * np.linalg.norm(ref, axis=1))
            checks.append(
                {
                    "id": g.id,
                    "layer": layer,
                    "tokens": len(g.response),
                    "max_abs_diff": float(np.abs(cap - ref).max()),
                    "mean_abs_diff": float(np.abs(cap - ref).mean()),
                    "ref_mean_abs": float(np.abs(ref).mean()),
                    "min_cosine": float(cos.min()),
                }
            )
    out["verify"] = checks
    if recompute and missing:
        for g in missing:
            tf = teacher_forced_states(model, g.prompt, g.response, mid)
            write_state_shard(states_dir, {g.id: (tf["final_norm"], tf[f"layer_{mid}"])}, mid)
        out["recomputed"] = len(missing)
    return out
