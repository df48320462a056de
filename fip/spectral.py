"""Fast FIP: tune only a shift of each layer's singular values (docs/paper.md, "Fast FIP").

Each conv kernel (reshaped to ``out x (in*kh*kw)``) or linear weight is decomposed once,
``W = U diag(s) V^T``; the layer then computes with ``W' = U diag(relu(s + delta)) V^T`` where the
shift ``delta`` (zero at the start) is the only trainable tensor. :func:`fold_spectral_shift` writes
``W'`` back into the original layers, so the purified model is the stock architecture again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fip.kernels import cpu_default_layout

SHIFTABLE = (nn.Conv2d, nn.Linear)


class SpectralShift(nn.Module):
    """Wraps a Conv2d or Linear layer: ``W' = U diag(relu(s + delta)) V^T`` with only ``delta`` trainable."""

    def __init__(self, layer: nn.Conv2d | nn.Linear) -> None:
        super().__init__()
        if not isinstance(layer, SHIFTABLE):
            raise TypeError(f"spectral shift applies to Conv2d/Linear, got {type(layer).__name__}")
        weight = layer.weight.detach()
        u, s, vh = torch.linalg.svd(weight.reshape(weight.shape[0], -1).double(), full_matrices=False)
        self.register_buffer("U", u.to(weight.dtype))
        self.register_buffer("s", s.to(weight.dtype))
        self.register_buffer("Vh", vh.to(weight.dtype))
        self.delta = nn.Parameter(torch.zeros_like(self.s))
        for p in layer.parameters():
            p.requires_grad_(False)
        self.layer = layer

    def shifted_weight(self) -> torch.Tensor:
        w = (self.U * F.relu(self.s + self.delta)) @ self.Vh
        return w.reshape(self.layer.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.shifted_weight()
        if isinstance(self.layer, nn.Conv2d):  # the layer's own forward hooks do not run here: guard the input
            return self.layer._conv_forward(cpu_default_layout(x), w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)


def _replace(model: nn.Module, fn) -> nn.Module:
    for name, child in list(model.named_children()):
        new = fn(child)
        if new is not child:
            setattr(model, name, new)
        else:
            _replace(child, fn)
    return model


def to_spectral_shift(model: nn.Module, train_norms: bool = False, train_biases: bool = False) -> nn.Module:
    """Convert `model` in place to the Fast FIP form; every other parameter is frozen.

    `train_norms` / `train_biases` leave norm-layer affine parameters or layer biases trainable
    (off by default, as in the paper).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    _replace(model, lambda m: SpectralShift(m) if isinstance(m, SHIFTABLE) else m)
    for module in model.modules():
        if train_norms and isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm):
            for p in module.parameters():
                p.requires_grad_(True)
        if train_biases and isinstance(module, SpectralShift) and module.layer.bias is not None:
            module.layer.bias.requires_grad_(True)
    return model


@torch.no_grad()
def fold_spectral_shift(model: nn.Module) -> nn.Module:
    """Write each ``W'`` into its original layer and unwrap it: the stock architecture, all trainable."""

    def fold(m: nn.Module) -> nn.Module:
        if isinstance(m, SpectralShift):
            m.layer.weight.copy_(m.shifted_weight())
            return m.layer
        return m

    _replace(model, fold)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
