"""Triton kernels for ARES (the fused length head), each next to its torch reference.

Public API::

    params = prepare_head(head, device, dtype=torch.float32)            # pack once
    out = length_head_reference(hidden, generated, prompt_len, params)  # torch, [bs, n_out] fp32 tokens
    out = length_head_triton(hidden, generated, prompt_len, params)     # one Triton launch, same contract
    runner = LengthHeadRunner(head, device, dtype, max_batch)           # preallocated; Triton on GPU, else reference
    out = runner(hidden, generated, prompt_len)
"""

from .length_head import LengthHeadRunner, triton_gpu_reason
from .length_head_params import HeadParams, prepare_head
from .length_head_ref import length_head_reference
from .length_head_triton import (
    KernelBuffers,
    KernelPlan,
    alloc_buffers,
    default_num_sms,
    launch,
    length_head_triton,
    make_plan,
)

__all__ = [
    "HeadParams",
    "KernelBuffers",
    "KernelPlan",
    "LengthHeadRunner",
    "alloc_buffers",
    "default_num_sms",
    "launch",
    "length_head_reference",
    "length_head_triton",
    "make_plan",
    "prepare_head",
    "triton_gpu_reason",
]
