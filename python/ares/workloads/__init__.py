"""Workloads: real trace readers and samplers (Azure conv, Mooncake conv, ShareGPT stats, ServeGen R1)."""

from __future__ import annotations

from .base import Workload, data_root, renewal_arrivals, rescale_to_rate, traces_dir
from .servegen import servegen_r1
from .traces import read_azure_conv, read_mooncake_conv, sharegpt_workload

WORKLOADS = ("r1", "azure_conv", "mooncake_conv", "sharegpt")


def load_workload(name: str, rate: float | None, duration_s: float, seed: int = 0, **kw) -> Workload:
    """Workload `name` at mean `rate` req/s for `duration_s` seconds (`seed` drives sampled ones)."""
    if name == "r1":
        return servegen_r1(rate=rate, duration_s=duration_s, seed=seed, **kw)
    if name == "azure_conv":
        return read_azure_conv(rate=rate, duration_s=duration_s, **kw)
    if name == "mooncake_conv":
        return read_mooncake_conv(rate=rate, duration_s=duration_s, **kw)
    if name == "sharegpt":
        if rate is None:
            raise ValueError("sharegpt has no timestamps: give a rate")
        return sharegpt_workload(rate=rate, duration_s=duration_s, seed=seed, **kw)
    raise KeyError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")


__all__ = [
    "WORKLOADS",
    "Workload",
    "data_root",
    "load_workload",
    "read_azure_conv",
    "read_mooncake_conv",
    "renewal_arrivals",
    "rescale_to_rate",
    "servegen_r1",
    "sharegpt_workload",
    "traces_dir",
]
