"""Hidden-state shards: per request, the final-norm and middle-layer states of every generated token.

Kept outside the repository (hundreds of MB); they can always be recomputed from the token file by teacher
forcing (``ares predictor features --recompute``). Shard layout (npz): ``ids`` (str), ``offsets`` (int64, n+1),
``final`` and ``mid`` (float16 [total_tokens, H]), ``mid_layer``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

DEFAULT_STATES_DIR = (
    Path(os.environ.get("ARES_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ares"))
    / "predictor"
    / "states"
)


def write_state_shard(directory: Path, states: dict[str, tuple[np.ndarray, np.ndarray]], mid_layer: int) -> Path:
    """Write one shard holding `states` (id -> (final [n,H], mid [n,H])); return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids = list(states)
    lengths = [states[i][0].shape[0] for i in ids]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    final = np.concatenate([states[i][0] for i in ids]).astype(np.float16)
    mid = np.concatenate([states[i][1] for i in ids]).astype(np.float16)
    path = directory / f"shard-{time.time_ns()}.npz"
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, ids=np.array(ids), offsets=offsets, final=final, mid=mid, mid_layer=np.int64(mid_layer))
    tmp.replace(path)
    return path


def read_state_shards(directory: Path, wanted: set[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Map request id -> {"final_norm": [n,H], "layer_<i>": [n,H]} over every shard (optionally only `wanted`)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for path in sorted(Path(directory).glob("shard-*.npz")):
        if path.name.endswith(".tmp.npz"):
            continue
        with np.load(path) as z:
            ids, off, final, mid = list(z["ids"]), z["offsets"], z["final"], z["mid"]
            mid_name = f"layer_{int(z['mid_layer'])}"
        for i, rid in enumerate(ids):
            if wanted is None or rid in wanted:
                out[str(rid)] = {"final_norm": final[off[i] : off[i + 1]], mid_name: mid[off[i] : off[i + 1]]}
    return out
