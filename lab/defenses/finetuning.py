"""Fine-tuning defenses: FT, FT-SAM, NAD, FST. All run :func:`finetune` with their own loss or step."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fip.training import cross_entropy
from lab.defenses.common import (
    CleanSet,
    DefenseError,
    FinetuneSettings,
    LossFn,
    finetune,
    fresh_copy,
    penultimate_head,
    sgd_step,
)


def vanilla_finetune(model: nn.Module, clean: CleanSet, s: FinetuneSettings) -> nn.Module:
    """FT: plain cross-entropy fine-tuning of all weights on D_val."""
    return finetune(fresh_copy(model), clean, s)


def sam_step(rho: float, adaptive: bool = True):
    """A sharpness-aware step: ascend to the worst point within radius `rho` along the gradient, take
    the gradient there, and apply it at the original weights. ``adaptive`` is ASAM (Kwon et al. 2021),
    whose radius scales with each weight's magnitude, ``eps = rho |w|^2 g / || |w| g ||``, as FT-SAM
    uses it; plain SAM (Foret et al. 2021) at FT-SAM's radius 2 destroyed the lab's models (ACC 22 %)."""

    def step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor):
        params = [p for g in opt.param_groups for p in g["params"]]
        loss = loss_fn(model, x, y)
        grads = torch.autograd.grad(loss, params)
        scales = [p.detach().abs() if adaptive else torch.ones_like(p) for p in params]
        norm = torch.sqrt(sum((s * g).pow(2).sum() for s, g in zip(scales, grads, strict=True))) + 1e-12
        eps = [rho * s.pow(2) * g / norm for s, g in zip(scales, grads, strict=True)]
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.add_(e)
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, y).backward()
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.sub_(e)
        opt.step()
        return loss

    return step


def ft_sam(model: nn.Module, clean: CleanSet, s: FinetuneSettings, rho: float = 2.0, adaptive: bool = True) -> nn.Module:
    """FT-SAM (Zhu et al. ICCV 2023): fine-tuning with (adaptive) SAM and a large radius rho, which
    shrinks the norms of backdoor-related neurons."""
    return finetune(fresh_copy(model), clean, s, step_fn=sam_step(rho, adaptive))


def attention_map(feature: torch.Tensor, p: int = 2) -> torch.Tensor:
    """NAD's attention: channel-wise mean of |f|^p, flattened and L2-normalised per sample."""
    return F.normalize(feature.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def _capture(model: nn.Module, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], list]:
    store: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise DefenseError(f"NAD needs layers {list(names)}; {type(model).__name__} lacks {missing}")
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, o)) for n in names]
    return store, handles


def nad(
    model: nn.Module,
    clean: CleanSet,
    s: FinetuneSettings,
    teacher_steps: int = 150,
    layers: Sequence[str] = ("layer2", "layer3", "layer4"),
    betas: Sequence[float] = (500.0, 1000.0, 1000.0),
    p: int = 2,
) -> nn.Module:
    """NAD (Li et al. ICLR 2021): fine-tune a teacher, then distil its attention maps into the student."""
    teacher = finetune(fresh_copy(model), clean, FinetuneSettings(**{**s.__dict__, "steps": teacher_steps}))
    student = fresh_copy(model)
    t_store, t_handles = _capture(teacher, layers)
    s_store, s_handles = _capture(student, layers)
    teacher.eval()

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(m(x), y)
        with torch.no_grad():
            teacher(x)
        for name, beta in zip(layers, betas, strict=True):
            loss = loss + beta * (attention_map(s_store[name], p) - attention_map(t_store[name], p)).pow(2).mean()
        return loss

    try:
        return finetune(student, clean, s, loss_fn=loss_fn)
    finally:
        for h in t_handles + s_handles:
            h.remove()


def fst(model: nn.Module, clean: CleanSet, s: FinetuneSettings, alpha: float = 0.2) -> nn.Module:
    """FST (Min et al. NeurIPS 2023): re-initialise the linear head and fine-tune everything while
    penalising the new head's alignment with the original one (``alpha * <w, w_orig>``), keeping the
    head's norm at the original's; the feature extractor is pushed away from backdoor features."""
    work = fresh_copy(model)
    head = penultimate_head(work)
    w_orig = head.weight.detach().clone()
    norm = w_orig.norm()
    with torch.no_grad():
        nn.init.kaiming_uniform_(head.weight, a=5**0.5, generator=torch.Generator().manual_seed(s.seed))
        head.weight.mul_(norm / head.weight.norm())
        if head.bias is not None:
            head.bias.zero_()

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cross_entropy(m, x, y) + alpha * (head.weight * w_orig).sum()

    def step_fn(m, opt, lf, x, y):
        loss = lf(m, x, y)
        sgd_step(opt, loss)
        with torch.no_grad():
            head.weight.mul_(norm / (head.weight.norm() + 1e-12))
        return loss

    return finetune(work, clean, s, loss_fn=loss_fn, step_fn=step_fn)
