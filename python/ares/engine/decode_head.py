"""The length head in the decode step (device side): reads the step's final hidden states and the requests' lengths,
returns `[bs, 1 + quantiles]` remaining-token predictions on the same device and stream.

Per-request inputs come from device tensors SGLang already has (`seq_lens`, `req_pool_indices`) plus a prompt-length
table indexed by the request's `req_to_token` row, written once when a request first enters a decode batch. So a
step needs no host→device copy and no synchronisation, and rows past the real batch (CUDA-graph padding) only read
row 0 of the table.
"""

from __future__ import annotations

import logging

import torch

from ares.predictor.head import LengthHead, load_head

logger = logging.getLogger("ares.engine")


class DecodeHead:
    """One per scheduler process: the loaded head, its kernel runner and the prompt-length table."""

    def __init__(self, checkpoint: str, hidden_size: int | None = None):
        self.checkpoint = checkpoint
        self.head: LengthHead = load_head(checkpoint, model_hidden_size=hidden_size)
        self.n_out = 1 + len(self.head.cfg.quantiles)
        self._runner = None
        self._prompt_len: torch.Tensor | None = None  # [req_to_token rows] int32 on the model's device
        self.backend = "not run yet"

    def ensure_table(self, rows: int, device: torch.device | str) -> torch.Tensor:
        """The prompt-length table (allocated on first use, sized to SGLang's request pool)."""
        if self._prompt_len is None or self._prompt_len.device != torch.device(device):
            self._prompt_len = torch.zeros(rows + 1, dtype=torch.int32, device=device)
        return self._prompt_len

    def set_prompt_lengths(self, rows: list[int], lengths: list[int], device: torch.device | str, pool_rows: int):
        """Record the prompt lengths of requests entering decode at their request-pool rows (one small copy)."""
        table = self.ensure_table(pool_rows, device)
        # As SGLang moves its own batch tensors: pinned host memory, so the copy is asynchronous (no stream sync),
        # issued on the scheduler's stream, which the forward stream waits for.
        pin = table.is_cuda
        idx = torch.tensor(rows, dtype=torch.int64, pin_memory=pin).to(table.device, non_blocking=True)
        table[idx] = torch.tensor(lengths, dtype=torch.int32, pin_memory=pin).to(table.device, non_blocking=True)

    def _get_runner(self, hidden: torch.Tensor):
        if self._runner is None:
            from ares_kernels import LengthHeadRunner

            assert self._prompt_len is not None
            # A decode batch never holds more requests than SGLang's request pool has rows.
            self._runner = LengthHeadRunner(self.head, hidden.device, torch.float32, max_batch=self._prompt_len.numel())
            reason = self._runner.fallback_reason(hidden)
            self.backend = "triton" if reason is None else f"torch reference ({reason})"
            logger.info("ARES length head %s on %s: %s", self.checkpoint, hidden.device, self.backend)
        return self._runner

    def __call__(self, hidden: torch.Tensor, seq_lens: torch.Tensor, req_pool_indices: torch.Tensor) -> torch.Tensor:
        """Predictions `[bs, n_out]` (fp32, remaining tokens with this step included) for a decode step's rows.

        `seq_lens` counts the KV of each request including this step's input token, so the tokens generated before
        this step are `seq_lens - prompt_len` (the head's `generated` feature)."""
        bs = hidden.shape[0]
        assert self._prompt_len is not None, "prompt lengths are recorded before the first decode step"
        prompt_len = self._prompt_len[req_pool_indices[:bs]]
        generated = seq_lens[:bs] - prompt_len
        # A fresh output tensor per step: the scheduler copies it to the host later (auxiliary-output protocol), so it
        # must not be a buffer the next step overwrites.
        return self._get_runner(hidden)(hidden, generated, prompt_len).clone()
