"""Fast FIP: the singular-value-shift form is exact at delta = 0, trains only shifts, and folds back."""

import pytest
import torch
from torch import nn

from fip.models import ModelSpec, build_model
from fip.spectral import SpectralShift, count_trainable, fold_spectral_shift, to_spectral_shift

pytestmark = pytest.mark.numerics  # figures from the CPU's kernels: `make test-avx2` runs them again


def _spec(arch):
    return ModelSpec(arch, num_classes=10, in_channels=3, image_size=16, width=0.125)


def test_outputs_unchanged_at_zero_shift_and_only_shifts_train():
    for arch in ("preactresnet18", "vgg11", "vit-small"):
        torch.manual_seed(0)
        model = build_model(_spec(arch)).eval()
        x = torch.randn(4, 3, 16, 16)
        before = model(x)
        to_spectral_shift(model)
        assert (model(x) - before).abs().max() < 1e-5, arch
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(n.endswith(".delta") for n in trainable), arch
        layers = [m for m in model.modules() if isinstance(m, SpectralShift)]
        assert count_trainable(model) == sum(m.s.numel() for m in layers)


def test_shift_changes_singular_values_and_folds_back_to_stock_architecture():
    torch.manual_seed(1)
    spec = _spec("preactresnet18")
    model = build_model(spec).eval()
    x = torch.randn(3, 3, 16, 16)
    to_spectral_shift(model)
    layer = model.layer2[0].conv1
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SpectralShift):
                m.delta.copy_(0.05 * torch.randn_like(m.delta))
    # W' has exactly the singular values relu(s + delta)
    w = layer.shifted_weight().reshape(layer.s.numel() if False else layer.U.shape[0], -1)
    expected = torch.relu(layer.s + layer.delta).sort(descending=True).values
    assert torch.allclose(torch.linalg.svdvals(w.double()).float(), expected, atol=1e-4)
    shifted_out = model(x)
    fold_spectral_shift(model)
    assert not any(isinstance(m, SpectralShift) for m in model.modules())
    assert (model(x) - shifted_out).abs().max() < 1e-5
    stock = build_model(spec)
    assert stock.state_dict().keys() == model.state_dict().keys()
    stock.load_state_dict(model.state_dict())
    assert (stock.eval()(x) - shifted_out).abs().max() < 1e-5


def test_gradients_reach_only_the_shifts():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    to_spectral_shift(model)
    out = model(torch.randn(2, 2, 6, 6)).sum()
    out.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.endswith("delta"), name
