"""The offered load of a live run chosen from the cluster just started (`--rate auto`, the demo's default).

A fixed rate means something only on the machine it was tuned on: on a slower one it puts every policy deep in
overload, where the comparison says nothing. After the single-request calibration, the rate is scaled from one
measured reference point by this machine's speed:

    rate = REFERENCE_RATE x min(reference TPOT / measured TPOT, reference TTFT / measured TTFT)

The reference is the live run `benchmark/results/live_cluster_r012.json` (`python benchmark/live_cluster.py --rate
0.12 --name live_cluster_r012`): at 0.12 req/s, with one request alone at TPOT 27 ms and TTFT 0.62 s, least_kv met
the SLO for 0.94 of the requests (round robin 0.92, ares 0.98). The slower of decode and prefill sets the scale: on
these 2-core machines the three servers share the cores, so either one slowing down slows the whole cluster.

Why not the simulator: with the stored CPU profile rescaled to the reference calibration it puts least_kv at 90%
attainment at 0.32 req/s, while live attainment had already collapsed to 0.25 at 0.14 req/s
(`live_cluster_r014.json`): the profile was fitted at up to 4.7 running requests per server and the simulator gives
each server its own CPU, so it misses the cliff where the servers crowd the two cores.
"""

from __future__ import annotations

REFERENCE_RATE = 0.12  # req/s: least_kv attainment 0.94 there (live_cluster_r012)
REFERENCE_TPOT_S = 0.027  # one request alone on that cluster
REFERENCE_TTFT_S = 0.62
REFERENCE = "benchmark/results/live_cluster_r012.json"


def pick_rate(calibration: dict) -> dict:
    """The reference rate scaled by this machine's measured single-request TPOT and TTFT (see the module docstring),
    with the factors, for the record."""
    speed = min(REFERENCE_TPOT_S / calibration["tpot_s"], REFERENCE_TTFT_S / calibration["ttft_s"])
    return {
        "rate": round(REFERENCE_RATE * speed, 4),
        "speed_vs_reference": speed,
        "reference": {
            "rate": REFERENCE_RATE, "tpot_s": REFERENCE_TPOT_S, "ttft_s": REFERENCE_TTFT_S, "from": REFERENCE
        },  # fmt: skip
    }
