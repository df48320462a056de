import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


@pytest.fixture
def tiny_spec():
    from fip.models import ModelSpec

    return ModelSpec("preactresnet18", num_classes=10, in_channels=1, image_size=8, width=0.0625)
