"""Supervised training on in-memory image sets, epoch by epoch: how the lab trains its backdoored models
(and the clean reference models that LC and Trojan need)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn

from fip.training import SGDSettings, augment_batch, check_choices, cross_entropy
from lab.datasets import ImageSet

BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainConfig(SGDSettings):
    """SGD with momentum and a one-cycle schedule: reaches good accuracy in few epochs on CPU."""

    epochs: int = 5
    batch_size: int = 256
    lr: float = 0.1
    schedule: Literal["onecycle", "constant"] = "onecycle"
    augment_pad: int = 0  # 0: no augmentation; else random crop after this zero padding, plus flip (BackdoorBench)

    def __post_init__(self) -> None:
        check_choices(self)
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def train_classifier(
    model: nn.Module,
    data: ImageSet,
    cfg: TrainConfig,
    loss_fn: BatchLoss = cross_entropy,
    extra_optimizers: list[torch.optim.Optimizer] | None = None,
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    progress: bool = False,
    desc: str = "train",
    max_steps: int | None = None,
) -> dict:
    """Train `model` on `data` (uint8 images) for `cfg.epochs`; returns losses and seconds.

    `loss_fn` lets an attack (Input-aware) poison batches on the fly; `extra_optimizers` step
    alongside the model's (its trigger generator); `transform` augments float batches.
    """
    if len(data) == 0:
        raise ValueError(f"{data.name}: cannot train on an empty data set")
    if transform is None and cfg.augment_pad > 0:
        transform = partial(augment_batch, pad=cfg.augment_pad)
    g = torch.Generator().manual_seed(cfg.seed)
    # an attack's own randomness (Input-aware's masks) draws on the global RNG: seed it for this run only
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        opt = cfg.optimizer(model.parameters(), nesterov=True)
        steps_per_epoch = (len(data) + cfg.batch_size - 1) // cfg.batch_size
        total = cfg.epochs * steps_per_epoch if max_steps is None else min(max_steps, cfg.epochs * steps_per_epoch)
        sched = (
            torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.25)
            if cfg.schedule == "onecycle"
            else None
        )
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=desc, unit="batch")
        start, step, losses = time.perf_counter(), 0, []
        model.train()
        while step < total:
            for idx in torch.randperm(len(data), generator=g).split(cfg.batch_size):
                if step >= total:
                    break
                x = data.x[idx].float() / 255.0
                if transform is not None:
                    x = transform(x, g)
                loss = loss_fn(model, x, data.y[idx])
                opt.zero_grad(set_to_none=True)
                for o in extra_optimizers or []:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for o in extra_optimizers or []:
                    o.step()
                if sched is not None:
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
