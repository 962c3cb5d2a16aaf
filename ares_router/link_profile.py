"""Per-link migration cost profiles: what moving one running request's KV between two decode servers costs.

A profile gives the sustained KV transfer rate of the link, a fixed cost per migration (commands, B's attach and
reservation) and the pause the request suffers at the switch. Together with the model's KV bytes per token it
becomes the policy's `MigrationCost`, for the router (`--ares-migrate-link`) and the simulator alike.

- `cpu-loopback-measured`: fitted by `fit_profile` to `benchmark/migration_bench.py`'s pre-copy runs (Mooncake TCP on
  loopback, 2-core CPU) and stored with its provenance in `link_profiles.json` next to this file; the benchmark
  rewrites it on every full run.
- `rdma-4x200g`, `rdma-8x400g`: Mooncake Transfer Engine's published bandwidth (kvcache-ai/Mooncake README: up to
  87 GB/s on 4x200 Gbps RoCE and 190 GB/s on 8x400 Gbps RoCE, 40 GB transfers). Their setup and pause are our
  assumptions (a few control round trips; about two decode steps of a 7B model on an H100), named as such.
Not here: NVLink (no published Mooncake figure we could cite).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from ares_router.policy import MigrationCost

MEASURED_FILE = Path(__file__).with_name("link_profiles.json")
DEFAULT_LINK = "cpu-loopback-measured"


@dataclass(frozen=True)
class LinkProfile:
    """Migration cost constants of one kind of link."""

    name: str
    bytes_per_s: float  # sustained KV transfer rate (whole migration, pre-copy stages included)
    setup_s: float  # fixed cost per migration, independent of the KV size
    pause_s: float  # the request's stall at the switch (pre-copy makes it independent of the KV size)
    source: str  # where the numbers come from

    def migration_cost(self, kv_bytes_per_token: float) -> MigrationCost:
        """The policy's view of a migration on this link for a model with `kv_bytes_per_token`."""
        return MigrationCost(kv_bytes_per_token, self.bytes_per_s, self.pause_s, self.setup_s)

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)


PUBLISHED = {
    "rdma-4x200g": LinkProfile(
        "rdma-4x200g", 87e9, 0.005, 0.02,
        "bandwidth: Mooncake README (kvcache-ai/Mooncake), Transfer Engine on 4x200 Gbps RoCE; setup 5 ms and pause "
        "20 ms are assumptions",
    ),
    "rdma-8x400g": LinkProfile(
        "rdma-8x400g", 190e9, 0.005, 0.02,
        "bandwidth: Mooncake README (kvcache-ai/Mooncake), Transfer Engine on 8x400 Gbps RoCE; setup 5 ms and pause "
        "20 ms are assumptions",
    ),
}  # fmt: skip


def fit_profile(name: str, runs: Iterable[dict], source: str) -> LinkProfile:
    """Least-squares fit of `total_s = setup_s + bytes / bytes_per_s` over committed migrations (each a dict with
    `bytes`, `total_ms`, `pause_ms`), and the median pause. Needs two distinct sizes."""
    pts = [(float(r["bytes"]), r["total_ms"] / 1e3, r["pause_ms"] / 1e3) for r in runs]
    if len({b for b, _, _ in pts}) < 2:
        raise ValueError(f"fitting {name!r} needs committed migrations of at least two sizes, got {len(pts)}")
    mean_b = statistics.fmean(b for b, _, _ in pts)
    mean_t = statistics.fmean(t for _, t, _ in pts)
    slope = sum((b - mean_b) * (t - mean_t) for b, t, _ in pts) / sum((b - mean_b) ** 2 for b, _, _ in pts)
    if slope <= 0:
        raise ValueError(f"fitting {name!r}: total time does not grow with the bytes moved ({pts})")
    setup = max(0.0, mean_t - slope * mean_b)
    return LinkProfile(name, 1.0 / slope, setup, statistics.median(p for _, _, p in pts), source)


def load_profiles(path: Path = MEASURED_FILE) -> dict[str, LinkProfile]:
    """Every known profile: the published ones and the measured ones stored in `path`."""
    out = dict(PUBLISHED)
    if path.exists():
        for entry in json.loads(path.read_text())["profiles"]:
            out[entry["name"]] = LinkProfile(**entry)
    return out


def get_link_profile(name: str) -> LinkProfile:
    """Profile by name; a clear error naming the known ones."""
    profiles = load_profiles()
    try:
        return profiles[name]
    except KeyError:
        raise KeyError(f"unknown link profile {name!r}; known: {', '.join(sorted(profiles))}") from None


def write_measured(profile: LinkProfile, provenance: dict, path: Path = MEASURED_FILE) -> None:
    """Store a measured profile (replacing one of the same name) with the provenance of its measurement."""
    data = json.loads(path.read_text()) if path.exists() else {"profiles": []}
    data["profiles"] = [p for p in data["profiles"] if p["name"] != profile.name]
    data["profiles"].append({**profile.to_dict()})
    data.setdefault("provenance", {})[profile.name] = provenance
    path.write_text(json.dumps(data, indent=2) + "\n")
