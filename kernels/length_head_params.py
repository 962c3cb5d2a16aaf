"""Pack a :class:`ares.predictor.head.LengthHead` once into the tensors the reference and the Triton kernel read.

Why a separate packing step: the decode loop calls the head every step, so everything that does not depend on the
batch (dtype casts, folding the input standardisation into the first layer, laying the weights out in one flat buffer)
is done here, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ares.predictor.head import LengthHead

#: Extra scalar features a head may be trained with, in the order of the kernel's extra-column table.
KNOWN_EXTRAS: tuple[str, ...] = ("log_generated", "log_prompt_len")
ACTIVATIONS: tuple[str, ...] = ("relu", "gelu")
TARGETS: tuple[str, ...] = ("log", "linear")
PRECISIONS: tuple[str, ...] = ("ieee", "tf32", "tf32x3")
#: Offsets into the flat buffers are multiples of this many elements, so every layer starts 16-element aligned.
ALIGN = 16


@dataclass(frozen=True, eq=False)
class HeadParams:
    """A head's weights on one device, in two forms.

    Reference form (exact :class:`LengthHead` maths, float32): ``in_mean``, ``in_std``, ``weights``, ``biases``.

    Kernel form: the standardisation ``(x - mean) / std`` is folded into layer 0 (``W' = W / std``,
    ``b' = b - W' @ mean``, computed in float64, exact up to the final rounding), so the kernel reads raw hidden states.
    ``w_packed`` holds every layer's ``W [out, in]`` (``nn.Linear`` layout; layer 0 only its hidden-state columns)
    at ``w_offsets``, in ``dtype``; ``b_packed`` the (folded) biases at ``b_offsets``, float32; ``w_extra [2, dims[0]]``
    the folded layer-0 columns of ``log_generated`` (row 0) and ``log_prompt_len`` (row 1), zero for an unused feature.
    """

    hidden_size: int
    dims: tuple[int, ...]  # output width of every Linear; dims[-1] == n_out
    extra_features: tuple[str, ...]
    activation: str
    target: str
    scale: float
    quantiles: tuple[float, ...]
    dtype: torch.dtype
    precision: str  # tl.dot input precision for float32 operands on GPU: "ieee", "tf32" or "tf32x3"
    in_mean: torch.Tensor
    in_std: torch.Tensor
    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor, ...]
    w_packed: torch.Tensor
    w_offsets: tuple[int, ...]
    b_packed: torch.Tensor
    b_offsets: tuple[int, ...]
    w_extra: torch.Tensor

    @property
    def n_out(self) -> int:
        """Outputs per row: the point prediction, then one per quantile."""
        return self.dims[-1]

    @property
    def n_layers(self) -> int:
        """Number of Linear layers (hidden layers + the output layer)."""
        return len(self.dims)

    @property
    def n_extra(self) -> int:
        return len(self.extra_features)

    @property
    def in_dims(self) -> tuple[int, ...]:
        """Input width of every Linear as the kernel sees it (layer 0: the hidden state only)."""
        return (self.hidden_size, *self.dims[:-1])

    @property
    def has_generated(self) -> bool:
        return "log_generated" in self.extra_features

    @property
    def has_prompt_len(self) -> bool:
        return "log_prompt_len" in self.extra_features

    @property
    def device(self) -> torch.device:
        return self.w_packed.device


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def prepare_head(
    head: LengthHead,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    precision: str = "tf32",
) -> HeadParams:
    """Pack `head` for :func:`length_head_reference` and the Triton kernel, on `device`.

    `dtype` is the kernel's weight dtype (float32, bfloat16 or float16; biases and the extra-feature columns stay
    float32); the reference always uses the head's float32 weights. `precision` is the ``tl.dot`` input precision for
    float32 operands on GPU: "tf32" (default: tensor cores, ~1e-3 relative error, far below the predictor's own error),
    "tf32x3" (about float32 accuracy, but it needs many more registers: spills at 64-row tiles) or "ieee" (no tensor
    cores). The interpreter always computes in float32.
    """
    cfg = head.cfg
    if cfg.activation not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {cfg.activation!r} (supported: {ACTIVATIONS})")
    if cfg.target not in TARGETS:
        raise ValueError(f"unsupported target {cfg.target!r} (supported: {TARGETS})")
    unknown = set(cfg.extra_features) - set(KNOWN_EXTRAS)
    if unknown:
        raise ValueError(f"unknown extra features {sorted(unknown)} (supported: {KNOWN_EXTRAS})")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported weight dtype {dtype}")
    if precision not in PRECISIONS:
        raise ValueError(f"unsupported precision {precision!r} (supported: {PRECISIONS})")
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    device = torch.device(device)
    hidden = cfg.hidden_size

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=device, dtype=torch.float32).contiguous()

    weights = tuple(f32(lin.weight) for lin in linears)
    biases = tuple(f32(lin.bias) for lin in linears)
    in_mean, in_std = f32(head.in_mean), f32(head.in_std)

    # Fold the standardisation into layer 0 in float64 (then round once): z = (x - m) / s, W z + b = W' x + b'.
    w0 = linears[0].weight.detach().double().cpu()
    mean, std = head.in_mean.detach().double().cpu(), head.in_std.detach().double().cpu()
    w0f = w0 / std[None, :]
    b0f = linears[0].bias.detach().double().cpu() - w0f @ mean
    w_extra = torch.zeros(len(KNOWN_EXTRAS), w0.shape[0], dtype=torch.float64)
    for j, name in enumerate(cfg.extra_features):
        w_extra[KNOWN_EXTRAS.index(name)] += w0f[:, hidden + j]

    kernel_w = [w0f[:, :hidden], *(lin.weight.detach().double().cpu() for lin in linears[1:])]
    kernel_b = [b0f, *(lin.bias.detach().double().cpu() for lin in linears[1:])]
    w_offsets, b_offsets, pos_w, pos_b = [], [], 0, 0
    for w, b in zip(kernel_w, kernel_b, strict=True):
        w_offsets.append(pos_w)
        b_offsets.append(pos_b)
        pos_w += _aligned(w.numel())
        pos_b += _aligned(b.numel())
    w_packed = torch.zeros(pos_w, dtype=torch.float64)
    b_packed = torch.zeros(pos_b, dtype=torch.float64)
    for w, b, ow, ob in zip(kernel_w, kernel_b, w_offsets, b_offsets, strict=True):
        w_packed[ow : ow + w.numel()] = w.reshape(-1)
        b_packed[ob : ob + b.numel()] = b

    return HeadParams(
        hidden_size=hidden,
        dims=tuple(lin.out_features for lin in linears),
        extra_features=tuple(cfg.extra_features),
        activation=cfg.activation,
        target=cfg.target,
        scale=float(cfg.scale),
        quantiles=tuple(cfg.quantiles),
        dtype=dtype,
        precision=precision,
        in_mean=in_mean,
        in_std=in_std,
        weights=weights,
        biases=biases,
        w_packed=w_packed.to(device=device, dtype=dtype),
        w_offsets=tuple(w_offsets),
        b_packed=b_packed.to(device=device, dtype=torch.float32),
        b_offsets=tuple(b_offsets),
        w_extra=w_extra.to(device=device, dtype=torch.float32).contiguous(),
    )
