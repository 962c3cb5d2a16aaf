"""Let the serving model answer real prompts itself (greedy), with continuous batching on CPU.

The SGLang CPU server is not used yet (issue allows transformers): this module runs its own decode loop over
transformers' KV cache. Finished rows leave the batch at once and new prompts are prefilled into the free
slots, so one long (1,024-token) answer does not stall a whole batch.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ares.predictor.generations import (
    DEFAULT_PATH,
    Generation,
    append_generations,
    read_generations,
    rewrite_generations,
)
from ares.predictor.hidden_store import DEFAULT_STATES_DIR, write_state_shard
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
    # Hidden states captured during generation (the decode-step tensors), outside the repo: they are large.
    states_dir: Path | None = DEFAULT_STATES_DIR


@dataclass
class _Row:
    key: object
    prompt_ids: list[int]
    pos: int  # position id of the next token = real tokens so far
    out: list[int] = field(default_factory=list)
    # Hidden states that produced each token of `out`: (final-norm, middle layer), one [H] pair per token.
    final: list[torch.Tensor] = field(default_factory=list)
    mid: list[torch.Tensor] = field(default_factory=list)


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Pad `t` with zeros on the left of `dim` up to `length`."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class ContinuousGreedy:
    """Greedy decoding of many prompts with a fixed number of batch slots refilled as rows finish."""

    def __init__(
        self, model, eos_id: int, pad_id: int, max_new_tokens: int, batch_size: int, mid_layer: int | None = None
    ):
        self.model = model
        # hidden_states[-1] of HF Llama is the final-norm output (lm_head input), the tensor SGLang exposes.
        n_layers = model.config.num_hidden_layers
        self.mid_layer = n_layers // 2 if mid_layer is None else mid_layer
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.max_new = max_new_tokens
        self.batch_size = batch_size
        self.rows: list[_Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None

    def _prefill(self, items: list[tuple[object, list[int]]]) -> tuple[list[_Row], object, torch.Tensor, list[int]]:
        from transformers import DynamicCache

        length = max(len(ids) for _, ids in items)
        ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for i, (_, p) in enumerate(items):
            ids[i, length - len(p) :] = torch.tensor(p)
            mask[i, length - len(p) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=True,
        )
        first = out.logits[:, -1].argmax(-1).tolist()
        rows = [_Row(key, p, len(p)) for key, p in items]
        self._capture(rows, out.hidden_states)
        return rows, out.past_key_values, mask, first

    def _capture(self, rows: list[_Row], hidden_states) -> None:
        final = hidden_states[-1][:, -1].to(torch.float16)
        mid = hidden_states[self.mid_layer][:, -1].to(torch.float16)
        for i, row in enumerate(rows):
            row.final.append(final[i])
            row.mid.append(mid[i])

    def _merge(self, rows: list[_Row], cache, mask: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, length, 2), _left_pad(new.keys, length, 2)], 0)
            old.values = torch.cat([_left_pad(old.values, length, 2), _left_pad(new.values, length, 2)], 0)
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)], 0)
        self.rows = self.rows + rows

    def _keep(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        self.mask = self.mask.index_select(0, idx)
        # Columns that are padding for every remaining row are dead weight in attention: drop them.
        live = self.mask.any(0).nonzero()
        start = int(live[0]) if len(live) else 0
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
            layer.values = layer.values.index_select(0, idx)[:, :, start:]

    def _append(self, tokens: list[int], start: int = 0) -> list[tuple[object, list[int], str, _Row]]:
        """Record one new token for each row from ``start`` on; finished rows leave the batch."""
        done, keep = [], list(range(start))
        for i, tok in enumerate(tokens, start):
            row = self.rows[i]
            row.out.append(tok)
            if tok == self.eos_id:
                done.append((row.key, row.out, "eos", row))
            elif len(row.out) >= self.max_new:
                done.append((row.key, row.out, "length", row))
            else:
                keep.append(i)
        if len(keep) < len(self.rows):
            self._keep(keep)
        return done

    @torch.inference_mode()
    def run(self, items: Iterable[tuple[object, list[int]]]) -> Iterator[tuple[object, list[int], str, _Row]]:
        """Yield ``(key, response_ids, finish, row)`` for every ``(key, prompt_ids)`` of `items`, in finish order.

        ``row.final[j]`` / ``row.mid[j]`` are the hidden states of the step that produced ``response_ids[j]``.
        """
        queue = iter(items)
        exhausted = False
        while True:
            free = self.batch_size - len(self.rows)
            # Refill in chunks (not one prompt at a time): a prefill of several prompts costs little more than one.
            if not exhausted and (free >= max(1, self.batch_size // 4) or not self.rows):
                chunk = []
                for _ in range(free):
                    nxt = next(queue, None)
                    if nxt is None:
                        exhausted = True
                        break
                    chunk.append(nxt)
                if chunk:
                    rows, cache, mask, first = self._prefill(chunk)
                    n_old = len(self.rows)
                    self._merge(rows, cache, mask)
                    # The first token comes from the prefill; it belongs to the new rows only.
                    yield from self._append(first, start=n_old)
            if not self.rows:
                if exhausted:
                    return
                continue
            last = torch.tensor([[r.out[-1]] for r in self.rows], dtype=torch.long)
            pos = torch.tensor([[r.pos + len(r.out) - 1] for r in self.rows], dtype=torch.long)
            self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], 1)
            out = self.model(
                input_ids=last,
                attention_mask=self.mask,
                position_ids=pos,
                past_key_values=self.cache,
                use_cache=True,
                output_hidden_states=True,
            )
            self.cache = out.past_key_values
            self._capture(self.rows, out.hidden_states)
            yield from self._append(out.logits[:, -1].argmax(-1).tolist())


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
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos

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

    gen = ContinuousGreedy(model, eos, pad, cfg.max_new_tokens, cfg.batch_size)
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
