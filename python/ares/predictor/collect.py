"""Let the serving model answer real prompts itself (greedy), with continuous batching on CPU.

Not through the SGLang CPU server: its torch_native attention decodes SmolLM2 at ~64 tok/s at batch 64 on this
2-core machine. This module runs its own decode loop (`SlotGreedy`) over the transformers model's modules.
Finished rows leave the batch at once and new prompts are prefilled into the free slots, so one long
(1,024-token) answer does not stall a whole batch.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ares.predictor.generations import (
    DEFAULT_PATH,
    Generation,
    append_generations,
    read_generations,
    rewrite_generations,
)
from ares.predictor.hidden_store import DEFAULT_STATES_DIR, write_state_shard
from ares.predictor.loops import LOOP_SPAN, loop_due
from ares.predictor.prompts import SOURCES, Prompt, load_prompts


@dataclass
class CollectConfig:
    """Knobs of one collection run."""

    model: str = "smollm2"
    out: Path = DEFAULT_PATH
    limit: int | None = None
    offset: int = 0  # start this far into the interleaved list (a second worker takes a disjoint range)
    max_new_tokens: int = 1024
    max_prompt_tokens: int = 1024
    batch_size: int = 16
    sources: tuple[str, ...] = SOURCES
    seed: int = 0
    threads: int = 1
    flush_every: int = 1  # records are small; appending each one means a stop loses nothing finished
    # Stop a response whose last `loop_span` tokens repeat a short cycle (finish "loop", see `loops`); 0: never.
    loop_span: int = LOOP_SPAN
    # Hidden states captured during generation (the decode-step tensors), outside the repo: they are large.
    states_dir: Path | None = DEFAULT_STATES_DIR


@dataclass
class _Row:
    key: object
    prompt_ids: list[int]
    out: list[int] = field(default_factory=list)
    # Hidden states that produced each token of `out`: (final-norm, middle layer), one [H] pair per token.
    final: list[torch.Tensor] = field(default_factory=list)
    mid: list[torch.Tensor] = field(default_factory=list)


class SlotGreedy:
    """Greedy decoding of many prompts in `batch_size` KV-cache slots, refilled as rows finish (Llama family).

    Why not transformers' own cache: a padded batch there runs attention through a masked path that costs
    ~6 s per step at batch 32 x 1,500 tokens on one CPU thread, and its cache grows by concatenation (a full
    copy per step). Here the cache is preallocated ([layers, slots, kv heads, prompt + new tokens, head dim]),
    live rows are kept in slots 0..n-1 (a finished row's slot takes the last row), each row writes at its own
    column, and a decode step is one attention call per layer over a view, with the query heads of one KV head
    folded into the query axis (grouped-query attention without repeating K/V). Prompts are prefilled one at a
    time, unpadded. The weights and modules are the model's own: only the loop is ours.
    """

    def __init__(
        self,
        model,
        eos_id: int,
        max_new_tokens: int,
        batch_size: int,
        max_prompt_tokens: int = 1024,
        mid_layer: int | None = None,
        loop_span: int = 0,
    ):
        cfg = model.config
        self.model = model
        self.n_layers = cfg.num_hidden_layers
        # hidden_states[k] of HF Llama is the input of layer k; [-1] is the final-norm output (lm_head input),
        # the tensor SGLang exposes. `mid` is hidden_states[mid_layer].
        self.mid_layer = self.n_layers // 2 if mid_layer is None else mid_layer
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eos_id = eos_id
        self.max_new = max_new_tokens
        self.max_prompt = max_prompt_tokens
        self.loop_span = loop_span
        self.batch_size = batch_size
        width = max_prompt_tokens + max_new_tokens
        shape = (self.n_layers, batch_size, self.kv_heads, width, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=model.dtype)
        self.v_cache = torch.zeros(shape, dtype=model.dtype)
        self.length = torch.zeros(batch_size, dtype=torch.long)  # tokens cached per slot
        self.rows: list[_Row] = []

    def _forward(self, ids: torch.Tensor, slot: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward pass; returns (logits, final-norm state, middle-layer state) of each row's last token.

        ``slot=None``: a decode step of every live row (ids [n, 1]); else a prefill of one prompt into `slot`.
        """
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        m = self.model.model
        n, t = ids.shape
        rows = slice(0, n) if slot is None else slice(slot, slot + 1)
        start = self.length[rows]
        pos = start[:, None] + torch.arange(t)[None, :]
        h = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(h, pos)
        width = int((start + t).max())
        rep = self.heads // self.kv_heads
        if slot is None:
            mask = (torch.arange(width)[None, :] < (start + 1)[:, None])[:, None, None, :]
            cols = (torch.arange(n), slice(None), start)
        mid = h[:, -1]
        for layer_idx, layer in enumerate(m.layers):
            if layer_idx == self.mid_layer:
                mid = h[:, -1]
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(n, t, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(n, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(n, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
            if slot is None:
                kc[cols], vc[cols] = k[:, :, 0], v[:, :, 0]
                q = q.reshape(n, self.kv_heads, rep, self.head_dim)  # query heads of one KV head share it
                o = F.scaled_dot_product_attention(q, kc[:n, :, :width], vc[:n, :, :width], attn_mask=mask)
            else:
                kc[slot, :, :t], vc[slot, :, :t] = k[0], v[0]
                kv = (kc[rows, :, :t], vc[rows, :, :t])
                o = F.scaled_dot_product_attention(q, *kv, is_causal=True, enable_gqa=rep > 1).transpose(1, 2)
            h = h + attn.o_proj(o.reshape(n, t, self.heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        final = m.norm(h[:, -1])
        self.length[rows] += t
        return self.model.lm_head(final), final, mid

    def _capture(self, rows: list[_Row], final: torch.Tensor, mid: torch.Tensor) -> None:
        final, mid = final.to(torch.float16), mid.to(torch.float16)
        for i, row in enumerate(rows):
            row.final.append(final[i])
            row.mid.append(mid[i])

    def _prefill(self, key: object, prompt_ids: list[int]) -> list[tuple[object, list[int], str, _Row]]:
        if not 0 < len(prompt_ids) <= self.max_prompt:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens; this decoder takes 1..{self.max_prompt}")
        slot = len(self.rows)
        self.length[slot] = 0
        row = _Row(key, prompt_ids)
        self.rows.append(row)
        logits, final, mid = self._forward(torch.tensor([prompt_ids]), slot)
        self._capture([row], final, mid)
        return self._append([int(logits[0].argmax())], start=slot)

    def _free(self, slot: int) -> None:
        """Drop the row in `slot`; the last row moves into it, so live rows stay in slots 0..n-1."""
        last = len(self.rows) - 1
        if slot != last:
            used = int(self.length[last])
            self.k_cache[:, slot, :, :used] = self.k_cache[:, last, :, :used]
            self.v_cache[:, slot, :, :used] = self.v_cache[:, last, :, :used]
            self.length[slot] = used
            self.rows[slot] = self.rows[last]
        self.rows.pop()

    def _append(self, tokens: list[int], start: int = 0) -> list[tuple[object, list[int], str, _Row]]:
        """Record one new token for each row from slot ``start`` on; finished rows leave the batch."""
        done, gone = [], []
        for i, tok in enumerate(tokens, start):
            row = self.rows[i]
            row.out.append(tok)
            finish = None
            if tok == self.eos_id:
                finish = "eos"
            elif len(row.out) >= self.max_new:
                finish = "length"
            elif loop_due(row.out, self.loop_span):
                finish = "loop"
            if finish is not None:
                done.append((row.key, row.out, finish, row))
                gone.append(i)
        for i in reversed(gone):  # highest slot first: a moved row never lands on a slot still to free
            self._free(i)
        return done

    @torch.inference_mode()
    def run(self, items: Iterable[tuple[object, list[int]]]) -> Iterator[tuple[object, list[int], str, _Row]]:
        """Yield ``(key, response_ids, finish, row)`` for every ``(key, prompt_ids)`` of `items`, in finish order.

        ``row.final[j]`` / ``row.mid[j]`` are the hidden states of the step that produced ``response_ids[j]``.
        """
        queue = iter(items)
        exhausted = False
        while True:
            # Refill in chunks (not after every finish), so decode steps run at a near-full batch.
            if not exhausted and (self.batch_size - len(self.rows) >= max(1, self.batch_size // 4) or not self.rows):
                while len(self.rows) < self.batch_size:
                    nxt = next(queue, None)
                    if nxt is None:
                        exhausted = True
                        break
                    yield from self._prefill(*nxt)
            if not self.rows:
                if exhausted:
                    return
                continue
            last = torch.tensor([[r.out[-1]] for r in self.rows], dtype=torch.long)
            logits, final, mid = self._forward(last, None)
            self._capture(self.rows, final, mid)
            yield from self._append(logits.argmax(-1).tolist())


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _flush(cfg: CollectConfig, records: list[Generation], states: dict, mid_layer: int) -> None:
    # States first: a generation record on disk always has its captured states (or none were asked for).
    if cfg.states_dir is not None:
        write_state_shard(cfg.states_dir, {k: (f.numpy(), m.numpy()) for k, (f, m) in states.items()}, mid_layer)
    append_generations(cfg.out, records)


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as one user turn with the model's chat template and the assistant prefix."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def collect(cfg: CollectConfig, progress: Callable | None = None) -> int:
    """Generate answers for prompts not yet in ``cfg.out``; return how many records the file holds after."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ares.models import prepare_model

    torch.set_num_threads(cfg.threads)
    done = read_generations(cfg.out)
    if cfg.out.exists():
        rewrite_generations(cfg.out, done)  # drop a torn tail so appends stay readable
    done_ids = {g.id for g in done}
    model_dir = prepare_model(cfg.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = load_prompts(sources=cfg.sources, seed=cfg.seed)
    prompts = prompts[cfg.offset :]
    if cfg.limit is not None:
        prompts = prompts[: cfg.limit]
    todo = [p for p in prompts if p.id not in done_ids]
    eos = tok.eos_token_id

    skipped = 0

    def items() -> Iterator[tuple[Prompt, list[int]]]:
        nonlocal skipped
        for p in todo:
            ids = chat_prompt_ids(tok, p.text)
            if len(ids) > cfg.max_prompt_tokens:
                skipped += 1  # long prompts would dominate CPU time; counted, not silently lost
                bar.update(1)
                continue
            yield (p, ids), ids

    gen = SlotGreedy(model, eos, cfg.max_new_tokens, cfg.batch_size, cfg.max_prompt_tokens, loop_span=cfg.loop_span)
    pending: list[Generation] = []
    pending_states: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    n_tokens, t0 = 0, time.time()
    bar = tqdm(total=len(todo), desc="collect", unit="req", smoothing=0.05)
    # `kill PID` (SIGTERM) stops like Ctrl-C: finished records are written, in-flight ones are dropped.
    old_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for prompt_and_ids, response, finish, row in gen.run(items()):
            p, ids = prompt_and_ids
            pending.append(Generation(p.id, p.source, ids, list(response), finish, cfg.max_new_tokens))
            pending_states[p.id] = (torch.stack(row.final), torch.stack(row.mid))
            n_tokens += len(response)
            bar.update(1)
            bar.set_postfix(tok_s=f"{n_tokens / (time.time() - t0):.0f}", skipped=skipped)
            if len(pending) >= cfg.flush_every:
                _flush(cfg, pending, pending_states, gen.mid_layer)
                pending, pending_states = [], {}
    except KeyboardInterrupt:
        print("\ninterrupted: writing finished records, dropping in-flight ones")
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        if pending:
            _flush(cfg, pending, pending_states, gen.mid_layer)
        bar.close()
    return len(read_generations(cfg.out))
