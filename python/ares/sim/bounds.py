"""Pooled-capacity bound: what perfect placement could reach, simulated with the same engine.

The cluster's D decode instances are replaced by ONE decode instance holding all of their KV (D x C tokens) and
all of their compute: its step with batch N and K KV tokens takes a + (b N + c K) / D, the mean of the D
instances' step times (a + b n_i + c K_i) when the same requests are spread over them. It has their D NICs
(each KV transfer its own link: one NIC taking every P->D transfer of 256 instances capped the pool at 155 req/s
where the cluster served 350) and their D host links (a retraction's backup copy stalls the whole pooled batch, so
it runs at D x the bandwidth: the mean stall per request is one instance's). The prefill instances, retraction and
the workload (lengths clipped as one real instance clips them) are unchanged.
Admission is SGLang's reserve rule (free - need >= reserve x (running + 1)) with the reserve divided by D: the
rule is applied per instance and is not additive, so a cluster whose instance i admits when its own free KV
covers reserve x (n_i + 1) can run with far less total headroom than reserve x (N + 1); the pool with the full
reserve was measured stricter than least_kv on R1 (it queued where the cluster admitted). With reserve / D the
pool's headroom is that of an instance holding the average batch.

So the pool has no fragmentation (a request fits if the cluster's free KV adds up to it), perfect balance
(every request sees the cluster's mean step time) and no migration cost or delay: an upper reference for
placement and rebalancing, not a theorem. Goodput counts the rate at which 90% of requests meet the SLO, and
the fraction of requests under a threshold is not improved by averaging: with a TPOT SLO below the mean step
time, a cluster whose lightly loaded instances step faster than the mean meets more requests than the pool
(seen on R1 with `tpot_0.8x`). A policy above 100% of the bound says that, not that the bound is wrong. Its
per-instance numbers (KV spread, migrations) are meaningless: one instance.
"""

from __future__ import annotations

import dataclasses
import math

from .cost_model import CostModel
from .engine import SimConfig

POOLED_BOUND = "pooled_bound"  # the name the bound goes by beside the policies


def pooled_cost(cost: CostModel, n: int) -> CostModel:
    """One instance with the KV capacity and the per-step compute/bandwidth of `n` instances of `cost`."""
    return dataclasses.replace(
        cost,
        name=f"{cost.name} pooled x{n}",
        step_per_request_s=cost.step_per_request_s / n,
        step_per_kv_token_s=cost.step_per_kv_token_s / n,
        kv_capacity_tokens=cost.kv_capacity_tokens * n,
        host_bytes_per_s=cost.host_bytes_per_s * n,
    )


def pooled_config(cfg: SimConfig) -> SimConfig:
    """The pooled-bound run of cluster `cfg`: one decode instance, the same prefill instances (module docstring)."""
    n_prefill = cfg.n_prefill or max(1, cfg.n_decode // 2)
    reserve = math.ceil(cfg.reserve_tokens / cfg.n_decode)
    return dataclasses.replace(
        cfg,
        n_decode=1,
        n_prefill=n_prefill,
        cost=pooled_cost(cfg.cost, cfg.n_decode),
        policy="round_robin",  # one instance: nothing to decide
        link_contention=False,  # the cluster's D NICs: no transfer queues behind another on one link
        reserve_tokens=reserve,
        # lengths are clipped to capacity - reserve - 1: keep one real instance's limit
        clip_capacity=(cfg.clip_capacity or cfg.cost.kv_capacity_tokens) - cfg.reserve_tokens + reserve,
    )
