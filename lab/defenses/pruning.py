"""Pruning defenses: Fine-Pruning, ANP and RNP. How much to prune is chosen on D_val accuracy only."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fip.purify import BatchSampler
from lab.defenses.common import (
    CleanSet,
    DefenseError,
    TuneSettings,
    finetune,
    fresh_copy,
    most_aggressive_within,
    penultimate_features,
    penultimate_head,
)


def _prune_head_inputs(model: nn.Module, channels: torch.Tensor) -> nn.Module:
    """Zero the final layer's input columns for `channels`: the last conv layer's channels no longer
    reach the output (equivalent to pruning them, since the head is their only consumer)."""
    pruned = copy.deepcopy(model)
    head = penultimate_head(pruned)
    with torch.no_grad():
        head.weight[:, channels] = 0
    mask = torch.ones(head.in_features, dtype=torch.bool)
    mask[channels] = False
    head.register_forward_pre_hook(lambda m, inp, keep=mask: (inp[0] * keep.to(inp[0]),))
    return pruned


def fine_pruning(model: nn.Module, clean: CleanSet, s: TuneSettings, max_drop: float = 0.10,
                 step_fraction: float = 0.05) -> tuple[nn.Module, dict]:
    """Fine-Pruning (Liu et al. RAID 2018): prune the last conv layer's channels in order of rising mean
    activation on D_val while D_val accuracy stays within `max_drop`, then fine-tune."""
    order = penultimate_features(model, clean.x).mean(0).argsort()
    levels = list(np.round(np.arange(0, 0.95 + 1e-9, step_fraction), 4))
    level, pruned, trace = most_aggressive_within(
        lambda frac: _prune_head_inputs(model, order[: int(frac * len(order))]), levels, clean, max_drop
    )
    finetune(pruned, clean, s)
    return pruned, {"pruned_fraction": level, "channels": int(level * len(order)), "search": trace}


class _Perturbed:
    """ANP's per-neuron mask m and adversarial perturbations (delta, xi) on every BatchNorm layer:
    weight -> weight * (m + delta), bias -> bias * (1 + xi)."""

    def __init__(self, model: nn.Module, eps: float) -> None:
        self.bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
        if not self.bns:
            raise DefenseError(f"ANP perturbs BatchNorm neurons; {type(model).__name__} has none")
        self.eps = eps
        self.masks = [torch.ones(b.num_features, requires_grad=True) for b in self.bns]
        self.deltas = [torch.zeros(b.num_features, requires_grad=True) for b in self.bns]
        self.xis = [torch.zeros(b.num_features, requires_grad=True) for b in self.bns]
        self.perturb = False
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(self.bns)]

    def _hook(self, i: int):
        def hook(bn: nn.Module, inp, out):
            x = inp[0]
            normed = F.batch_norm(x, bn.running_mean, bn.running_var, None, None, False, 0.0, bn.eps)
            scale = self.masks[i] + (self.deltas[i] if self.perturb else 0)
            shift = 1 + (self.xis[i] if self.perturb else 0)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return normed * (bn.weight * scale).view(shape) + (bn.bias * shift).view(shape)

        return hook

    def reset_noise(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            for t in self.deltas + self.xis:
                t.copy_((torch.rand(t.shape, generator=generator) * 2 - 1) * self.eps)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def anp(model: nn.Module, clean: CleanSet, s: TuneSettings, eps: float = 0.4, alpha: float = 0.2,
        mask_lr: float = 0.2, max_drop: float = 0.10) -> tuple[nn.Module, dict]:
    """ANP (Wu & Wang NeurIPS 2021): learn per-neuron masks that keep D_val loss low even under
    adversarial neuron perturbations, then prune the neurons with small masks. The threshold is the
    highest whose D_val accuracy stays within `max_drop` (never chosen on poisoned data)."""
    work = copy.deepcopy(model).eval()  # running statistics stay fixed; only masks and noise move
    for p in work.parameters():
        p.requires_grad_(False)
    pert = _Perturbed(work, eps)
    g = torch.Generator().manual_seed(s.seed)
    mask_opt = torch.optim.SGD(pert.masks, lr=mask_lr, momentum=0.9)
    noise_opt = torch.optim.SGD(pert.deltas + pert.xis, lr=eps / 1)
    sampler = BatchSampler(clean.x, clean.y, s.batch_size, s.seed, augment=False)
    try:
        for _ in range(s.steps):
            x, y = sampler()
            # one step of noise maximisation from a random start
            pert.reset_noise(g)
            pert.perturb = True
            noise_opt.zero_grad()
            (-F.cross_entropy(work(x), y)).backward()
            noise_opt.step()
            with torch.no_grad():
                for t in pert.deltas + pert.xis:
                    t.clamp_(-eps, eps)
            # mask step on the natural and the perturbed loss
            mask_opt.zero_grad()
            robust = F.cross_entropy(work(x), y)
            pert.perturb = False
            natural = F.cross_entropy(work(x), y)
            (alpha * natural + (1 - alpha) * robust).backward()
            mask_opt.step()
            with torch.no_grad():
                for m in pert.masks:
                    m.clamp_(0, 1)
    finally:
        pert.remove()
    return prune_by_masks(model, [m.detach().clone() for m in pert.masks], clean, max_drop)


def prune_by_masks(model: nn.Module, masks: list[torch.Tensor], clean: CleanSet,
                   max_drop: float) -> tuple[nn.Module, dict]:
    """Zero the BatchNorm neurons of `model` whose learned mask is below a threshold; the threshold is
    the highest whose D_val accuracy stays within `max_drop` of the unpruned model's."""
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]

    def pruned_at(threshold: float) -> nn.Module:
        out = fresh_copy(model)
        modules = dict(out.named_modules())
        with torch.no_grad():
            for name, m in zip(bn_names, masks, strict=True):
                bn = modules[name]
                off = m < threshold
                bn.weight[off] = 0
                bn.bias[off] = 0
        return out.eval()

    levels = [0.0] + [round(t, 2) for t in np.arange(0.05, 0.95, 0.05)]
    level, pruned, trace = most_aggressive_within(pruned_at, levels, clean, max_drop)
    n_pruned = int(sum(int((m < level).sum()) for m in masks))
    return pruned, {"threshold": level, "pruned_neurons": n_pruned, "search": trace}


def rnp(model: nn.Module, clean: CleanSet, s: TuneSettings, unlearn_lr: float = 0.01, unlearn_floor: float = 0.2,
        unlearn_steps: int = 100, mask_lr: float = 0.2, max_drop: float = 0.10) -> tuple[nn.Module, dict]:
    """RNP (Li et al. ICML 2023): unlearn D_val by gradient ascent until the batch accuracy falls to
    `unlearn_floor`, then learn per-neuron masks that recover D_val on the unlearned weights; neurons
    the recovery leaves near zero carry the backdoor and are pruned from the original model."""
    unlearned = copy.deepcopy(model).train()
    opt = torch.optim.SGD(unlearned.parameters(), lr=unlearn_lr, momentum=0.9, weight_decay=s.weight_decay)
    sampler = BatchSampler(clean.x, clean.y, s.batch_size, s.seed, augment=False)
    unlearn_done = 0
    for unlearn_done in range(1, unlearn_steps + 1):
        x, y = sampler()
        logits = unlearned(x)
        opt.zero_grad(set_to_none=True)
        (-F.cross_entropy(logits, y)).backward()
        nn.utils.clip_grad_norm_(unlearned.parameters(), 20.0)
        opt.step()
        if (logits.argmax(1) == y).float().mean() <= unlearn_floor:
            break
    unlearned.eval()
    for p in unlearned.parameters():
        p.requires_grad_(False)
    masks = _Perturbed(unlearned, eps=0.0)
    mask_opt = torch.optim.SGD(masks.masks, lr=mask_lr, momentum=0.9)
    try:
        for _ in range(s.steps):
            x, y = sampler()
            mask_opt.zero_grad()
            F.cross_entropy(unlearned(x), y).backward()
            mask_opt.step()
            with torch.no_grad():
                for m in masks.masks:
                    m.clamp_(0, 1)
    finally:
        masks.remove()
    pruned, info = prune_by_masks(model, [m.detach().clone() for m in masks.masks], clean, max_drop)
    return pruned, {**info, "unlearn_steps": unlearn_done, "unlearned_dval_acc": clean.accuracy(unlearned)}
