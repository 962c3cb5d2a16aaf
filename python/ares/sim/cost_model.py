"""Step-time cost model of prefill and decode instances, with presets.

Decode step (one token for each of the `batch` running requests, reading `kv_tokens` of KV cache):

    t_step = a + b * batch + c * kv_tokens

Roofline presets derive the constants from hardware and model shapes:
    a = per-step overhead (scheduler, sampling, launch) + weight bytes / effective HBM bandwidth
    b = 2 * params FLOPs per token / effective tensor FLOP/s (the matmul work each extra request adds)
    c = KV bytes per token / effective HBM bandwidth (attention reads every cached token once per step)
Compute and memory time are added, not overlapped (a conservative roofline). Linear in kv_tokens, which grows
by `batch` each step, so k steps take k*(a + b*n + c*K) + c*n*k*(k-1)/2: the simulator jumps from event to
event in closed form instead of stepping token by token.

Prefill of p tokens: t = prefill_overhead + 2 * params * p / prefill FLOP/s (linear attention term ignored).
KV capacity = (HBM * memory fraction - weight bytes) / KV bytes per token.
Retraction backup: KV bytes / host copy bandwidth each way (an assumed 25 GB/s for the H100 presets: PCIe Gen5 x16
with the gather into the host pool, not measured; a memory copy, 5 GB/s, for the CPU estimate).
Migration: setup + KV bytes / link bandwidth + pause, from a link profile (`ares_router.link_profile`, the one the
router prices migrations with: `rdma-4x200g` for the H100 presets, the measured `cpu-loopback-measured` for the CPU
one); P->D transfer uses the same link.

`cpu-smollm2-135m-estimate` is NOT a measurement: its constants are an estimate fitted to the figures in
docs/sglang-notes.md (SmolLM2-135M decodes 15-50 tok/s at batch 1-8 on a 2-core machine, teacher-forces
~140 tok/s), to be replaced by a profile measured on the CPU cluster.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ares_router.link_profile import get_link_profile
from ares_router.policy import MigrationCost

# A CPU "device" backs retracted KV up with a memory copy (`cpu_tensor` backup): an estimate, not measured.
CPU_HOST_COPY_BYTES_PER_S = 5e9


@dataclass(frozen=True)
class CostModel:
    """Per-instance timing and memory constants (seconds, tokens, bytes)."""

    name: str
    step_base_s: float  # a
    step_per_request_s: float  # b
    step_per_kv_token_s: float  # c
    prefill_base_s: float
    prefill_per_token_s: float
    kv_capacity_tokens: int
    kv_bytes_per_token: float
    link_bytes_per_s: float
    migration_pause_s: float
    migration_setup_s: float = 0.0
    # Device <-> host copy bandwidth: a PD decode retraction backs the request's KV up to host memory and loads it
    # back at resume (SGLang 0.5.23's `--disaggregation-decode-retraction-backup`); both copies block the step.
    host_bytes_per_s: float = 25e9
    note: str = ""

    def step_time(self, batch: int, kv_tokens: float) -> float:
        """Seconds for one decode step."""
        return self.step_base_s + self.step_per_request_s * batch + self.step_per_kv_token_s * kv_tokens

    def prefill_time(self, tokens: float) -> float:
        """Seconds to prefill (or recompute) `tokens` tokens."""
        return self.prefill_base_s + self.prefill_per_token_s * tokens

    def transfer_time(self, tokens: float) -> float:
        """Seconds to move `tokens` tokens of KV over the link (no pause)."""
        return tokens * self.kv_bytes_per_token / self.link_bytes_per_s

    def host_copy_time(self, tokens: float) -> float:
        """Seconds to copy `tokens` tokens of KV between device and host (one direction)."""
        return tokens * self.kv_bytes_per_token / self.host_bytes_per_s

    def migration_cost(self) -> MigrationCost:
        """The policy's view of migration cost."""
        return MigrationCost(
            self.kv_bytes_per_token, self.link_bytes_per_s, self.migration_pause_s, self.migration_setup_s
        )

    def to_dict(self) -> dict:
        """JSON-ready constants."""
        return asdict(self)


def roofline(
    name: str,
    params: float,
    layers: int,
    kv_heads: int,
    head_dim: int,
    hbm_bytes: float = 80e9,
    hbm_bytes_per_s: float = 3.35e12,
    flops: float = 989e12,
    mem_efficiency: float = 0.8,
    mfu_decode: float = 0.5,
    mfu_prefill: float = 0.5,
    memory_fraction: float = 0.9,
    step_overhead_s: float = 0.003,
    prefill_overhead_s: float = 0.005,
    link: str = "rdma-4x200g",
    dtype_bytes: int = 2,
) -> CostModel:
    """Cost model of a dense decoder from its shapes and the accelerator's roofline (defaults: H100 SXM,
    bf16, 3.35 TB/s HBM at 80% efficiency, 989 TFLOP/s dense at 50% MFU, Mooncake over 4x200 Gbps RoCE)."""
    profile = get_link_profile(link)
    weight_bytes = params * dtype_bytes
    kv_bytes = 2 * layers * kv_heads * head_dim * dtype_bytes  # K and V, every layer
    bw = hbm_bytes_per_s * mem_efficiency
    capacity = int((hbm_bytes * memory_fraction - weight_bytes) / kv_bytes)
    return CostModel(
        name=name,
        step_base_s=step_overhead_s + weight_bytes / bw,
        step_per_request_s=2 * params / (flops * mfu_decode),
        step_per_kv_token_s=kv_bytes / bw,
        prefill_base_s=prefill_overhead_s,
        prefill_per_token_s=2 * params / (flops * mfu_prefill),
        kv_capacity_tokens=capacity,
        kv_bytes_per_token=float(kv_bytes),
        link_bytes_per_s=profile.bytes_per_s,
        migration_pause_s=profile.pause_s,
        migration_setup_s=profile.setup_s,
        note=(
            f"roofline: {params / 1e9:.1f}B params, {layers} layers x {kv_heads} kv heads x {head_dim} dim, "
            f"{kv_bytes} KV B/token, HBM {hbm_bytes / 1e9:.0f} GB @ {hbm_bytes_per_s / 1e12:.2f} TB/s x "
            f"{mem_efficiency}, {flops / 1e12:.0f} TFLOP/s x MFU {mfu_decode}, "
            f"overhead {step_overhead_s * 1e3:.0f} ms, link {link}"
        ),
    )


def _cpu_estimate() -> CostModel:
    # sglang-notes.md: SmolLM2-135M ~15 tok/s at batch 1 (67 ms/step) and ~50 tok/s at batch 8 (160 ms/step)
    # -> a + b = 0.067, a + 8b = 0.160. KV term and capacity are placeholders (--max-total-tokens 16384).
    b = (0.160 - 0.067) / 7
    link = get_link_profile("cpu-loopback-measured")
    return CostModel(
        name="cpu-smollm2-135m-estimate",
        step_base_s=0.067 - b,
        step_per_request_s=b,
        step_per_kv_token_s=2e-6,
        prefill_base_s=0.05,
        prefill_per_token_s=1 / 140,
        kv_capacity_tokens=16384,
        kv_bytes_per_token=2 * 30 * 3 * 64 * 2,  # SmolLM2-135M: 30 layers, 3 kv heads, head dim 64, bf16
        link_bytes_per_s=link.bytes_per_s,
        migration_pause_s=link.pause_s,
        migration_setup_s=link.setup_s,
        host_bytes_per_s=CPU_HOST_COPY_BYTES_PER_S,
        note="ESTIMATE from docs/sglang-notes.md throughput figures (step and prefill times), not measured on the CPU "
        "cluster; migration from the measured link profile cpu-loopback-measured",
    )


PRESETS = {
    # Llama-2-7B shapes (MHA: 32 layers x 32 KV heads x 128): 0.5 MB of KV per token, ~111k tokens per H100.
    "h100-llama2-7b": lambda: roofline("h100-llama2-7b", 6.74e9, 32, 32, 128),
    # R1-Distill-Qwen-7B / Qwen2.5-7B shapes (GQA: 28 layers x 4 KV heads x 128): ~1M tokens per H100.
    "h100-qwen2.5-7b": lambda: roofline("h100-qwen2.5-7b", 7.62e9, 28, 4, 128),
    "cpu-smollm2-135m-estimate": _cpu_estimate,
}


# Profiles measured on a real cluster (`cpu-smollm2-135m-measured`: `benchmark/live_cluster.py --write-profile`),
# stored with the provenance of their measurement.
MEASURED_FILE = Path(__file__).with_name("cost_profiles.json")


def measured_profiles(path: Path | None = None) -> dict[str, CostModel]:
    """The measured cost models stored in `path` (default `MEASURED_FILE`), by name."""
    path = path or MEASURED_FILE
    if not path.exists():
        return {}
    return {e["name"]: CostModel(**e) for e in json.loads(path.read_text())["profiles"]}


def write_measured(cost: CostModel, provenance: dict, path: Path | None = None) -> None:
    """Store a measured cost model (replacing one of the same name) with how it was measured."""
    path = path or MEASURED_FILE
    data = json.loads(path.read_text()) if path.exists() else {"profiles": []}
    data["profiles"] = [p for p in data["profiles"] if p["name"] != cost.name] + [cost.to_dict()]
    data.setdefault("provenance", {})[cost.name] = provenance
    path.write_text(json.dumps(data, indent=2) + "\n")


def get_cost_model(name: str) -> CostModel:
    """Preset or measured profile by name."""
    if name in PRESETS:
        return PRESETS[name]()
    measured = measured_profiles()
    if name in measured:
        return measured[name]
    raise KeyError(f"unknown cost model {name!r}; known: {', '.join([*PRESETS, *measured])}")
