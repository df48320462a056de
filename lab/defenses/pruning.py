"""Pruning defenses: Fine-Pruning and ANP. How much to prune is chosen on D_val accuracy only."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fip.training import BatchSampler
from lab.defenses.common import (
    CleanSet,
    DefenseError,
    FinetuneSettings,
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


def fine_pruning(model: nn.Module, clean: CleanSet, s: FinetuneSettings, max_drop: float = 0.10,
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


def anp(model: nn.Module, clean: CleanSet, s: FinetuneSettings, eps: float = 0.4, alpha: float = 0.2,
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


def prune_by_masks(model: nn.Module, masks: list[torch.Tensor], clean: CleanSet, max_drop: float,
                   step: float = 0.005, max_fraction: float = 0.3) -> tuple[nn.Module, dict]:
    """Zero the BatchNorm neurons of `model` with the smallest learned masks (ranked over all layers),
    as many as D_val accuracy allows: the largest fraction whose accuracy stays within `max_drop` of
    the unpruned model's. Pruning by count rather than by a fixed mask threshold (ANP's "number"
    mode): on narrow models a threshold step of 0.05 can remove dozens of neurons at once."""
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    flat = torch.cat(masks)
    owner = torch.cat([torch.full((len(m),), i) for i, m in enumerate(masks)])
    local = torch.cat([torch.arange(len(m)) for m in masks])
    order = flat.argsort(stable=True)

    def pruned_at(fraction: float) -> nn.Module:
        out = fresh_copy(model)
        modules = dict(out.named_modules())
        chosen = order[: int(round(fraction * len(order)))]
        with torch.no_grad():
            for j in chosen.tolist():
                bn = modules[bn_names[int(owner[j])]]
                bn.weight[local[j]] = 0
                bn.bias[local[j]] = 0
        return out.eval()

    levels = [round(float(t), 4) for t in np.arange(0, max_fraction + 1e-9, step)]
    level, pruned, trace = most_aggressive_within(pruned_at, levels, clean, max_drop)
    n_pruned = int(round(level * len(order)))
    threshold = float(flat[order[n_pruned - 1]]) if n_pruned else 0.0
    return pruned, {"pruned_fraction": level, "pruned_neurons": n_pruned, "threshold": threshold, "search": trace}

