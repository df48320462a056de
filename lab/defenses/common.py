"""What the defenses share: the clean set, one fine-tuning loop, and choosing on D_val only."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fip.models import classifier_head
from fip.training import BatchSampler, SGDSettings, cosine_lr, cross_entropy
from lab.metrics import accuracy_from_predictions, predict

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class DefenseError(ValueError):
    """A defense cannot run on this model or with these settings."""


@dataclass
class CleanSet:
    """The defender's D_val as float images in [0, 1] with labels; nothing poisoned ever enters."""

    x: torch.Tensor
    y: torch.Tensor

    def accuracy(self, model: nn.Module) -> float:
        return accuracy_from_predictions(predict(model, self.x), self.y)


@dataclass
class FinetuneSettings(SGDSettings):
    """Fine-tuning on D_val: batches of `batch_size` drawn with replacement, augmented, SGD + cosine."""

    steps: int = 300
    augment: bool = True
    augment_pad: int = 4


@dataclass
class DefenseResult:
    model: nn.Module
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def sgd_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def finetune(
    model: nn.Module,
    clean: CleanSet,
    s: FinetuneSettings,
    loss_fn: LossFn = cross_entropy,
    params: Sequence[torch.Tensor] | None = None,
    step_fn: Callable[[nn.Module, torch.optim.Optimizer, LossFn, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """Fine-tune `model` in place on D_val with `loss_fn`; `step_fn` replaces the plain SGD step (SAM)."""
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = s.optimizer(params)
    sampler = BatchSampler(clean.x, clean.y, s.batch_size, s.seed, s.augment, s.augment_pad)
    model.train()
    for step in range(s.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(s.lr, step, s.steps)
        x, y = sampler()
        if step_fn is None:
            loss = loss_fn(model, x, y)
            sgd_step(opt, loss)
        else:
            loss = step_fn(model, opt, loss_fn, x, y)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"fine-tuning diverged at step {step} (loss {float(loss)})")
    return model.eval()


def most_aggressive_within(
    model_at: Callable[[float], nn.Module], levels: Sequence[float], clean: CleanSet, max_drop: float
) -> tuple[float, nn.Module, list[dict]]:
    """Among increasingly aggressive `levels`, the last whose D_val accuracy stays within `max_drop` of
    the unpruned model's (the choice never looks at poisoned data). Returns (level, model, trace)."""
    base: float | None = None
    chosen, chosen_model, trace = levels[0], None, []
    for level in levels:
        candidate = model_at(level)
        acc = clean.accuracy(candidate)
        trace.append({"level": level, "dval_acc": acc})
        if base is None:
            base = acc  # the first level is the reference (and always within the budget)
        if acc >= base - max_drop:
            chosen, chosen_model = level, candidate
        else:
            break
    return chosen, chosen_model, trace


def penultimate_head(model: nn.Module) -> nn.Linear:
    """The classifier's final linear layer (its input is the penultimate feature vector)."""
    head = classifier_head(model)
    if head is None:
        raise DefenseError(f"{type(model).__name__} has no linear classifier head")
    return head


def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Inputs of the final linear layer for `x` (eval mode)."""
    head = penultimate_head(model)
    feats: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda m, inp, out: feats.append(inp[0].detach()))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(x[i : i + batch_size])
    finally:
        handle.remove()
        model.train(was)
    return torch.cat(feats)


def fresh_copy(model: nn.Module) -> nn.Module:
    work = copy.deepcopy(model)
    for p in work.parameters():
        p.requires_grad_(True)
    return work
