"""The torch reference of the fused length head: exactly :class:`ares.predictor.head.LengthHead`'s maths.

It is both the oracle the Triton kernel is tested against and the fallback where Triton cannot run (CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .length_head_params import HeadParams


def extra_features(generated: torch.Tensor, prompt_len: torch.Tensor, params: HeadParams) -> torch.Tensor | None:
    """The head's extra inputs ``[bs, n_extra]`` (float32, in the checkpoint's order), or None if it has none."""
    if not params.n_extra:
        return None
    feats = {
        "log_generated": torch.log1p(generated.to(torch.float32)),
        "log_prompt_len": torch.log1p(prompt_len.to(torch.float32)),
    }
    return torch.stack([feats[name] for name in params.extra_features], dim=-1)


def length_head_reference(
    hidden: torch.Tensor, generated: torch.Tensor, prompt_len: torch.Tensor, params: HeadParams
) -> torch.Tensor:
    """Predicted remaining tokens ``[bs, n_out]`` float32 (point, then quantiles), each >= 1.

    `hidden` ``[bs, H]`` in bf16/fp16/fp32; `generated` and `prompt_len` ``[bs]`` (int or float) on the same device.
    Same operations as ``LengthHead.forward`` (unfolded standardisation, float32), so it matches it to rounding.
    """
    if hidden.dim() != 2 or hidden.shape[1] != params.hidden_size:
        raise ValueError(f"hidden must be [bs, {params.hidden_size}], got {tuple(hidden.shape)}")
    x = hidden.to(torch.float32)
    extra = extra_features(generated, prompt_len, params)
    if extra is not None:
        x = torch.cat([x, extra.to(device=x.device)], dim=-1)
    z = (x - params.in_mean) / params.in_std
    last = params.n_layers - 1
    for i, (w, b) in enumerate(zip(params.weights, params.biases, strict=True)):
        z = F.linear(z, w, b)
        if i < last:
            z = F.relu(z) if params.activation == "relu" else F.gelu(z)
    tokens = torch.expm1(z) if params.target == "log" else z * params.scale
    return tokens.clamp(min=1.0)
