"""The CPU layout guard (fip.kernels) against oneDNN's AVX2 weight-gradient heap corruption."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from fip.kernels import guard_cpu_convolutions
from fip.models import ModelSpec, build_model
from fip.purify import PurifyConfig, prepare_model

pytestmark = pytest.mark.numerics  # figures from the CPU's kernels: `make test-avx2` runs them again

# the bisected case (docs/stack-notes.md): dW of a 1x1 stride-2 conv on a channels-last input with 4 channels;
# on oneDNN's AVX2 path with one thread this aborts the process within a few iterations when unguarded
CASE = """
import sys, torch, torch.nn.functional as F
from torch import nn
torch.set_num_threads(1)
from fip.kernels import guard_cpu_convolutions
from fip.spectral import SpectralShift
conv = guard_cpu_convolutions(nn.Conv2d(4, 8, 1, stride=2, bias=False))
if sys.argv[1] == "spectral":  # Fast FIP's form of the layer
    conv = SpectralShift(conv)
x = torch.rand(16, 8, 8, 4, generator=torch.Generator().manual_seed(0)).permute(0, 3, 1, 2)  # channels-last memory
for _ in range(200):
    torch.autograd.grad(conv(x).sum(), [p for p in conv.parameters() if p.requires_grad])
print("ok")
"""


def _inputs_seen(model: nn.Module) -> list[torch.Tensor]:
    seen = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))  # runs after the guard's
    return seen


def test_every_convolution_gets_its_cpu_input_in_the_default_layout():
    spec = ModelSpec("preactresnet18", num_classes=10, in_channels=1, image_size=8, width=0.0625)
    model = prepare_model(build_model(spec), PurifyConfig())  # a deep copy keeps the guard
    seen = _inputs_seen(model)
    x = torch.rand(4, 8, 8, 1).permute(0, 3, 1, 2)  # one channel sliced from (N, H, W, 1): channels-last strides
    assert x.is_contiguous(memory_format=torch.channels_last) and x.stride(1) == 1
    model(x)
    assert len(seen) == 20 and all(t.is_contiguous() for t in seen)


def test_guard_leaves_contiguous_inputs_and_other_modules_alone():
    model = guard_cpu_convolutions(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(36, 2)))
    guard_cpu_convolutions(model)  # twice: still one hook
    assert len(model[0]._forward_pre_hooks) == 1 and not model[2]._forward_pre_hooks
    x = torch.rand(2, 3, 5, 5)
    assert torch.equal(model(x), model(x.contiguous(memory_format=torch.channels_last)))


@pytest.mark.parametrize("form", ["conv", "spectral"])
def test_guarded_weight_gradient_survives_the_avx2_path(form):
    """Run in a subprocess on oneDNN's AVX2 path: unguarded, this aborts (heap corruption)."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, "-c", CASE, form], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_batch_norm_guard_gives_the_gradients_of_a_token_layout_batch_of_one():
    """BatchNorm2d (eval) whose output is flattened into tokens: the bias gradient is the sum of the output
    gradient over positions, whatever layout that gradient arrives in."""
    from fip.kernels import guard_cpu_batch_norm

    torch.manual_seed(0)
    bn = guard_cpu_batch_norm(nn.BatchNorm2d(8)).eval()
    for n in (1, 3):
        bn.zero_grad()
        x = torch.rand(n, 8, 4, 4, requires_grad=True)
        w = torch.randn(n, 16, 8)
        (bn(x).flatten(2).transpose(1, 2) * w).sum().backward()
        assert torch.allclose(bn.bias.grad, w.sum((0, 1)), atol=1e-5)
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        assert torch.allclose(x.grad, (w.transpose(1, 2).reshape(n, 8, 4, 4) * scale.view(1, -1, 1, 1)), atol=1e-5)
