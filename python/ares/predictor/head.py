"""The remaining-length head: an MLP on one hidden state (+ a few scalar features), and its checkpoint format.

Checkpoint = ``<name>.safetensors`` (weights and input normalisation) + ``<name>.json`` (:class:`HeadConfig`).
Loading needs only torch + safetensors: ``load_head(path, model_hidden_size=576)``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

FORMAT = "ares-length-head/1"


@dataclass
class HeadConfig:
    """Everything needed to rebuild and feed a head."""

    hidden_size: int
    hidden_dims: list[int] = field(default_factory=lambda: [256, 64])
    layer: str = "final_norm"  # which hidden state: "final_norm" (what SGLang exposes) or "layer_<i>"
    extra_features: list[str] = field(default_factory=list)  # e.g. ["log_generated", "log_prompt_len"]
    target: str = "log"  # "log": the MLP predicts log1p(remaining); "linear": remaining / scale
    scale: float = 1.0  # only for target == "linear"
    quantiles: list[float] = field(default_factory=list)  # extra outputs, e.g. [0.9] for P90
    model_name: str = "smollm2"
    activation: str = "relu"
    format: str = FORMAT

    @property
    def n_extra(self) -> int:
        return len(self.extra_features)


class LengthHead(nn.Module):
    """``forward(hidden [bs,H], extra [bs,k]) -> (point [bs], upper [bs] or None)``, in remaining tokens.

    Inputs are standardised with buffers fitted on the training set (``in_mean``/``in_std``), so callers pass raw
    hidden states. ``upper`` is the first configured quantile (P90), if any.
    """

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        d_in = cfg.hidden_size + cfg.n_extra
        self.register_buffer("in_mean", torch.zeros(d_in))
        self.register_buffer("in_std", torch.ones(d_in))
        act = {"relu": nn.ReLU, "gelu": nn.GELU}[cfg.activation]
        layers: list[nn.Module] = []
        prev = d_in
        for width in cfg.hidden_dims:
            layers += [nn.Linear(prev, width), act()]
            prev = width
        layers.append(nn.Linear(prev, 1 + len(cfg.quantiles)))
        self.mlp = nn.Sequential(*layers)

    def make_extra(self, generated: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor | None:
        """The extra inputs this head was trained with, from per-request counters ([bs] each); None if none."""
        if not self.cfg.n_extra:
            return None
        feats = {"log_generated": torch.log1p(generated.float()), "log_prompt_len": torch.log1p(prompt_len.float())}
        unknown = set(self.cfg.extra_features) - set(feats)
        if unknown:
            raise ValueError(f"unknown extra features {sorted(unknown)}")
        return torch.stack([feats[n] for n in self.cfg.extra_features], dim=-1)

    def raw(self, hidden: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs in target space, [bs, 1 + n_quantiles] (what the losses see)."""
        if hidden.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"hidden size {hidden.shape[-1]} does not match head hidden size {self.cfg.hidden_size}")
        x = hidden.to(self.in_mean.dtype)
        if self.cfg.n_extra:
            if extra is None or extra.shape[-1] != self.cfg.n_extra:
                raise ValueError(f"head needs {self.cfg.n_extra} extra features {self.cfg.extra_features}")
            x = torch.cat([x, extra.to(x.dtype)], dim=-1)
        return self.mlp((x - self.in_mean) / self.in_std)

    def to_tokens(self, raw: torch.Tensor) -> torch.Tensor:
        """Map target-space outputs to remaining tokens (>= 1: the current step is still to run)."""
        tokens = torch.expm1(raw) if self.cfg.target == "log" else raw * self.cfg.scale
        return tokens.clamp(min=1.0)

    def forward(
        self, hidden: torch.Tensor, extra: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.to_tokens(self.raw(hidden, extra))
        return out[:, 0], (out[:, 1] if self.cfg.quantiles else None)


def count_params(module: nn.Module) -> int:
    """Trainable parameter count (normalisation buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


def head_flops(cfg: HeadConfig) -> int:
    """FLOPs of one request-step: 2 per multiply-add of every Linear, plus normalisation and activations."""
    dims = [cfg.hidden_size + cfg.n_extra, *cfg.hidden_dims, 1 + len(cfg.quantiles)]
    matmul = sum(2 * a * b + b for a, b in zip(dims[:-1], dims[1:], strict=False))
    return matmul + 2 * dims[0] + sum(cfg.hidden_dims)


def save_head(head: LengthHead, path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """Write ``path.safetensors`` + ``path.json``; `dtype` (e.g. bfloat16) shrinks the weights on disk."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to(dtype if k.startswith("mlp.") else torch.float32).contiguous()
        for k, v in head.state_dict().items()
    }
    st, js = path.with_suffix(".safetensors"), path.with_suffix(".json")
    save_file(tensors, str(st), metadata={"format": FORMAT})
    js.write_text(json.dumps(asdict(head.cfg), indent=2) + "\n")
    return st, js


def load_head(path: str | Path, model_hidden_size: int | None = None) -> LengthHead:
    """Load a head saved by :func:`save_head` (``path`` with or without suffix) as a float32 eval-mode module.

    If `model_hidden_size` is given, a mismatch with the checkpoint fails loudly, naming both sizes.
    """
    from safetensors.torch import load_file

    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    raw = json.loads(base.with_suffix(".json").read_text())
    if raw.get("format") != FORMAT:
        raise ValueError(f"{base}.json is not an ARES length head (format {raw.get('format')!r})")
    cfg = HeadConfig(**raw)
    if model_hidden_size is not None and model_hidden_size != cfg.hidden_size:
        raise ValueError(
            f"checkpoint hidden size {cfg.hidden_size} does not match model hidden size {model_hidden_size} "
            f"({base}; trained for {cfg.model_name!r})"
        )
    head = LengthHead(cfg)
    state = {k: v.to(torch.float32) for k, v in load_file(str(base.with_suffix(".safetensors"))).items()}
    head.load_state_dict(state)
    return head.eval()
