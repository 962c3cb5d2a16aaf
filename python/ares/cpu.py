"""CPU development mode: the few patches that let real SGLang 0.5.23 serve (and do PD over Mooncake TCP) on a machine
with no GPU. Applied only to servers started with `--device cpu`; nothing here copies SGLang code.

- `vllm._custom_ops` stand-in: RotaryEmbedding imports it on non-CUDA devices but then runs its native path.
- Mooncake sender: host tensor indices would pin memory (a CUDA call) on the prefill side.
- Flags SGLang needs on CPU, added to argv when the user did not choose them (see `CPU_DEFAULT_FLAGS`).
"""

from __future__ import annotations

import importlib.util
import sys
import types

# flag -> value (None for a store_true flag). Reasons: no CUDA graphs/kernels on CPU; the overlap scheduler's early
# send uses torch.cuda.Event; the decode default retraction backup (host_pool) calls cudart.
CPU_DEFAULT_FLAGS: dict[str, str | None] = {
    "--attention-backend": "torch_native",
    "--sampling-backend": "pytorch",
    "--disable-cuda-graph": None,
    "--skip-server-warmup": None,
    "--disable-overlap-schedule": None,
}
CPU_DECODE_FLAGS: dict[str, str | None] = {"--disaggregation-decode-retraction-backup": "cpu_tensor"}


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def add_cpu_default_flags(argv: list[str], decode: bool) -> list[str]:
    """argv plus every CPU-required flag the user did not set explicitly."""
    out = list(argv)
    wanted = {**CPU_DEFAULT_FLAGS, **(CPU_DECODE_FLAGS if decode else {})}
    for flag, value in wanted.items():
        if not _has_flag(out, flag):
            out += [flag] if value is None else [flag, value]
    return out


def _unavailable(*_args, **_kwargs):
    raise RuntimeError("vllm._custom_ops is an ARES CPU-mode stand-in; SGLang's native path should run instead")


def install_vllm_stand_in() -> bool:
    """Make `from vllm._custom_ops import rotary_embedding` importable when vllm is absent; True if installed."""
    if "vllm._custom_ops" in sys.modules or importlib.util.find_spec("vllm") is not None:
        return False
    vllm = types.ModuleType("vllm")
    vllm.__path__ = []  # a package, so the submodule import resolves
    ops = types.ModuleType("vllm._custom_ops")
    ops.rotary_embedding = _unavailable
    vllm._custom_ops = ops
    sys.modules["vllm"] = vllm
    sys.modules["vllm._custom_ops"] = ops
    return True


def patch_mooncake_sender() -> None:
    """Stop the prefill side from pinning host memory for KV indices (pinning needs a CUDA driver)."""
    from sglang.srt.disaggregation.mooncake.conn import MooncakeKVSender

    MooncakeKVSender.supports_host_tensor_indices = False


def apply_cpu_patches() -> None:
    """Apply every in-process CPU patch (idempotent)."""
    install_vllm_stand_in()
    patch_mooncake_sender()
