"""The fused length head as ONE Triton launch: every layer, the extra features and the output transform.

How one launch runs a whole MLP with every weight read from HBM once:

* Work is cut into *tiles*. A tile of layer ``l`` is (column block ``n``, K split ``s``, row block ``m``): it computes
  ``BM`` rows x ``BN`` output columns of layer ``l`` over one slice of its input dimension. Tiles of one column block
  and split share a weight slice; the ``m`` index varies fastest, so those tiles run at the same time and the slice
  comes from HBM once (then L2).
* Programs are persistent and *claim* tiles in order from an atomic counter (layer 0's tiles first, then layer 1's,
  ...). A tile of layer ``l > 0`` spin-waits until every tile of the layer it reads is finished. It only ever waits on
  tiles with a lower number, which were claimed by programs that are already running, so this cannot deadlock, however
  many programs are resident (and under ``TRITON_INTERPRET=1``, which runs programs one after another, program 0
  simply claims every tile and never waits).
* A layer with few column blocks is split along K so that all SMs help; the split that finishes a tile last (an atomic
  ticket per tile) sums the partials in a fixed order (deterministic), adds the bias and applies the activation.
* Small trailing layers (e.g. 64 -> 2) are *fused*: the program that finishes the whole output of the previous layer
  for a row block computes them in registers, saving a dependency round trip.
* Producers store, ``debug_barrier`` (every thread's stores are done), then release-increment a per-layer counter;
  consumers acquire-read it and read the activations with ``cache_modifier=".cg"`` (L2, never a stale L1 line).
* The last program to exit (exit ticket) resets the counters to zero, so the next launch (or a CUDA-graph replay)
  starts clean: all buffers are preallocated, there is no host sync and no allocation inside :func:`launch`.

Rows beyond the caller's real batch (CUDA-graph padding) are computed like any row, inside the buffers, and ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .length_head_params import HeadParams

# Counter buffer layout (int32): [0] tile claim, [1] exit ticket, [2 + l] finished tiles of stage l, then the
# per-tile split-K tickets (the kernel hard-codes 0, 1 and 2).
_DONE0 = 2
_TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
}


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:
        return tl.where(x < 0.0, 0.0, x)  # ReLU that keeps NaN, as torch does
    else:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))  # exact (erf) GELU, nn.GELU's default


@triton.jit
def _log1p(x):
    # log(1 + x) accurate for small x (Goldberg): log(u) * x / (u - 1) with u = 1 + x rounded.
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _finish(
    acc,
    rows,
    rmask,
    n,
    L: tl.constexpr,
    w_ptr,
    b_ptr,
    ws_ptr,
    cnt_ptr,
    out_ptr,
    scale,
    NL: tl.constexpr,
    DIMS: tl.constexpr,
    KDIMS: tl.constexpr,
    W_OFF: tl.constexpr,
    B_OFF: tl.constexpr,
    BN: tl.constexpr,
    CHAIN_END: tl.constexpr,
    ACT_OFF: tl.constexpr,
    WS_COLS: tl.constexpr,
    ACT: tl.constexpr,
    TARGET_LOG: tl.constexpr,
    PREC: tl.constexpr,
):
    """Bias, activation and the fused layers after one finished tile of stage `L`; store and publish the result."""
    cols = n * BN[L] + tl.arange(0, BN[L])
    y = acc + tl.load(b_ptr + B_OFF[L] + cols, mask=cols < DIMS[L], other=0.0)[None, :]
    for j in tl.static_range(L + 1, CHAIN_END[L] + 1):
        # Fused layer j: its input is the whole output of layer j - 1 (one tile), still in registers; padded columns
        # are exactly 0 after the activation, and their weights are masked to 0.
        y = _activation(y, ACT)
        cj = tl.arange(0, BN[j])
        kj = tl.arange(0, BN[j - 1])
        wmask = (cj[:, None] < DIMS[j]) & (kj[None, :] < KDIMS[j])
        w = tl.load(w_ptr + W_OFF[j] + cj[:, None] * KDIMS[j] + kj[None, :], mask=wmask, other=0.0)
        y = tl.dot(y, tl.trans(w.to(tl.float32)), input_precision=PREC)
        y = y + tl.load(b_ptr + B_OFF[j] + cj, mask=cj < DIMS[j], other=0.0)[None, :]
    E: tl.constexpr = CHAIN_END[L]
    if E != L:
        cols = tl.arange(0, BN[E])
    mask = rmask[:, None] & (cols < DIMS[E])[None, :]
    if E == NL - 1:
        if TARGET_LOG:
            y = tl.exp(y) - 1.0  # expm1; only values >= 1 survive the clamp, where exp(y) - 1 is accurate
        else:
            y = y * scale
        y = tl.where(y < 1.0, 1.0, y)  # clamp(min=1) that keeps NaN, as torch does
        tl.store(out_ptr + rows[:, None] * DIMS[NL - 1] + cols[None, :], y, mask=mask)
    else:
        y = _activation(y, ACT)
        tl.store(ws_ptr + rows[:, None] * WS_COLS + ACT_OFF[E] + cols[None, :], y, mask=mask)
        tl.debug_barrier()  # all threads' stores are issued before the release below publishes them
        tl.atomic_add(cnt_ptr + 2 + L, 1, sem="release", scope="gpu")


@triton.jit
def _length_head_kernel(
    hid_ptr,
    hid_stride,
    gen_ptr,
    gen_stride,
    plen_ptr,
    plen_stride,
    n_rows,
    w_ptr,
    b_ptr,
    wx_ptr,
    ws_ptr,
    cnt_ptr,
    out_ptr,
    scale,
    H: tl.constexpr,
    NL: tl.constexpr,
    DIMS: tl.constexpr,
    KDIMS: tl.constexpr,
    W_OFF: tl.constexpr,
    B_OFF: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT: tl.constexpr,
    KSPLIT: tl.constexpr,
    NTILES: tl.constexpr,
    CHAIN_END: tl.constexpr,
    PREV: tl.constexpr,
    ACT_OFF: tl.constexpr,
    PART_OFF: tl.constexpr,
    TC_OFF: tl.constexpr,
    WS_COLS: tl.constexpr,
    MAX_MB: tl.constexpr,
    CNT_HEAD: tl.constexpr,
    BM: tl.constexpr,
    HAS_GEN: tl.constexpr,
    HAS_PLEN: tl.constexpr,
    ACT: tl.constexpr,
    TARGET_LOG: tl.constexpr,
    DOT16: tl.constexpr,
    PREC: tl.constexpr,
):
    m_blocks = tl.cdiv(n_rows, BM)
    total = m_blocks * 0
    for li in tl.static_range(NL):
        total += NTILES[li] * SPLIT[li] * m_blocks
    t = tl.atomic_add(cnt_ptr + 0, 1, sem="relaxed", scope="gpu")
    while t < total:
        base = m_blocks * 0
        for li in tl.static_range(NL):
            if NTILES[li] > 0:  # fused layers have no tiles of their own
                n_here = NTILES[li] * SPLIT[li] * m_blocks
                if (t >= base) & (t < base + n_here):
                    u = t - base
                    m = u % m_blocks  # row block varies fastest: tiles sharing a weight slice run together
                    r = u // m_blocks
                    s = r % SPLIT[li]
                    n = r // SPLIT[li]
                    rows = m * BM + tl.arange(0, BM)
                    rmask = rows < n_rows
                    cols = n * BN[li] + tl.arange(0, BN[li])
                    cmask = cols < DIMS[li]
                    acc = tl.zeros((BM, BN[li]), dtype=tl.float32)
                    if li == 0:
                        for kk in range(0, KSPLIT[0], BK[0]):
                            k = s * KSPLIT[0] + kk + tl.arange(0, BK[0])
                            kmask = k < H
                            x = tl.load(
                                hid_ptr + rows[:, None] * hid_stride + k[None, :],
                                mask=rmask[:, None] & kmask[None, :],
                                other=0.0,
                            )
                            w = tl.load(
                                w_ptr + W_OFF[0] + cols[:, None] * H + k[None, :],
                                mask=cmask[:, None] & kmask[None, :],
                                other=0.0,
                            )
                            if DOT16:
                                acc = tl.dot(x, tl.trans(w), acc)
                            else:
                                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision=PREC)
                        if HAS_GEN or HAS_PLEN:
                            if s == 0:  # the extra features are layer 0's last K columns: split 0 adds them
                                if HAS_GEN:
                                    g = tl.load(gen_ptr + rows * gen_stride, mask=rmask, other=0).to(tl.float32)
                                    wg = tl.load(wx_ptr + cols, mask=cmask, other=0.0)
                                    acc += _log1p(g)[:, None] * wg[None, :]
                                if HAS_PLEN:
                                    p = tl.load(plen_ptr + rows * plen_stride, mask=rmask, other=0).to(tl.float32)
                                    wp = tl.load(wx_ptr + DIMS[0] + cols, mask=cmask, other=0.0)
                                    acc += _log1p(p)[:, None] * wp[None, :]
                    else:
                        # Wait until the stage producing this layer's input has finished every tile (all rows).
                        need = NTILES[PREV[li]] * m_blocks
                        seen = tl.atomic_add(cnt_ptr + 2 + PREV[li], 0, sem="acquire", scope="gpu")
                        while seen < need:
                            seen = tl.atomic_add(cnt_ptr + 2 + PREV[li], 0, sem="acquire", scope="gpu")
                        tl.debug_barrier()
                        for kk in range(0, KSPLIT[li], BK[li]):
                            k = s * KSPLIT[li] + kk + tl.arange(0, BK[li])
                            kmask = k < KDIMS[li]
                            x = tl.load(
                                ws_ptr + rows[:, None] * WS_COLS + ACT_OFF[li - 1] + k[None, :],
                                mask=rmask[:, None] & kmask[None, :],
                                other=0.0,
                                cache_modifier=".cg",
                            )
                            w = tl.load(
                                w_ptr + W_OFF[li] + cols[:, None] * KDIMS[li] + k[None, :],
                                mask=cmask[:, None] & kmask[None, :],
                                other=0.0,
                            )
                            acc = tl.dot(x, tl.trans(w.to(tl.float32)), acc, input_precision=PREC)
                    if SPLIT[li] == 1:
                        _finish(
                            acc, rows, rmask, n, li, w_ptr, b_ptr, ws_ptr, cnt_ptr, out_ptr, scale,
                            NL, DIMS, KDIMS, W_OFF, B_OFF, BN, CHAIN_END, ACT_OFF, WS_COLS, ACT, TARGET_LOG, PREC,
                        )  # fmt: skip
                    else:
                        pmask = rmask[:, None] & cmask[None, :]
                        part = ws_ptr + rows[:, None] * WS_COLS + PART_OFF[li] + cols[None, :]
                        tl.store(part + s * DIMS[li], acc, mask=pmask)
                        tl.debug_barrier()
                        ticket_ptr = cnt_ptr + TC_OFF[li] + n * MAX_MB + m
                        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
                        if ticket == SPLIT[li] - 1:
                            # Last split of this tile: sum all partials in split order (deterministic), finish it.
                            tot = tl.zeros((BM, BN[li]), dtype=tl.float32)
                            for j in tl.static_range(SPLIT[li]):
                                tot += tl.load(part + j * DIMS[li], mask=pmask, other=0.0, cache_modifier=".cg")
                            tl.store(ticket_ptr, 0)  # every split has taken its ticket: reset for the next launch
                            _finish(
                                tot, rows, rmask, n, li, w_ptr, b_ptr, ws_ptr, cnt_ptr, out_ptr, scale,
                                NL, DIMS, KDIMS, W_OFF, B_OFF, BN, CHAIN_END, ACT_OFF, WS_COLS, ACT, TARGET_LOG, PREC,
                            )  # fmt: skip
                base += n_here
        t = tl.atomic_add(cnt_ptr + 0, 1, sem="relaxed", scope="gpu")
    # Every program has made its last claim before taking an exit ticket, so the last one may reset the counters.
    tl.debug_barrier()
    exit_ticket = tl.atomic_add(cnt_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if exit_ticket == tl.num_programs(0) - 1:
        idx = tl.arange(0, CNT_HEAD)
        tl.store(cnt_ptr + idx, tl.zeros((CNT_HEAD,), dtype=tl.int32), mask=idx < 2 + NL)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KernelPlan:
    """How one head is cut into tiles on one device, and where each layer lives in the workspace.

    Per layer ``l``: ``block_n``/``block_k`` tile sizes; ``split``/``k_split`` the K split (1 = none) and its length;
    ``n_tiles`` column blocks (0: the layer is fused into the previous tile); ``chain_end`` the last layer a finishing
    tile computes; ``prev`` the stage whose output layer ``l`` reads; ``act_off``/``part_off`` workspace columns of the
    stored activations / split-K partials (-1: none); ``ticket_off`` counter index of the split tickets (-1: none).
    """

    max_batch: int
    num_sms: int
    block_n: tuple[int, ...]
    block_k: tuple[int, ...]
    split: tuple[int, ...]
    k_split: tuple[int, ...]
    n_tiles: tuple[int, ...]
    chain_end: tuple[int, ...]
    prev: tuple[int, ...]
    act_off: tuple[int, ...]
    part_off: tuple[int, ...]
    ticket_off: tuple[int, ...]
    ws_cols: int
    n_counters: int
    max_m_blocks: int
    num_warps: int | None
    num_stages: int

    def warps(self, n_rows: int) -> int:
        """Warps per program for a batch of `n_rows`."""
        return self.num_warps or (8 if block_m(n_rows) == 64 else 4)


def block_m(n_rows: int) -> int:
    """Rows per tile for a batch: 16, 32 or 64 (``tl.dot`` needs >= 16; three kernel variants at most)."""
    return 16 if n_rows <= 16 else 32 if n_rows <= 32 else 64


def make_plan(
    params: HeadParams,
    max_batch: int,
    num_sms: int,
    *,
    block_n: int = 16,
    block_k: int = 64,
    block_k0: int = 128,
    min_k_per_split: int = 256,
    max_split: int = 16,
    fuse_max: int = 8192,
    num_warps: int | None = None,
    num_stages: int = 3,
) -> KernelPlan:
    """Tile a head for `num_sms` SMs and batches up to `max_batch` rows.

    A layer of at most 64 outputs is one column block (so the next small layer can be fused); a wider one is cut into
    `block_n` columns. Layer 0 reads `block_k0` inputs per step (more bytes in flight for the big layer), the others
    `block_k`. A layer with fewer column blocks than SMs is split along K (at least `min_k_per_split` inputs per
    split). A layer is fused when its previous layer's whole output is one tile and its padded weight tile has at most
    `fuse_max` elements. `num_warps` None: 4 for row blocks of up to 32 rows, 8 for 64 (fewer registers per thread).
    """
    if max_batch < 1 or num_sms < 1:
        raise ValueError("max_batch and num_sms must be >= 1")
    nl, dims, kdims = params.n_layers, params.dims, params.in_dims
    bn, bk, split, ksplit, ntiles, whole = [0] * nl, [0] * nl, [1] * nl, [0] * nl, [0] * nl, [False] * nl
    for li in range(nl):
        pad_n = _pow2(max(16, dims[li]))
        if li > 0 and whole[li - 1] and bn[li - 1] <= 256 and bn[li - 1] * pad_n <= fuse_max:
            bn[li], bk[li], ksplit[li], whole[li] = pad_n, bn[li - 1], bn[li - 1], True
            continue
        bn[li] = pad_n if dims[li] <= 64 else block_n
        ntiles[li] = _cdiv(dims[li], bn[li])
        whole[li] = ntiles[li] == 1
        bk[li] = min(block_k0 if li == 0 else block_k, _pow2(max(16, kdims[li])))
        s = max(1, min(num_sms // ntiles[li], kdims[li] // min_k_per_split, max_split))
        ksplit[li] = _cdiv(_cdiv(kdims[li], s), bk[li]) * bk[li]
        split[li] = _cdiv(kdims[li], ksplit[li])  # no empty split
    chain_end, prev = [-1] * nl, [-1] * nl
    for li in range(nl):
        if ntiles[li]:
            e = li
            while e + 1 < nl and not ntiles[e + 1]:
                e += 1
            chain_end[li] = e
    for li in range(1, nl):
        if ntiles[li]:
            prev[li] = next(s for s in range(li) if ntiles[s] and chain_end[s] == li - 1)
    align = 16  # workspace columns start 16-aligned (vectorised access)
    act_off, part_off, ticket_off = [-1] * nl, [-1] * nl, [-1] * nl
    cols = 0
    for li in range(nl):
        if ntiles[li] and chain_end[li] < nl - 1:
            act_off[chain_end[li]] = cols
            cols += _cdiv(dims[chain_end[li]], align) * align
        if ntiles[li] and split[li] > 1:
            part_off[li] = cols
            cols += _cdiv(split[li] * dims[li], align) * align
    if max_batch * max(cols, params.hidden_size) >= 2**31:
        raise ValueError(f"max_batch {max_batch} too large: the kernel's offsets are int32")
    max_mb = _cdiv(max_batch, 16)
    n_counters = _DONE0 + nl
    for li in range(nl):
        if ntiles[li] and split[li] > 1:
            ticket_off[li] = n_counters
            n_counters += ntiles[li] * max_mb
    return KernelPlan(
        max_batch=max_batch,
        num_sms=num_sms,
        block_n=tuple(bn),
        block_k=tuple(bk),
        split=tuple(split),
        k_split=tuple(ksplit),
        n_tiles=tuple(ntiles),
        chain_end=tuple(chain_end),
        prev=tuple(prev),
        act_off=tuple(act_off),
        part_off=tuple(part_off),
        ticket_off=tuple(ticket_off),
        ws_cols=max(cols, align),
        n_counters=n_counters,
        max_m_blocks=max_mb,
        num_warps=num_warps,
        num_stages=num_stages,
    )


@dataclass
class KernelBuffers:
    """Everything one launch writes, preallocated: fp32 workspace, int32 counters (zero between launches), output."""

    plan: KernelPlan
    workspace: torch.Tensor
    counters: torch.Tensor
    out: torch.Tensor


def default_num_sms(device: torch.device | str) -> int:
    """SM count of a CUDA device; 8 elsewhere (the interpreter: enough programs and splits to exercise the scheme)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def alloc_buffers(
    params: HeadParams, max_batch: int, num_sms: int | None = None, plan: KernelPlan | None = None
) -> KernelBuffers:
    """Allocate the workspace, counters and output for batches up to `max_batch` rows, on the params' device."""
    device = params.device
    if plan is None:
        plan = make_plan(params, max_batch, num_sms if num_sms is not None else default_num_sms(device))
    if plan.max_batch < max_batch:
        raise ValueError(f"plan is for {plan.max_batch} rows, asked for {max_batch}")
    return KernelBuffers(
        plan=plan,
        workspace=torch.zeros(max_batch * plan.ws_cols, dtype=torch.float32, device=device),
        counters=torch.zeros(plan.n_counters, dtype=torch.int32, device=device),
        out=torch.zeros(max_batch, params.n_out, dtype=torch.float32, device=device),
    )


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``); read the way Triton reads it."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older versions read the environment directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _use_dot16(hidden_dtype: torch.dtype, params: HeadParams) -> bool:
    # A native 16-bit tl.dot when hidden and weights share a 16-bit dtype. The interpreter's 16-bit dot is not
    # numerically right, so there the operands are upcast (same maths, float32 products).
    return hidden_dtype == params.dtype and params.dtype != torch.float32 and not interpreting()


def _kernel_args(
    hidden: torch.Tensor,
    generated: torch.Tensor | None,
    prompt_len: torch.Tensor | None,
    params: HeadParams,
    bufs: KernelBuffers,
) -> tuple[list, dict]:
    """Positional runtime arguments and the constexpr keyword arguments of one launch."""
    plan, n_rows = bufs.plan, hidden.shape[0]
    gen = generated if generated is not None else hidden
    plen = prompt_len if prompt_len is not None else hidden
    args = [
        hidden, hidden.stride(0), gen, gen.stride(0) if gen.dim() == 1 else 0,
        plen, plen.stride(0) if plen.dim() == 1 else 0, n_rows,
        params.w_packed, params.b_packed, params.w_extra, bufs.workspace, bufs.counters, bufs.out, params.scale,
    ]  # fmt: skip
    constexprs = {
        "H": params.hidden_size,
        "NL": params.n_layers,
        "DIMS": params.dims,
        "KDIMS": params.in_dims,
        "W_OFF": params.w_offsets,
        "B_OFF": params.b_offsets,
        "BN": plan.block_n,
        "BK": plan.block_k,
        "SPLIT": plan.split,
        "KSPLIT": plan.k_split,
        "NTILES": plan.n_tiles,
        "CHAIN_END": plan.chain_end,
        "PREV": plan.prev,
        "ACT_OFF": plan.act_off,
        "PART_OFF": plan.part_off,
        "TC_OFF": plan.ticket_off,
        "WS_COLS": plan.ws_cols,
        "MAX_MB": plan.max_m_blocks,
        "CNT_HEAD": _pow2(_DONE0 + params.n_layers),
        "BM": block_m(n_rows),
        "HAS_GEN": params.has_generated,
        "HAS_PLEN": params.has_prompt_len,
        "ACT": 0 if params.activation == "relu" else 1,
        "TARGET_LOG": params.target == "log",
        "DOT16": _use_dot16(hidden.dtype, params),
        "PREC": params.precision,
    }
    return args, constexprs


def _grid(n_rows: int, plan: KernelPlan) -> tuple[int]:
    m_blocks = _cdiv(n_rows, block_m(n_rows))
    tiles = sum(nt * s for nt, s in zip(plan.n_tiles, plan.split, strict=True)) * m_blocks
    return (max(1, min(tiles, plan.num_sms)),)


def launch(
    hidden: torch.Tensor,
    generated: torch.Tensor | None,
    prompt_len: torch.Tensor | None,
    params: HeadParams,
    bufs: KernelBuffers,
) -> torch.Tensor:
    """Run the fused head on ``hidden[:bs]`` into ``bufs.out``; returns the view ``bufs.out[:bs]``.

    No allocation and no host sync (CUDA-graph capturable) when `hidden` has unit column stride. Every row of `hidden`
    is computed, so pass the padded batch under a CUDA graph and ignore the padding rows' outputs. One
    :class:`KernelBuffers` must not be used by two launches running at the same time (e.g. on two streams).
    """
    n_rows = hidden.shape[0]
    if hidden.dim() != 2 or hidden.shape[1] != params.hidden_size:
        raise ValueError(f"hidden must be [bs, {params.hidden_size}], got {tuple(hidden.shape)}")
    if n_rows > bufs.plan.max_batch:
        raise ValueError(f"batch {n_rows} exceeds the buffers' max_batch {bufs.plan.max_batch}")
    for name, t in (("generated", generated), ("prompt_len", prompt_len)):
        if params.n_extra and (t is None or t.dim() != 1 or t.shape[0] < n_rows):
            raise ValueError(f"{name} must be a [bs] tensor for a head with extra features {params.extra_features}")
    if n_rows == 0:
        return bufs.out[:0]
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if n_rows * hidden.stride(0) >= 2**31:
        raise ValueError("hidden is too large for the kernel's int32 offsets")
    args, constexprs = _kernel_args(hidden, generated, prompt_len, params, bufs)
    _length_head_kernel[_grid(n_rows, bufs.plan)](
        *args, **constexprs, num_warps=bufs.plan.warps(n_rows), num_stages=bufs.plan.num_stages
    )
    return bufs.out[:n_rows]


def length_head_triton(
    hidden: torch.Tensor,
    generated: torch.Tensor,
    prompt_len: torch.Tensor,
    params: HeadParams,
    *,
    num_sms: int | None = None,
) -> torch.Tensor:
    """Predicted remaining tokens ``[bs, n_out]`` float32 from one Triton launch (same contract as the reference).

    Allocates its buffers on every call; the decode loop uses :class:`ares_kernels.LengthHeadRunner`, which keeps them.
    """
    bufs = alloc_buffers(params, max(1, hidden.shape[0]), num_sms)
    return launch(hidden, generated, prompt_len, params, bufs)


def compile_for_target(
    params: HeadParams,
    bufs: KernelBuffers,
    hidden_dtype: torch.dtype,
    n_rows: int,
    arch: int = 90,
    index_dtype: torch.dtype = torch.int64,
) -> triton.compiler.CompiledKernel:
    """Compile the kernel ahead of time for NVIDIA ``sm_<arch>`` (no GPU needed; uses Triton's bundled ptxas).

    Checks on a CPU machine that the GPU code path compiles; returns Triton's compiled kernel (``.asm['ptx']``, ...).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        raise RuntimeError("TRITON_INTERPRET is set: the kernel is an interpreted function, not compilable")
    hidden = torch.empty(0, params.hidden_size, dtype=hidden_dtype)
    idx = torch.empty(0, dtype=index_dtype)
    args, constexprs = _kernel_args(hidden, idx, idx, params, bufs)
    constexprs["BM"] = block_m(n_rows)
    constexprs["DOT16"] = hidden_dtype == params.dtype and params.dtype != torch.float32
    names = list(_length_head_kernel.arg_names)
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}  # what the JIT would specialise on: 16-aligned pointers and strides
    for i, (name, value) in enumerate(zip(names, args, strict=False)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name == "hid_stride" and params.hidden_size % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in constexprs:
        signature[name] = "constexpr"
    src = ASTSource(fn=_length_head_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": bufs.plan.warps(n_rows), "num_stages": bufs.plan.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
