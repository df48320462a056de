"""Transforms to a fixed size: stated shapes and statistics, seeded randomness, and the model side
(normalisation hook, device batches)."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fip.training import generator
from pipeline.transforms import (
    Transform,
    batch_to_device,
    center_crop_box,
    eval_transform,
    random_resized_crop_box,
    train_transform,
)


def encode(arr: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("h,w", [(375, 500), (500, 333), (224, 224), (120, 90), (1024, 768)])
def test_eval_and_train_give_the_stated_shape(h, w):
    data = encode(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    for t in (eval_transform(224), train_transform(224)):
        out = t(data, 3, generator(0, "t"))
        assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
    grey = eval_transform(32)(data, 1)
    assert grey.shape == (1, 32, 32)


def test_eval_is_resize_then_centre_crop():
    # a wide image: left third red, middle third green, right third blue
    arr = np.zeros((200, 600, 3), dtype=np.uint8)
    arr[:, :200, 0], arr[:, 200:400, 1], arr[:, 400:, 2] = 255, 255, 255
    out = eval_transform(64, resize=64)(encode(arr, "PNG"), 3)
    # the centre crop of the resized image (64 x 192) is its middle 64 columns: green only
    assert out[1].float().mean() > 250 and out[0].float().mean() < 5 and out[2].float().mean() < 5
    # the same as resizing the whole image and cropping, within interpolation error
    ref = np.asarray(Image.fromarray(arr).resize((192, 64), Image.BILINEAR))[:, 64:128].transpose(2, 0, 1)
    assert np.abs(out.numpy().astype(int) - ref.astype(int)).mean() < 2
    assert center_crop_box(600, 200, 256, 224) == pytest.approx((300 - 87.5, 12.5, 300 + 87.5, 187.5))  # 224 / (256 / 200) = 175 wide


def test_constant_image_keeps_its_colour_and_jpeg_draft_stays_close():
    arr = np.full((900, 1200, 3), (200, 100, 50), dtype=np.uint8)
    data = encode(arr)
    for t in (eval_transform(224), train_transform(224)):
        out = t(data, 3, generator(1, "c")).float()
        assert torch.allclose(out.mean((1, 2)), torch.tensor([200.0, 100.0, 50.0]), atol=2)
    rng = np.random.default_rng(3)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).resize((1200, 900)))
    data = encode(smooth)
    drafted = eval_transform(224)(data, 3).float()
    full = Transform("eval", 224, draft=False)(data, 3).float()
    assert (drafted - full).abs().mean() < 3  # DCT-domain downscaling changes pixels only slightly


def test_random_resized_crop_statistics():
    g = generator(0, "rrc")
    areas, aspects = [], []
    for _ in range(2000):
        left, top, right, bottom = random_resized_crop_box(1000, 1000, g)
        assert 0 <= left < right <= 1000 and 0 <= top < bottom <= 1000
        w, h = right - left, bottom - top
        areas.append(w * h / 1e6)
        aspects.append(w / h)
    areas, aspects = np.array(areas), np.array(aspects)
    assert areas.min() >= 0.08 - 0.005 and areas.max() <= 1.0
    assert aspects.min() >= 3 / 4 - 0.01 and aspects.max() <= 4 / 3 + 0.01
    # the area share is drawn uniformly; below 0.75 no aspect ratio in range is rejected on a square
    # image, so the density there is flat (above it, crops that would not fit are drawn again)
    low, high = ((areas >= 0.08) & (areas < 0.415)).sum(), ((areas >= 0.415) & (areas < 0.75)).sum()
    assert abs(low - high) < 0.12 * (low + high) / 2 and areas.max() > 0.95
    # log aspect ratio uniform and symmetric around 0
    assert abs(np.log(aspects).mean()) < 0.02 and np.log(aspects).std() == pytest.approx(
        (math.log(4 / 3) - math.log(3 / 4)) / math.sqrt(12), rel=0.1)
    # an extreme panorama falls back to the largest centred crop within the ratio range
    assert random_resized_crop_box(4000, 100, generator(0, "p"), scale=(0.9, 1.0)) == (1933, 0, 2066, 100)  # 133 = 100 * 4/3 wide


def test_train_flips_half_the_time_and_is_seeded():
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:, :32] = 255  # left half white
    data = encode(arr, "PNG")
    t = Transform("train", 32, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the whole image: only the flip varies
    flipped = sum(int(t(data, 3, generator(0, "flip", i))[0, :, 0].float().mean() < 128) for i in range(400))
    assert 160 < flipped < 240
    a = train_transform(48)(data, 3, generator(5, "same"))
    b = train_transform(48)(data, 3, generator(5, "same"))
    c = train_transform(48)(data, 3, generator(6, "same"))
    assert torch.equal(a, b) and a.shape == c.shape
    with pytest.raises(ValueError, match="pass a generator"):
        train_transform(48)(data, 3)


def test_bad_settings_and_bytes_are_named():
    with pytest.raises(ValueError, match="resize 100 must be >= the crop size 224"):
        Transform("eval", 224, resize=100)
    with pytest.raises(ValueError, match="unknown transform mode"):
        Transform("zoom")
    from pipeline.transforms import ImageDecodeError

    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        eval_transform(8)(b"no image here", 3)


def test_cpu_batches_are_exactly_the_float_images():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    out = batch_to_device(x, "cpu")
    assert out.dtype == torch.float32 and torch.equal(out, x.float() / 255.0)
    assert out.is_contiguous()  # no channels-last on the CPU
