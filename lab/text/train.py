"""Training the lab's causal LM on (x, y) batches: AdamW, warm-up then cosine decay, seeded, plain PyTorch.

The same loop pre-trains on corpus text (every token scored) and fine-tunes on instructions (the response
scored), since both are the fip.tasks causal-LM batch; the loss is CAUSAL_LM's per-sequence NLL, the
quantity FIP's Fisher is built from.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fip.tasks import CAUSAL_LM, IGNORE


@dataclass(frozen=True)
class LMTrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def used_length(x: torch.Tensor, y: torch.Tensor, pad_id: int) -> int:
    """Columns up to the last real token of any row: right padding past it changes no scored logit."""
    used = (y != IGNORE) | (x != pad_id)
    cols = used.any(0).nonzero()
    return int(cols[-1]) + 1 if len(cols) else 1


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss: mean over sequences of each one's mean response-token NLL."""
    return CAUSAL_LM.mean_nll(model(input_ids=x).logits, y)


def _lr_factor(step: int, cfg: LMTrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


def train_lm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: LMTrainConfig, pad_id: int,
             progress: bool = False, desc: str = "train") -> dict:
    """Train `model` for `cfg.steps` batches drawn by seeded epochs over (x, y); returns losses and seconds."""
    if len(x) == 0:
        raise ValueError("cannot train on an empty set")
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=desc, unit="batch")
    start, step, losses = time.perf_counter(), 0, []
    model.train()
    while step < cfg.steps:
        for idx in torch.randperm(len(x), generator=g).split(cfg.batch_size):
            if step >= cfg.steps:
                break
            xb, yb = x[idx], y[idx]
            n = used_length(xb, yb, pad_id)
            loss = lm_loss(model, xb[:, :n], yb[:, :n])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - start, "steps": step}
