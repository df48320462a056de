"""The model's input side (fip.inputs): normalisation and the input adapter, against direct computations."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fip.inputs import (
    ADAPTER_KEY,
    IMAGENET_NORMALIZATION,
    NORMALIZATION_KEY,
    InputAdapter,
    InputSpecError,
    Normalization,
    attach_inputs,
    data_shape,
)


def _net(channels: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 4, 3), nn.Flatten(), nn.LazyLinear(2))


def test_normalization_hook_survives_deepcopy_and_metadata():
    net = _net(3)
    x = torch.rand(5, 3, 8, 8)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_NORMALIZATION.mean, IMAGENET_NORMALIZATION.std))
    expected = net((x - mean) / std)
    meta = {NORMALIZATION_KEY: IMAGENET_NORMALIZATION.to_metadata()}
    attach_inputs(net, (3, 8, 8), meta)
    assert torch.allclose(net(x), expected, atol=1e-6)
    assert torch.allclose(copy.deepcopy(net)(x), expected, atol=1e-6)
    assert list(net.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]  # names unchanged
    assert Normalization.from_metadata(meta) == IMAGENET_NORMALIZATION
    assert Normalization.from_metadata({}) is None and Normalization.from_metadata({NORMALIZATION_KEY: None}) is None
    with pytest.raises(ValueError, match="malformed"):
        Normalization.from_metadata({NORMALIZATION_KEY: {"mean": [0.5]}})
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalization((0.5,), (0.0,))


def test_normalization_parses_the_flag_forms():
    assert Normalization.parse("imagenet") == IMAGENET_NORMALIZATION
    assert Normalization.parse("0.5/0.25").for_channels(3) == Normalization((0.5,) * 3, (0.25,) * 3)
    assert Normalization.parse("0.1,0.2,0.3/1,2,3") == Normalization((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    for bad in ("0.5", "a/b", "0.5,0.5/0.1"):
        with pytest.raises(InputSpecError, match="expected auto, off, imagenet or MEAN/STD"):
            Normalization.parse(bad)
    with pytest.raises(InputSpecError, match="has 2 channels but the model takes 3"):
        Normalization((0.1, 0.2), (1.0, 1.0)).for_channels(3)


def test_the_adapter_repeats_gray_and_resizes_as_pil_does():
    """Gray 28 px to a 3-channel 32 px network: each channel is the gray image resized bilinearly, which PIL's
    bilinear resize (an independent implementation, no antialiasing needed when enlarging) computes too."""
    net = _net(3)
    gray = torch.rand(2, 1, 28, 28)
    meta = {ADAPTER_KEY: InputAdapter((1, 28, 28)).to_metadata(), NORMALIZATION_KEY: {"mean": [0.5], "std": [0.25]}}
    resized = torch.stack([torch.from_numpy(np.array(Image.fromarray(g[0].numpy(), mode="F").resize(
        (32, 32), Image.BILINEAR))) for g in gray])[:, None]
    expected = net((resized.expand(-1, 3, -1, -1) - 0.5) / 0.25)
    attach_inputs(net, (3, 32, 32), meta)
    assert torch.allclose(net(gray), expected, atol=1e-4)
    assert data_shape((3, 32, 32), meta) == (1, 28, 28) and data_shape((3, 32, 32), {}) == (3, 32, 32)


def test_the_adapter_refuses_what_it_cannot_adapt():
    with pytest.raises(InputSpecError, match="only one channel"):
        attach_inputs(_net(1), (1, 8, 8), {ADAPTER_KEY: {"data_shape": [3, 8, 8]}})
    with pytest.raises(InputSpecError, match="three positive integers"):
        InputAdapter.from_metadata({ADAPTER_KEY: {"data_shape": [1, 28]}})
    with pytest.raises(InputSpecError, match="expected C,H,W"):
        InputAdapter.parse("1x28x28")
