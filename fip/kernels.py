"""Guards against two CPU kernel bugs (convolution weight gradients on channels-last inputs; BatchNorm's
backward on a batch of one, :func:`guard_cpu_batch_norm`), and the attention kernel that FIP's second
derivatives need (:func:`differentiable_attention`).

The first: oneDNN's convolution weight gradient on channels-last inputs.

With torch 2.13.0 (oneDNN v3.12) on a CPU whose oneDNN code path is AVX2 (no AVX-512, or
``ONEDNN_MAX_CPU_ISA=AVX2``), one intra-op thread, the weight gradient of a 1x1 stride-2 convolution
whose input is channels-last (NHWC) with 1 to 6 input channels writes outside its buffers: the heap is
corrupted and the process aborts later (``corrupted double-linked list``, ``free(): invalid pointer``) or,
worse, goes on with wrong numbers. Every backward pass is exposed (training, the Fisher, FIP's
``Tr(F)`` penalty, Hessian-vector products); channels-last inputs arise on their own, e.g. a
one-channel batch sliced from ``(N, H, W, 1)`` memory. docs/stack-notes.md has the reproduction and
the measured cost.

:func:`guard_cpu_convolutions` hands every convolution of a model its CPU input in the default
(NCHW) layout, where the bug does not occur; on a GPU channels-last stays as it is (it is what tensor
cores want). The copy happens only for an input that is not already contiguous.
"""

from __future__ import annotations

import torch
from torch import nn

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_GUARDED = "_fip_cpu_layout_guard"


def cpu_default_layout(x: torch.Tensor) -> torch.Tensor:
    """`x` in the default contiguous layout when it lives on the CPU; unchanged elsewhere or if already so."""
    if x.device.type == "cpu" and not x.is_contiguous():
        return x.contiguous()
    return x


def _pre_hook(module: nn.Module, args: tuple) -> tuple:
    return (cpu_default_layout(args[0]), *args[1:]) if args and isinstance(args[0], torch.Tensor) else args


def guard_cpu_convolutions(model: nn.Module) -> nn.Module:
    """Register the layout guard on each convolution of `model` (once; it survives ``copy.deepcopy``)."""
    for module in model.modules():
        if isinstance(module, CONVOLUTIONS) and not getattr(module, _GUARDED, False):
            module.register_forward_pre_hook(_pre_hook)
            setattr(module, _GUARDED, True)
    return model


# ---------------------------------------------------------------- BatchNorm's backward on a batch of one
_BN_GUARDED = "_fip_cpu_bn_grad_guard"


def _contiguous_grad(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous() if grad.device.type == "cpu" and not grad.is_contiguous() else grad


def _bn_post_hook(module: nn.Module, args: tuple, output):
    if isinstance(output, torch.Tensor) and output.requires_grad and output.device.type == "cpu":
        output.register_hook(_contiguous_grad)
    return output


def guard_cpu_batch_norm(model: nn.Module) -> nn.Module:
    """Hand every BatchNorm2d of `model` its CPU output gradient in the default layout.

    With torch 2.13.0 on the CPU, BatchNorm2d's eval-mode backward on a batch of ONE sample whose output
    gradient is channels-last (it is whenever the output is flattened and transposed into tokens, as a
    convolutional patch embedding before attention does) returns wrong weight, bias and input gradients:
    the kernel reads the gradient as if it were NCHW. Batches of two or more are right. FIP's per-sample
    loop (the fallback where vmap cannot run) differentiates exactly such batches of one.
    docs/stack-notes.md has the reproduction."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and not getattr(module, _BN_GUARDED, False):
            module.register_forward_hook(_bn_post_hook)
            setattr(module, _BN_GUARDED, True)
    return model


def guard_cpu_kernels(model: nn.Module) -> nn.Module:
    """Both CPU guards of this module on `model`: convolution input layout and BatchNorm gradient layout."""
    return guard_cpu_batch_norm(guard_cpu_convolutions(model))


def differentiable_attention():
    """A context in which ``scaled_dot_product_attention`` takes its math (composite) kernel.

    The fused kernels (flash attention on the CPU and on CUDA, memory-efficient attention) have no derivative
    of their backward, so FIP's ``Tr(F)`` penalty, a gradient of a gradient, fails through them
    (``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``); the
    math kernel is built from ordinary differentiable ops and supports double backward, forward-mode AD and
    vmap. Models that call the fused kernel (timm's and Hugging Face's attention, ``nn.MultiheadAttention``)
    need no change."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
