"""The lab's attacker training: augmentation is applied when asked and names its own cached model."""

import pytest
import torch

from fip.models import ModelSpec, build_model
from lab.backdoor import LabConfig
from lab.datasets import ImageSet
from lab.train import TrainConfig, train_classifier

pytestmark = pytest.mark.numerics  # figures from the CPU's kernels: `make test-avx2` runs them again


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 255, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.arange(n) % 4, [str(i) for i in range(4)], "synthetic")


def _trained(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(ModelSpec("preactresnet18", 4, 1, 12, 0.0625))
    train_classifier(model, _data(), cfg)
    return model.state_dict()


def test_augmented_training_sees_other_inputs_than_plain_training():
    plain = TrainConfig(epochs=1, batch_size=32, schedule="constant")
    again, augmented = _trained(plain), _trained(TrainConfig(**{**plain.to_dict(), "augment_pad": 2}))
    reference = _trained(plain)
    assert all(torch.equal(again[k], reference[k]) for k in reference)  # deterministic without augmentation
    assert any(not torch.equal(augmented[k], reference[k]) for k in reference if reference[k].is_floating_point())


def test_augmented_attacker_model_is_cached_under_its_own_name():
    plain, augmented = LabConfig(), LabConfig(train=TrainConfig(epochs=3, augment_pad=4))
    assert not plain.stem.endswith("aug4") and augmented.stem == plain.stem + "-aug4"
