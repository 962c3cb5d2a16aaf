"""SGLang 0.5.23's decode admission rule: the one copy the router's policies and the simulator's servers both use.

A PD decode server takes a request in `DecodePreallocQueue.pop_preallocated` (sglang 0.5.23,
`srt/disaggregation/decode.py` L1333): it preallocates the request's KV (its prompt, page size 1) *before* the
prefill server computes it, so a full decode server holds prefill back. Read off that wheel, for a plain MHA model
(page size 1, no decode radix cache, no SWA/HiSparse/HiCache, no host receive; the paths a default launch takes):

- retractable = sum over the running batch of len(origin_input_ids) + len(output_ids)  (`pop_preallocated`, L1358)
- n_active = running + transferring (not host-staged) + waiting (+ admitted earlier in the same pass)
  (`_active_req_count`, L2045)
- reserved = num_reserved_decode_tokens * n_active  (`_active_reserved_tokens`, L2053)
- single = max over the running batch of (min(max_new_tokens, CLIP) + len(origin_input_ids)) - retractable,
  0 with nothing running  (`_need_space_for_single_req`, L2027)
- allocatable = available_size - max(reserved, single)  [- R * len(a prebuilt batch that just ran)
  - sum over the retracted queue of (fill + R)]  (`_allocatable_token_budgets`, L2083-2131)
- required = max(fill + R, fill + min(max_new_tokens, CLIP) - retractable), fill = prompt tokens
  (`_required_admission_tokens`, L508)
- admitted iff required <= allocatable  (`prealloc_fits`, `srt/mem_cache/allocator/base.py` L121), FIFO: the first
  request that does not fit stops the pass.
- R = `--num-reserved-decode-tokens`, default 512 (`srt/arg_groups/fields/disagg.py` L109); CLIP =
  `SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION`, default 4096 (`srt/environ.py` L650), so a request without max_tokens
  counts as 4096 new tokens.
- max_new_tokens is what the scheduler leaves of the request's own (none: unbounded) after capping prompt + output to
  the KV pool: <= capacity - prompt - 2 (`Scheduler.init_req_max_new_tokens`, `srt/managers/scheduler.py` L2693,
  with `max_new_tokens_for_memory`, `srt/mem_cache/allocator/base.py` L88; its context-length cap is not modelled).
- Retracted requests come back first (`resume_retracted_reqs`, L1021): fill + R <= available - R * n_active, fill =
  prompt + generated - 1 (`_prealloc_required_tokens`, L593; no single-request term there), and while any retracted
  request is left nothing new is preallocated (`process_decode_queue`, L3472).

The bracketed terms are the server's own business (a router never sees its retracted queue): the simulator's server
model keeps the retracted queue (nothing new is preallocated while it is not empty, which makes its sum moot) and
leaves out the prebuilt-batch term (it lasts one scheduler iteration). Everything here works on numpy arrays or
scalars alike (one row per instance or per request), so the router can ask "who admits this request now?" of 256
instances in one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

DEFAULT_RESERVE_TOKENS = 512  # SGLang 0.5.23's default --num-reserved-decode-tokens
CLIP_MAX_NEW_TOKENS = 4096  # SGLang 0.5.23's default SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION

Num = TypeVar("Num", float, np.ndarray)


def _maximum(a: Num, b: Num) -> Num:
    # The simulator asks about one request at a time: plain floats there, numpy only for arrays (10x faster).
    return np.maximum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else max(a, b)


@dataclass(frozen=True)
class Admission:
    """SGLang's decode admission with the cluster's settings (see the module docstring for the rule and its source).

    Terms, per instance: `free` KV tokens (capacity - used), `active` requests holding decode KV (running,
    transferring, waiting), `running_tokens` (sum of prompt + generated over the running ones: SGLang's
    "retractable"), `single_need` (max over the running ones of prompt + effective max_new_tokens; 0 with none).
    Per request: `prompt` (the KV it needs now) and `max_new` (its max_tokens; NaN: none given).
    """

    reserve_tokens: int = DEFAULT_RESERVE_TOKENS
    clip_max_new_tokens: int = CLIP_MAX_NEW_TOKENS

    def max_new(self, prompt: Num, max_new: Num, capacity: Num) -> Num:
        """The new tokens SGLang budgets for a request: its max_tokens (NaN: none) capped by what the pool can hold
        beside its prompt (capacity - prompt - 2) and clipped to CLIP."""
        if isinstance(max_new, np.ndarray):
            # fmin skips NaN: min(CLIP, max_new) where given, CLIP where not, in one ufunc call.
            m = np.fmin(max_new, self.clip_max_new_tokens)
        else:  # one request (on one or many instances): no array work for its own numbers
            m = self.clip_max_new_tokens if math.isnan(max_new) else min(max_new, self.clip_max_new_tokens)
        room = capacity - prompt - 2
        if isinstance(room, np.ndarray) or isinstance(m, np.ndarray):
            # np.maximum(x, 0.0) is what np.clip(x, 0.0, None) runs, without clip's Python-level dispatch.
            return np.maximum(np.minimum(m, room), 0.0)
        return float(max(0.0, min(m, room)))

    def output_limit(self, prompt: Num, max_new: Num, capacity: Num) -> Num:
        """The most new tokens SGLang lets a request generate: its max_tokens (NaN: none) capped by what the pool
        holds beside its prompt (capacity - prompt - 2, `Scheduler.init_req_max_new_tokens`), no CLIP: what
        predictive admission caps its planned lengths with."""
        m = (
            np.where(np.isnan(max_new), np.inf, max_new)
            if isinstance(max_new, np.ndarray)
            else (math.inf if math.isnan(max_new) else max_new)
        )
        room = capacity - prompt - 2
        out = np.maximum(np.minimum(m, room), 0.0)
        return out if isinstance(out, np.ndarray) and out.ndim else float(out)

    def footprint(self, prompt: Num, max_new: Num, capacity: Num) -> Num:
        """prompt + budgeted new tokens: a running request's term in `single_need`."""
        return prompt + self.max_new(prompt, max_new, capacity)

    def allocatable(self, free: Num, active: Num, running_tokens: Num, single_need: Num) -> Num:
        """Tokens a new request may take: free - max(R * active, single_need - running_tokens)."""
        return free - _maximum(self.reserve_tokens * active, single_need - running_tokens)

    def least_required(self, prompt: Num) -> Num:
        """prompt + R: what a new request needs at least, on any instance (the lower side of `required`)."""
        return prompt + self.reserve_tokens

    def required(self, prompt: Num, max_new: Num, running_tokens: Num, capacity: Num) -> Num:
        """Tokens a new request needs: max(prompt + R, prompt + budgeted new tokens - running_tokens)."""
        own = prompt + self.max_new(prompt, max_new, capacity) - running_tokens
        return _maximum(self.least_required(prompt), own)

    def admits(
        self,
        free: Num,
        active: Num,
        running_tokens: Num,
        single_need: Num,
        prompt: Num,
        max_new: Num,
        capacity: Num,
    ) -> bool | np.ndarray:
        """Whether the decode server preallocates this request now (broadcasts over instances or requests)."""
        need = self.required(prompt, max_new, running_tokens, capacity)
        return need <= self.allocatable(free, active, running_tokens, single_need)

    def resumes(self, free: float, active: float, fill: float) -> bool:
        """Whether a retracted request of `fill` KV tokens (prompt + generated - 1) comes back now."""
        return bool(fill + self.reserve_tokens <= free - self.reserve_tokens * active)

    def first_step(
        self,
        free: float,
        active: float,
        running_tokens: float,
        single_need: float,
        prompt: float,
        max_new: float,
        capacity: float,
        running: int,
    ) -> int | None:
        """Decode steps until `admits` holds for a request that is blocked now, if nothing but the running batch's
        growth changes (each step: free -= running, running_tokens += running); None: not before something else
        happens (a finish, an arrival).

        Growth never helps the `prompt + R` side (free shrinks) but does help the single-request side: both
        `single_need - running_tokens` and `prompt + max_new - running_tokens` shrink by `running` per step while
        free - (single_need - running_tokens) stays put. So the only step that can turn "no" into "yes" is the first
        one at which prompt + max_new - running_tokens <= free - single_need + running_tokens; it is checked with
        `admits` itself.
        """
        if running <= 0:
            return None
        own = prompt + self.max_new(prompt, max_new, capacity)
        k = max(1, math.ceil((own + single_need - 2.0 * running_tokens - free) / running))
        ok = self.admits(
            free - running * k, active, running_tokens + running * k, single_need, prompt, max_new, capacity
        )
        return k if ok else None


# ---------------------------------------------------------------------------------------------------------------------
# Predictive admission (ARES, `--ares-admission predictive`): the same question -- does this decode server take a new
# request now? -- answered from each running request's forecast remaining length instead of SGLang's blanket
# R-per-request reserve and CLIP-4096 single-request term.

# "predictive": each request planned at its P90; "predictive_point": at its point prediction (the sum of many
# requests' P90s overstates their joint peak: measured in benchmark/results/sim_admission).
ADMISSION_MODES = ("sglang", "predictive", "predictive_point")
PREDICTIVE_MODES = ADMISSION_MODES[1:]


def planned_remaining(
    predicted: np.ndarray, upper: np.ndarray, max_new_left: np.ndarray, use_upper: bool = True
) -> np.ndarray:
    """Remaining tokens predictive admission plans with, per request: its upper quantile (P90) where the head gives
    one and `use_upper`, else its point prediction (callers put the prior there for requests not predicted yet),
    never more than its max_tokens still allows (NaN: no max_tokens) and never below 0. Planning on the P90 keeps
    retractions rare (a forecast that undershoots is what turns into a retraction), on the point admits more."""
    rem = np.where(np.isnan(upper), predicted, upper) if use_upper and upper.size else predicted
    left = np.where(np.isnan(max_new_left), np.inf, max_new_left)
    return np.maximum(np.minimum(rem, left), 0.0)


@dataclass(frozen=True)
class KVForecast:
    """One decode server's KV in use over the coming decode steps, if every request runs exactly its planned length.

    Rows: requests holding KV on the server (running, or admitted and waiting for their prefill's KV), each with its
    KV length l_i now and planned remaining tokens r_i. After t steps a request still running holds l_i + t tokens;
    it frees its KV after step r_i. So the KV in use after t steps is

        D(t) = base + sum over i with r_i >= t of (l_i + t)

    (`base`: KV no row explains, e.g. held for a migration in flight). Between two finishes D only grows, so its
    peak is at a finish point: with the rows sorted by r (r_0 <= ... <= r_{n-1}) and S_k = l_k + ... + l_{n-1},

        peak = base + max_k (S_k + (n - k) r_k)     (0 rows: base)

    (a tie group's first index gives its true value, the later ones less, so the max is exact; t = 0 gives S_0,
    which the k = 0 term covers). `peak_with(p, q)` is the peak after adding a request of prompt p and planned
    output q, in O(log n) per request from prefix/suffix maxima kept here: a row k with r_k <= q has the new
    request alive at its finish (V_k + p + r_k), a row with r_k > q has not (V_k), and the new request's own finish
    point adds S_pos + (n - pos) q + p + q, pos = first row with r >= q.
    """

    base: float
    r: np.ndarray  # planned remaining, ascending
    lengths: np.ndarray  # KV lengths in the same order
    suffix: np.ndarray  # S_k, k = 0..n (S_n = 0)
    prefix_max_vr: np.ndarray  # max_{j<k} (V_j + r_j), k = 0..n (-inf for k = 0)
    suffix_max_v: np.ndarray  # max_{j>=k} V_j, k = 0..n (-inf for k = n)

    @classmethod
    def of(cls, lengths: np.ndarray, remaining: np.ndarray, base: float = 0.0) -> KVForecast:
        """The forecast of rows (`lengths`, `remaining`: one value per request) plus flat `base` tokens."""
        order = np.argsort(remaining, kind="stable")
        r = np.asarray(remaining, dtype=np.float64)[order]
        ln = np.asarray(lengths, dtype=np.float64)[order]
        n = r.size
        suffix = np.zeros(n + 1)
        suffix[:n] = np.cumsum(ln[::-1])[::-1]
        v = suffix[:n] + (n - np.arange(n)) * r
        pre = np.full(n + 1, -np.inf)
        suf = np.full(n + 1, -np.inf)
        if n:
            pre[1:] = np.maximum.accumulate(v + r)
            suf[:n] = np.maximum.accumulate(v[::-1])[::-1]
        return cls(float(base), r, ln, suffix, pre, suf)

    def with_row(self, length: float, remaining: float) -> KVForecast:
        """The forecast with one more request (e.g. one just dispatched here)."""
        return KVForecast.of(np.append(self.lengths, length), np.append(self.r, remaining), self.base)

    @property
    def peak(self) -> float:
        """The forecast KV peak of the rows as they are."""
        return self.base + (float(self.suffix_max_v[0]) if self.r.size else 0.0)

    def peak_with(self, prompt: Num, planned: Num) -> Num:
        """The forecast KV peak after adding a request of `prompt` tokens and `planned` output tokens (scalars, or
        arrays for many candidate requests at once)."""
        p = np.asarray(prompt, dtype=np.float64)
        q = np.maximum(np.asarray(planned, dtype=np.float64), 0.0)
        n = self.r.size
        pos = np.searchsorted(self.r, q, side="left")
        pos_r = np.searchsorted(self.r, q, side="right")
        own = self.suffix[pos] + (n - pos) * q + p + q
        peak = np.maximum(np.maximum(own, self.suffix_max_v[pos_r]), self.prefix_max_vr[pos_r] + p) + self.base
        return float(peak) if peak.ndim == 0 else peak

    def admits(self, capacity: Num, prompt: Num, planned: Num) -> bool | np.ndarray:
        """Predictive admission: the request fits when the forecast peak with it stays within the KV pool."""
        ok = self.peak_with(prompt, planned) <= capacity
        return bool(ok) if np.ndim(ok) == 0 else ok


def forecast_peak_bruteforce(lengths: np.ndarray, remaining: np.ndarray, base: float = 0.0) -> float:
    """max over integer t >= 0 of base + sum_{r_i >= t} (l_i + t), by trying every t up to max r (tests' reference)."""
    if not len(remaining):
        return float(base)
    ln, r = np.asarray(lengths, float), np.asarray(remaining, float)
    ts = np.arange(0, int(np.ceil(r.max())) + 1, dtype=float)
    ts = np.union1d(ts, r)
    return float(base + max(float(((ln + t) * (r >= t)).sum()) for t in ts))
