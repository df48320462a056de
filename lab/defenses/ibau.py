"""I-BAU (Zeng et al. ICLR 2022): implicit backdoor adversarial unlearning.

A minimax problem ``min_theta max_delta L(theta; x + delta)`` with one universal perturbation
``delta`` per round. The inner maximisation is solved by a few gradient steps; the outer gradient
includes the implicit term through the inner solution, computed with the fixed-point (Neumann
series) hypergradient: for the inner map ``Phi(delta, theta) = delta + a * grad_delta L``,

    dL_out/dtheta = d_theta L_out + (d_theta Phi)^T v,  v = sum_k (d_delta Phi)^T^k d_delta L_out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fip.training import BatchSampler
from lab.defenses.common import CleanSet, FinetuneSettings, fresh_copy


def _inner_max(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, bound: float) -> torch.Tensor:
    """A universal perturbation raising the batch loss, L2 norm at most `bound`."""
    delta = torch.zeros(1, *x.shape[1:], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        loss = -F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            n = delta.norm()
            if n > bound:
                delta.mul_(bound / n)
    return delta.detach()


def implicit_hypergradient(
    params: list[torch.Tensor],
    delta: torch.Tensor,
    inner_loss: Callable[[torch.Tensor], torch.Tensor],
    outer_loss: Callable[[torch.Tensor], torch.Tensor],
    inner_lr: float,
    k: int,
) -> list[torch.Tensor]:
    """d outer_loss(delta*(theta), theta) / d theta at the inner solution `delta`, where delta* is a
    fixed point of ``Phi(d) = d + inner_lr * grad_d inner_loss(d)``; the implicit term is the
    K-term Neumann series of ``(I - d_delta Phi)^-1``."""
    delta = delta.clone().requires_grad_(True)
    grads = torch.autograd.grad(outer_loss(delta), params + [delta], allow_unused=True)
    direct, g_delta = grads[:-1], grads[-1]
    (g_inner,) = torch.autograd.grad(inner_loss(delta), delta, create_graph=True)
    phi = delta + inner_lr * g_inner
    v, acc = g_delta, g_delta
    for _ in range(k):
        (v,) = torch.autograd.grad(phi, delta, grad_outputs=v, retain_graph=True)
        acc = acc + v
    implicit = torch.autograd.grad(phi, params, grad_outputs=acc, allow_unused=True)
    return [
        (d if d is not None else torch.zeros_like(p)) + (i if i is not None else torch.zeros_like(p))
        for d, i, p in zip(direct, implicit, params, strict=True)
    ]


def ibau(model: nn.Module, clean: CleanSet, s: FinetuneSettings, inner_steps: int = 5,
         inner_lr: float = 0.1, bound: float = 10.0, k: int = 5, outer_lr: float = 0.001) -> nn.Module:
    """Run `s.steps` unlearning steps (one inner maximisation + one implicit outer update each)."""
    work = fresh_copy(model).eval()  # fixed norm statistics, as I-BAU runs the model in eval mode
    params = [p for p in work.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=outer_lr)
    sampler = BatchSampler(clean.x, clean.y, s.batch_size, s.seed, augment=False)
    for _ in range(s.steps):
        x, y = sampler()
        delta = _inner_max(work, x, y, inner_steps, inner_lr, bound)

        def inner(d: torch.Tensor, x=x, y=y) -> torch.Tensor:
            return F.cross_entropy(work((x + d).clamp(0, 1)), y)

        def outer(d: torch.Tensor, x=x, y=y) -> torch.Tensor:
            # unlearn: perturbed images keep their true labels; the clean term keeps clean accuracy
            return 0.5 * (F.cross_entropy(work((x + d).clamp(0, 1)), y) + F.cross_entropy(work(x), y))

        grads = implicit_hypergradient(params, delta, inner, outer, inner_lr, k)
        opt.zero_grad()
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
    return work.eval()
