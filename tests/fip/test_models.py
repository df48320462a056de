import pytest
import torch

from fip.models import ARCHITECTURES, ModelSpec, build_model

pytestmark = pytest.mark.numerics  # figures from the CPU's kernels: `make test-avx2` runs them again


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec("preactresnet18", 10, 1, 28, 0.125),
        ModelSpec("preactresnet18", 10, 3, 32, 0.125),
        ModelSpec("resnet50", 5, 3, 224, 0.0625),
        ModelSpec("vgg11", 10, 1, 28, 0.125),
        ModelSpec("vit-small", 10, 3, 32, 0.5),
    ],
)
def test_every_architecture_builds_and_classifies(spec):
    model = build_model(spec).eval()
    out = model(torch.randn(2, spec.in_channels, spec.image_size, spec.image_size))
    assert out.shape == (2, spec.num_classes)
    assert spec.arch in ARCHITECTURES


def test_width_scales_parameter_count():
    small = sum(p.numel() for p in build_model(ModelSpec("preactresnet18", width=0.25)).parameters())
    full = sum(p.numel() for p in build_model(ModelSpec("preactresnet18", width=1.0)).parameters())
    assert 11_000_000 < full < 11_300_000  # PreActResNet-18 on CIFAR-10: 11.17M
    assert full / small > 12
