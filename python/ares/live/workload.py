"""The live benchmark's requests: held-out prompts whose own greedy answers form a long tail, arriving as the
ServeGen DeepSeek-R1 process does, scaled to the cluster (the arrival process ships with the package).

Prompts come from the predictor's test split (`ares.predictor.features.split_of`: never trained on). The collected
generations say how long the model answers each one greedily; a fraction `long_fraction` of the requests is drawn
from prompts answered with at least `long_min` tokens (the tail, including answers the collector cut at its
1,024-token cap), the rest from the shorter ones. Requests carry no length hint: no `ignore_eos`, one generous
`max_new_tokens` for all, so only the decode servers' head can tell a long answer from a short one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ares.predictor.features import split_of
from ares.predictor.generations import DEFAULT_PATH, read_generations
from ares.workloads.servegen import r1_arrival_times


@dataclass(frozen=True)
class LiveRequest:
    """One request of the replay: what is sent, when, and the collected greedy answer's length (for reporting)."""

    rid: str
    prompt_id: str
    input_ids: tuple[int, ...]
    arrival_s: float
    collected_tokens: int  # length of the collected greedy answer (a lower bound when it did not end with EOS)
    collected_finish: str  # "eos" | "length" | "loop"

    def meta(self) -> dict:
        """JSON-able description without the token ids."""
        d = asdict(self)
        d.pop("input_ids")
        d["prompt_tokens"] = len(self.input_ids)
        return d


def r1_arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """The first `n` arrival times (s, from 0) of the ServeGen R1 process at a mean of `rate` req/s."""
    duration = 1.5 * n / rate + 60.0
    for _ in range(8):
        t = r1_arrival_times(rate=rate, duration_s=duration, seed=seed)
        if len(t) >= n:
            return np.asarray(t[:n] - t[0])
        duration *= 2
    raise ValueError(f"the R1 process gave fewer than {n} arrivals")


def live_workload(
    n: int,
    rate: float,
    seed: int,
    long_fraction: float = 0.2,
    long_min: int = 400,
    max_prompt_tokens: int = 512,
    generations: Path = DEFAULT_PATH,
) -> list[LiveRequest]:
    """`n` requests from held-out prompts (a `long_fraction` of them from the long tail), R1 arrivals at `rate`."""
    gens = [g for g in read_generations(generations) if split_of(g.id) == "test" and len(g.prompt) <= max_prompt_tokens]
    if not gens:
        raise FileNotFoundError(f"no held-out generations in {generations} (run `ares predictor collect` first)")
    long_pool = [g for g in gens if len(g.response) >= long_min]
    short_pool = [g for g in gens if len(g.response) < long_min and g.ended_with_eos]
    rng = np.random.default_rng(seed)
    n_long = int(round(n * long_fraction))
    if n_long > len(long_pool) or n - n_long > len(short_pool):
        raise ValueError(
            f"asked {n_long} long + {n - n_long} short prompts; the test split has {len(long_pool)} + {len(short_pool)}"
        )
    picked = [long_pool[i] for i in rng.choice(len(long_pool), n_long, replace=False)]
    picked += [short_pool[i] for i in rng.choice(len(short_pool), n - n_long, replace=False)]
    order = rng.permutation(n)
    arrivals = r1_arrivals(n, rate, seed)
    return [
        LiveRequest(
            rid=f"live-s{seed}-{k:03d}",
            prompt_id=picked[j].id,
            input_ids=tuple(picked[j].prompt),
            arrival_s=float(arrivals[k]),
            collected_tokens=len(picked[j].response),
            collected_finish=picked[j].finish,
        )
        for k, j in enumerate(order)
    ]
