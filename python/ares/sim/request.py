"""A request's simulator state (`_Req`): its sizes, where it is, its timing and its counters."""

from __future__ import annotations

import math


class _Req:
    """One request's state; the router's view of all requests is kept column-wise in `ClusterSim`."""

    __slots__ = (
        "i", "arrival", "prompt", "out", "z", "inst", "join_step", "gen0", "len0", "epoch", "t_first",
        "t_finish", "retractions", "migrations", "migrate_to", "reserved", "gen_now", "last_tok", "max_gap",
        "seg0", "meas",
    )  # fmt: skip

    def __init__(self, i: int, arrival: float, prompt: int, out: int, z: float) -> None:
        self.i, self.arrival, self.prompt, self.out, self.z = i, arrival, prompt, out, z
        self.inst = -1
        self.join_step = 0
        self.gen0 = 1  # the first token comes from prefill
        self.len0 = prompt
        self.epoch = 0
        self.t_first = math.nan
        self.t_finish = math.nan
        self.retractions = 0
        self.migrations = 0
        self.migrate_to = -1
        self.reserved = 0
        self.gen_now = 1  # generated tokens while not running (queued, retracted, migrating)
        self.last_tok = math.nan  # time of its latest token (valid while not running; see `_gap_accounting`)
        self.max_gap = 0.0  # its longest token gap so far
        self.seg0 = 0  # index of the first segment of its current instance it takes part in
        self.meas = True  # its gaps go into the ITL histogram (arrived after the warm-up)
