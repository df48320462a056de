import pytest
import torch

from fip.models import ARCHITECTURES, ModelSpec, build_model, classifier_head

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
    assert spec.input_shape == (spec.in_channels, spec.image_size, spec.image_size)
    features = {}
    head = classifier_head(model)
    head.register_forward_hook(lambda m, inp, out: features.setdefault("out", out))
    out = model(torch.randn(2, *spec.input_shape))
    assert out.shape == (2, spec.num_classes)
    # the head is the layer whose output is the model's: the logits come from it unchanged
    assert head.out_features == spec.num_classes and torch.equal(features["out"], out)
    assert spec.arch in ARCHITECTURES


def test_a_model_without_a_linear_layer_has_no_head():
    assert classifier_head(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())) is None


def test_width_scales_parameter_count():
    small = sum(p.numel() for p in build_model(ModelSpec("preactresnet18", width=0.25)).parameters())
    full = sum(p.numel() for p in build_model(ModelSpec("preactresnet18", width=1.0)).parameters())
    assert 11_000_000 < full < 11_300_000  # PreActResNet-18 on CIFAR-10: 11.17M
    assert full / small > 12
