"""Fast FIP: tune only a shift of each layer's singular values (docs/paper.md, "Fast FIP").

Each conv kernel (reshaped to ``out x (in*kh*kw)``) or linear weight is decomposed once,
``W = U diag(s) V^T``; the layer then computes with ``W' = U diag(relu(s + delta)) V^T`` where the
shift ``delta`` (zero at the start) is the only trainable tensor. :func:`fold_spectral_shift` writes
``W'`` back into the original layers, so the purified model is the stock architecture again.

Linear, Conv2d and Embedding layers and Hugging Face's ``Conv1D`` (GPT-2's projections, a linear layer
storing ``in x out``) are wrapped (:class:`SpectralShift`); the projection weights that
``nn.MultiheadAttention`` holds as bare Parameters (``in_proj_weight``, or ``q/k/v_proj_weight``) are
shifted through a parametrization (:class:`ShiftedSpectrum`) so the module's own forward reads ``W'``.
A weight that two layers share (a language model's input embedding tied to its output head) is shifted
once: the second layer reads the first one's ``W'``, so the tie holds during tuning and after folding.
Every other weight (position and class tokens held as bare Parameters, Conv1d/3d kernels) is left alone:
:func:`left_alone` names those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fip.kernels import cpu_default_layout

SHIFTABLE = (nn.Conv2d, nn.Linear, nn.Embedding)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2), told by its class without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def shiftable(module: nn.Module) -> bool:
    """Whether Fast FIP wraps `module` (:class:`SpectralShift`)."""
    return isinstance(module, SHIFTABLE) or _is_hf_conv1d(module)
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _register_spectrum(module: nn.Module, weight: torch.Tensor) -> None:
    """Buffers ``U, s, Vh`` of `weight` (as an ``out x rest`` matrix, SVD in float64) and the shift ``delta``."""
    w = weight.detach()
    u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1).double(), full_matrices=False)
    module.register_buffer("U", u.to(w.dtype))
    module.register_buffer("s", s.to(w.dtype))
    module.register_buffer("Vh", vh.to(w.dtype))
    module.delta = nn.Parameter(torch.zeros_like(module.s))


def _shifted(module: nn.Module, shape: torch.Size) -> torch.Tensor:
    return ((module.U * F.relu(module.s + module.delta)) @ module.Vh).reshape(shape)


class SpectralShift(nn.Module):
    """Wraps a Conv2d, Linear, Embedding or HF Conv1D layer: ``W' = U diag(relu(s + delta)) V^T`` with only
    ``delta`` trainable. With `tied_to` (a shift of the same weight Parameter, made for another layer), it has
    no spectrum of its own and reads that shift's ``W'``.

    ``weight`` and ``bias`` read as the shifted layer's, for parent modules that use them directly (an
    ``nn.MultiheadAttention`` reads ``out_proj.weight``)."""

    def __init__(self, layer: nn.Module, tied_to: SpectralShift | None = None) -> None:
        super().__init__()
        if not shiftable(layer):
            raise TypeError(f"spectral shift applies to Conv2d/Linear/Embedding/Conv1D, got {type(layer).__name__}")
        if tied_to is None:
            _register_spectrum(self, layer.weight)
        self._tied = [tied_to] if tied_to is not None else []  # a list: not registered as a submodule
        for p in layer.parameters():
            p.requires_grad_(False)
        self.layer = layer

    def shifted_weight(self) -> torch.Tensor:
        if self._tied:
            return self._tied[0].shifted_weight()
        return _shifted(self, self.layer.weight.shape)

    @property
    def weight(self) -> torch.Tensor:
        return self.shifted_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, layer = self.shifted_weight(), self.layer
        if isinstance(layer, nn.Conv2d):  # the layer's own forward hooks do not run here: guard the input
            return layer._conv_forward(cpu_default_layout(x), w, layer.bias)
        if isinstance(layer, nn.Embedding):
            return F.embedding(x, w, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq,
                               layer.sparse)
        if _is_hf_conv1d(layer):  # y = x W + b with W stored (in, out)
            return torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[1])
        return F.linear(x, w, layer.bias)


class ShiftedSpectrum(nn.Module):
    """The same shift as a parametrization of a bare weight Parameter (``nn.MultiheadAttention``'s
    projections): the module reads ``W'`` wherever it reads the weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        _register_spectrum(self, weight)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return _shifted(self, original.shape)


def _replace(model: nn.Module, fn, skip: tuple[type, ...] = ()) -> nn.Module:
    for name, child in list(model.named_children()):
        new = fn(child)
        if new is not child:
            setattr(model, name, new)
        elif not isinstance(child, skip):
            _replace(child, fn, skip)
    return model


def shift_targets(model: nn.Module) -> list[str]:
    """Names of the weights Fast FIP shifts in the stock `model`: every Linear's, Conv2d's, Embedding's and
    HF Conv1D's, and the projection weights of each ``nn.MultiheadAttention``."""
    names = []
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, nn.MultiheadAttention) and not parametrize.is_parametrized(module):
            names += [dot + n for n in ATTENTION_WEIGHTS if isinstance(getattr(module, n, None), nn.Parameter)]
        elif shiftable(module):
            names.append(dot + "weight")
    return names


def left_alone(model: nn.Module) -> list[str]:
    """Weights (tensors of two or more dimensions) of the stock `model` that Fast FIP does not shift:
    class and position tokens held as bare Parameters, Conv1d/Conv3d kernels. They stay frozen at the suspect's
    values. (A tied weight is listed once, under its first name, as ``named_parameters`` lists it.)"""
    shifted = set(shift_targets(model))
    return [n for n, p in model.named_parameters() if p.ndim >= 2 and n not in shifted]


def to_spectral_shift(model: nn.Module, train_norms: bool = False, train_biases: bool = False) -> nn.Module:
    """Convert `model` in place to the Fast FIP form; every other parameter is frozen.

    `train_norms` / `train_biases` leave norm-layer affine parameters or layer biases trainable
    (off by default, as in the paper).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    shifts: dict[int, SpectralShift] = {}  # id of a weight Parameter -> the shift made for it first

    def wrap(m: nn.Module) -> nn.Module:
        if not shiftable(m):
            return m
        first = shifts.get(id(m.weight))
        shift = SpectralShift(m, tied_to=first)
        shifts.setdefault(id(m.weight), shift)
        return shift

    _replace(model, wrap)
    for module in list(model.modules()):
        # a module parametrized already (weight norm, say) is left alone: its fold could not undo only ours
        if isinstance(module, nn.MultiheadAttention) and not parametrize.is_parametrized(module):
            for name in ATTENTION_WEIGHTS:
                if isinstance(getattr(module, name, None), nn.Parameter):
                    parametrize.register_parametrization(module, name, ShiftedSpectrum(getattr(module, name)),
                                                         unsafe=True)
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

    # every W' first, then the writes: a tied weight's second reader must not see the first write
    shifted = {id(m): m.shifted_weight().detach().clone() for m in model.modules() if isinstance(m, SpectralShift)}

    def fold(m: nn.Module) -> nn.Module:
        if isinstance(m, SpectralShift):
            m.layer.weight.copy_(shifted[id(m)])
            return m.layer
        return m

    _replace(model, fold)
    for module in list(model.modules()):
        if parametrize.is_parametrized(module) and any(
                isinstance(p, ShiftedSpectrum) for plist in module.parametrizations.values() for p in plist):
            _fold_parametrized(module)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _fold_parametrized(module: nn.Module) -> None:
    """Write ``W'`` into plain Parameters of `module` and drop its parametrizations (all of them ours, see
    :func:`to_spectral_shift`). Not ``parametrize.remove_parametrizations``: it deletes the weight's property
    from the module's injected class, which ``copy.deepcopy`` shares between copies, so folding a snapshot
    (``purify``'s evaluations) would break the model being trained."""
    values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
    module.__class__ = module.__class__.__bases__[0]  # this object only; the injected class stays intact
    del module._modules["parametrizations"]
    for name, value in values.items():
        module.register_parameter(name, nn.Parameter(value))


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
