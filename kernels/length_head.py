"""What the decode step calls: :class:`LengthHeadRunner`: the fused Triton head on GPU, else the torch reference."""

from __future__ import annotations

import logging

import torch

from ares.predictor.head import LengthHead

from .length_head_params import HeadParams, prepare_head
from .length_head_ref import length_head_reference
from .length_head_triton import KernelBuffers, alloc_buffers, interpreting, launch

logger = logging.getLogger("ares_kernels")


def triton_gpu_reason() -> str | None:
    """None if Triton can launch GPU kernels here, else why not (no driver, interpreter mode, ...)."""
    try:
        from triton.runtime import driver

        if interpreting():
            return "TRITON_INTERPRET is set (interpreter mode)"
        backend = driver.active.get_current_target().backend
    except Exception as exc:  # no GPU driver: Triton raises RuntimeError("0 active drivers ...")
        return f"Triton has no GPU driver ({exc})"
    if backend != "cuda":
        return f"Triton's active backend is {backend!r}, the kernel is tuned for CUDA"
    return None


class LengthHeadRunner:
    """The length head for one device, with every buffer preallocated for batches up to `max_batch`.

    ``runner(hidden [bs, H], generated [bs], prompt_len [bs]) -> [bs, n_out]`` float32 remaining tokens (point, then
    quantiles). The result is a view of a buffer the next call overwrites: copy it to keep it. On CUDA with a Triton
    GPU driver it is one fused kernel launch (CUDA-graph capturable); otherwise the torch reference runs, and the first
    call logs why. One runner serves one stream at a time.
    """

    def __init__(
        self,
        head: LengthHead,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        max_batch: int = 256,
        precision: str = "tf32",
        num_sms: int | None = None,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.params: HeadParams = prepare_head(head, self.device, dtype, precision=precision)
        self._gpu_reason = triton_gpu_reason() if self.device.type == "cuda" else None
        self.buffers: KernelBuffers | None = None
        if self.device.type == "cuda" and self._gpu_reason is None:
            self.buffers = alloc_buffers(self.params, max_batch, num_sms)
            self.out = self.buffers.out
        else:
            self.out = torch.zeros(max_batch, self.params.n_out, dtype=torch.float32, device=self.device)
        self._logged: set[str] = set()

    @property
    def uses_triton(self) -> bool:
        """Whether CUDA inputs go to the fused kernel (False: always the reference)."""
        return self.buffers is not None

    def fallback_reason(self, hidden: torch.Tensor) -> str | None:
        """Why a call with this `hidden` runs the reference, or None if it runs the kernel."""
        if not hidden.is_cuda:
            return f"hidden is on {hidden.device.type}, the Triton kernel needs CUDA"
        if self.buffers is None:
            return self._gpu_reason or f"runner was built for {self.device}"
        return None

    def reset(self) -> None:
        """Zero the kernel's counters (only needed if a launch was ever interrupted)."""
        if self.buffers is not None:
            self.buffers.counters.zero_()

    def __call__(self, hidden: torch.Tensor, generated: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
        bs = hidden.shape[0]
        if bs > self.max_batch:
            raise ValueError(f"batch {bs} exceeds max_batch {self.max_batch}")
        reason = self.fallback_reason(hidden)
        if reason is None:
            assert self.buffers is not None
            return launch(hidden, generated, prompt_len, self.params, self.buffers)
        if reason not in self._logged:  # once per distinct reason, not every decode step
            self._logged.add(reason)
            logger.info("length head: using the torch reference: %s", reason)
        out = self.out[:bs]
        out.copy_(length_head_reference(hidden, generated, prompt_len, self.params))
        return out
