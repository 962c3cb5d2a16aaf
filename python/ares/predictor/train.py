"""Fit a :class:`LengthHead` on prediction points: L1 for the point estimate, pinball loss for quantiles."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from ares.predictor.head import HeadConfig, LengthHead


@dataclass
class TrainConfig:
    """Optimisation settings."""

    epochs: int = 30
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # Dropout after each hidden activation, training only (a hook, so checkpoints keep the plain MLP layout).
    # The heads overfit within 1-2 epochs: consecutive steps of one request are near-duplicate points.
    dropout: float = 0.3
    patience: int = 5  # epochs without a better validation MAE before stopping
    seed: int = 0
    threads: int = 1
    max_seconds: float | None = None


def to_target(cfg: HeadConfig, remaining: torch.Tensor) -> torch.Tensor:
    """Remaining tokens -> the head's target space."""
    return torch.log1p(remaining) if cfg.target == "log" else remaining / cfg.scale


def loss_fn(cfg: HeadConfig, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 on output 0 (its minimiser is the median) + pinball loss per configured quantile."""
    loss = (raw[:, 0] - target).abs().mean()
    for i, q in enumerate(cfg.quantiles, start=1):
        diff = target - raw[:, i]
        loss = loss + torch.maximum(q * diff, (q - 1) * diff).mean()
    return loss


def _inputs(x: np.ndarray, extra: np.ndarray | None) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x, dtype=np.float32))
    if extra is not None and extra.shape[1]:
        t = torch.cat([t, torch.from_numpy(np.asarray(extra, dtype=np.float32))], 1)
    return t


@torch.no_grad()
def predict(head: LengthHead, hidden: np.ndarray, extra: np.ndarray | None, batch: int = 8192):
    """Point (and upper quantile, or None) predictions in tokens, as numpy arrays."""
    head.eval()
    points, uppers = [], []
    for i in range(0, len(hidden), batch):
        h = torch.from_numpy(np.asarray(hidden[i : i + batch], dtype=np.float32))
        e = None if extra is None or not head.cfg.n_extra else torch.from_numpy(extra[i : i + batch])
        p, u = head(h, e)
        points.append(p.numpy())
        if u is not None:
            uppers.append(u.numpy())
    return np.concatenate(points), (np.concatenate(uppers) if uppers else None)


def train_head(
    cfg: HeadConfig,
    train: tuple[np.ndarray, np.ndarray | None, np.ndarray],
    val: tuple[np.ndarray, np.ndarray | None, np.ndarray],
    tc: TrainConfig | None = None,
    log=print,
) -> tuple[LengthHead, dict]:
    """Train on ``(hidden, extra, remaining)`` arrays; keep the epoch with the best validation MAE (tokens)."""
    tc = tc or TrainConfig()
    torch.manual_seed(tc.seed)
    torch.set_num_threads(tc.threads)
    x_tr = _inputs(train[0], train[1] if cfg.n_extra else None)
    y_tr = torch.from_numpy(np.asarray(train[2], dtype=np.float32))
    head = LengthHead(cfg)
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: torch.nn.functional.dropout(out, tc.dropout, mod.training))
        for m in head.mlp
        if tc.dropout > 0 and not isinstance(m, torch.nn.Linear)
    ]
    head.in_mean.copy_(x_tr.mean(0))
    head.in_std.copy_(x_tr.std(0).clamp(min=1e-3))
    opt = torch.optim.AdamW(head.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc.epochs)
    t_tr = to_target(cfg, y_tr)
    with torch.no_grad():
        # Start each output at its training quantile: L1/pinball gradients have a fixed size, so a far-off
        # start would cost many epochs of walking the bias.
        qs = torch.tensor([0.5, *cfg.quantiles])
        head.mlp[-1].bias.copy_(torch.quantile(t_tr[:100_000], qs))
    best, best_state, bad, history = float("inf"), None, 0, []
    gen = torch.Generator().manual_seed(tc.seed)
    t0 = time.time()
    for epoch in range(tc.epochs):
        head.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        total = 0.0
        for i in range(0, len(perm), tc.batch_size):
            idx = perm[i : i + tc.batch_size]
            loss = loss_fn(cfg, head.raw(x_tr[idx, : cfg.hidden_size], x_tr[idx, cfg.hidden_size :]), t_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        if len(val[0]):
            point, _ = predict(head, val[0], val[1])
            mae = float(np.abs(point - val[2]).mean())
        else:  # no validation data (tiny collections): keep the latest epoch
            mae = -float(epoch)
        history.append({"epoch": epoch, "train_loss": total / len(x_tr), "val_mae": mae})
        log(f"epoch {epoch:2d} train loss {total / len(x_tr):.4f} val MAE {mae:.2f}")
        if mae < best - 1e-6:
            best, best_state, bad = mae, copy.deepcopy(head.state_dict()), 0
        else:
            bad += 1
            if bad >= tc.patience:
                break
        if tc.max_seconds is not None and time.time() - t0 > tc.max_seconds:
            log("time budget reached")
            break
    for h in hooks:
        h.remove()
    head.load_state_dict(best_state)
    return head.eval(), {"best_val_mae": best, "history": history, "seconds": time.time() - t0}
