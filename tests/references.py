"""Independent reference computations that several tests compare the method against."""

import torch
import torch.nn.functional as F
from torch import nn


def loop_squared_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sum over samples of squared per-sample gradients of the cross-entropy: one ordinary backward per
    sample (the model's own kernels, no vmap), in eval mode."""
    model.eval()
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                total[n] += p.grad.double() ** 2
    return total


def relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors of `b` (a dict of tensors read as one vector)."""
    num = sum(float((a[k] - b[k]).detach().double().pow(2).sum()) for k in b) ** 0.5
    den = sum(float(b[k].detach().double().pow(2).sum()) for k in b) ** 0.5
    return num / den
