"""Per-sample image transforms for the shard readers, and the model side of the input path; torch and
PIL only (torchvision is not a dependency).

Shards hold images of any size (a source JPEG kept as it is, or a lossless PNG). A
:class:`Transform` turns one stored image into a fixed-size ``uint8`` tensor ``(C, S, S)``:

- ``keep``: decode only (shards whose images already share the model's size: the lab's sets);
- ``eval``: resize the shorter side to ``resize`` (``S / 0.875``: 256 for 224), centre crop ``S``;
- ``train``: random-resized crop (area share in ``scale``, aspect ratio in ``ratio``) to ``S``,
  then a random horizontal flip.

Readers run them in DataLoader worker processes, so decoding overlaps with the model's work. A
batch leaves the workers as ``uint8`` (a quarter of the bytes of float32 through pinned memory)
and becomes float in ``[0, 1]`` on the model's device (:func:`batch_to_device`). Triggers are
defined in that ``[0, 1]`` space, so a model's input normalisation (mean/std) is not a transform:
it travels with the model (:mod:`fip.inputs`, recorded in its sidecar metadata).
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

EVAL_CROP_FRACTION = 0.875  # centre crop over resize: 224 of 256, the usual ImageNet evaluation
TRANSFORM_KEY = "input_transforms"

Mode = Literal["keep", "eval", "train"]


class ImageDecodeError(ValueError):
    """Stored bytes are not a decodable image."""


def decode(data: bytes, channels: int, draft_to: tuple[int, int] | None = None, exact: bool = False):
    """A PIL image in ``L`` (one channel) or ``RGB`` from encoded bytes.

    `exact`: the stored image must already have what `channels` says (grey may still widen to RGB);
    a colour image read as grey is refused rather than converted (shards stored at the model's size,
    whose manifest states what they hold).

    `draft_to`: for JPEG, let the decoder scale down by 1/2, 1/4 or 1/8 in the DCT while the result
    stays at least this large (much cheaper than decoding full size and resizing afterwards)."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        mode, colour = im.mode, len(im.getbands()) >= 3  # a palette image has one band
        if draft_to is not None and im.format == "JPEG":
            im.draft("RGB" if channels == 3 else "L", draft_to)
        converted = im.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"not a decodable image ({e})") from e
    if exact and channels == 1 and colour:
        raise ImageDecodeError(f"a {mode} colour image where 1 channel (grey) is expected")
    return converted


def to_tensor(im) -> torch.Tensor:
    """A PIL image as a ``uint8`` tensor ``(C, H, W)``."""
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy((arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)).copy())


def random_resized_crop_box(width: int, height: int, g: torch.Generator, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop covering a random share of the area (in `scale`) with a
    random aspect ratio (log-uniform in `ratio`); ten tries, then the largest centred crop whose
    aspect ratio is within `ratio`."""
    area = width * height
    u = torch.rand(10, 4, generator=g).tolist()
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for a, r, t, s in u:
        target = area * (scale[0] + a * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + r * (log_hi - log_lo))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(s * (width - w + 1)) if w < width else 0
            top = int(t * (height - h + 1)) if h < height else 0
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int, resize: int, size: int) -> tuple[float, float, float, float]:
    """The source region that becomes a ``size`` centre crop after the shorter side is resized to
    ``resize``: one resampling step instead of a resize followed by a crop."""
    scale = resize / min(width, height)
    crop_w, crop_h = min(size / scale, width), min(size / scale, height)
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return left, top, left + crop_w, top + crop_h


@dataclass(frozen=True)
class Transform:
    """Stored image bytes -> ``uint8`` ``(C, size, size)`` (``keep``: the stored size)."""

    mode: Mode = "keep"
    size: int = 224
    resize: int | None = None  # eval: the shorter side before the centre crop (None: size / 0.875)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    draft: bool = True  # eval: JPEG DCT-domain downscaling while the image stays >= the resize target

    def __post_init__(self) -> None:
        if self.mode not in ("keep", "eval", "train"):
            raise ValueError(f"unknown transform mode {self.mode!r}; expected 'keep', 'eval' or 'train'")
        if self.size < 1:
            raise ValueError(f"transform size must be >= 1, got {self.size}")
        if self.resize is not None and self.resize < self.size:
            raise ValueError(f"resize {self.resize} must be >= the crop size {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"crop area scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"crop aspect ratio range must satisfy 0 < lo <= hi, got {self.ratio}")

    @property
    def resize_to(self) -> int:
        return self.resize or int(round(self.size / EVAL_CROP_FRACTION))

    @property
    def random(self) -> bool:
        return self.mode == "train"

    def __call__(self, data: bytes, channels: int, g: torch.Generator | None = None) -> torch.Tensor:
        from PIL import Image

        if self.mode == "keep":
            return to_tensor(decode(data, channels, exact=True))
        if self.mode == "eval":
            im = decode(data, channels, self._draft_target(data) if self.draft else None)
            box = center_crop_box(im.width, im.height, self.resize_to, self.size)
            return to_tensor(im.resize((self.size, self.size), Image.BILINEAR, box=box))
        if g is None:
            raise ValueError("the train transform is random: pass a generator")
        im = decode(data, channels)
        box = random_resized_crop_box(im.width, im.height, g, self.scale, self.ratio)
        im = im.resize((self.size, self.size), Image.BILINEAR, box=box)
        if self.flip and float(torch.rand(1, generator=g)) < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(im)

    def _draft_target(self, data: bytes) -> tuple[int, int] | None:
        """The size the image would have after the eval resize (the decoder keeps at least that)."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except Exception:  # decode() reports it with the reason
            return None
        scale = self.resize_to / min(w, h)
        return (math.ceil(w * scale), math.ceil(h * scale)) if scale < 1 else None

    def describe(self) -> dict:
        """What a model's sidecar records about how its inputs were prepared."""
        d = asdict(self)
        if self.mode == "eval":
            d["resize"] = self.resize_to
        return d


KEEP = Transform("keep")


def eval_transform(size: int = 224, resize: int | None = None) -> Transform:
    return Transform("eval", size, resize)


def train_transform(size: int = 224, scale=(0.08, 1.0)) -> Transform:
    return Transform("train", size, scale=tuple(scale))


# ---------------------------------------------------------------- batches on the device
TOKEN_DTYPES = (torch.int64, torch.int32)  # a language model's token ids (images are uint8 or float)


def model_input(x: torch.Tensor) -> torch.Tensor:
    """What a model takes from a stored batch: uint8 images as float ``[0, 1]``, token ids as they are."""
    if x.dtype in TOKEN_DTYPES:
        return x
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def batch_to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A loader batch on `device` as the model takes it (:func:`model_input`): uint8 crosses to the GPU
    (asynchronously from pinned memory) and is converted there, channels-last on CUDA. On the CPU image
    values are exactly ``x.float() / 255`` in the default layout."""
    device = torch.device(device)
    if device.type != "cuda" or x.dtype in TOKEN_DTYPES:
        return model_input(x.to(device, non_blocking=device.type == "cuda"))
    x = x.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def prepare_for_device(model: nn.Module, device: torch.device | str) -> nn.Module:
    """The model on `device`; channels-last on CUDA (tensor-core convolutions), unchanged on the CPU."""
    device = torch.device(device)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def mixed_precision(device: torch.device | str):
    """bf16 autocast on CUDA; on the CPU nothing changes (fp32, as every CPU result here is measured)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
