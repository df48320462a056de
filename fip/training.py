"""What every fine-tuning loop on `D_val` shares: seeds, batches, augmentation, the lr schedule, the loss.

FIP's loop (:mod:`fip.purify`), the lab's attacker training and the baseline defenses all draw on
these, so none of them depends on another's loop module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import typing

import torch
import torch.nn.functional as F
from torch import nn


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one purpose (``"probe", step, rank``...), drawn from the job's seed.

    Every random stream (batch order, crops, probe signs, sampled labels) takes its seed from
    here, so streams are independent of each other and a resumed run redraws the same numbers.
    """
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed` (no process-wide RNG is touched)."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The plain classification loss on a batch, as a ``(model, x, y)`` loss function."""
    return F.cross_entropy(model(x), y)


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from `base` at step 0 towards 0 at step `total`."""
    return base * 0.5 * (1 + math.cos(math.pi * step / total))


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4, crop_prob: float = 1.0) -> torch.Tensor:
    """Random crop after zero padding (on a `crop_prob` share of the samples), plus random horizontal flip."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    if crop_prob < 1.0:
        keep = torch.rand(b, generator=generator) >= crop_prob
        oy[keep], ox[keep] = pad, pad
    # per-sample slices: the batched advanced-indexing version corrupts the heap on torch 2.13 CPU with 1 thread
    out = torch.stack([padded[i, :, int(oy[i]) : int(oy[i]) + h, int(ox[i]) : int(ox[i]) + w] for i in range(b)])
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


class BatchSampler:
    """Batches drawn with replacement from an in-memory set (images, or a language model's token sequences),
    images optionally augmented; seeded."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0, augment: bool = True,
                 pad: int = 4) -> None:
        if len(x) != len(y):
            raise ValueError(f"clean set has {len(x)} inputs but {len(y)} labels")
        if len(x) == 0:
            raise ValueError("clean set D_val is empty")
        if augment and x.dim() != 4:
            raise ValueError(f"clean images must be (N, C, H, W) to be augmented, got shape {tuple(x.shape)}")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError("clean set D_val holds NaN or infinite pixel values")
        self.x, self.y, self.batch_size, self.augment, self.pad = x, y, batch_size, augment, pad
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, crop_prob: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch; `crop_prob` is the share of it that is cropped (FIP's schedule: ``crop_prob_at``)."""
        idx = torch.randint(0, len(self.x), (self.batch_size,), generator=self.generator)
        x, y = self.x[idx], self.y[idx]
        return (augment_batch(x, self.generator, self.pad, crop_prob) if self.augment else x), y


def check_choices(settings: object) -> None:
    """Raise naming the field when a ``Literal[...]`` field of a dataclass holds another value."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):  # type: ignore[arg-type]
        hint = hints[f.name]
        if typing.get_origin(hint) is typing.Literal and getattr(settings, f.name) not in typing.get_args(hint):
            choices = ", ".join(repr(c) for c in typing.get_args(hint))
            raise ValueError(f"unknown {f.name} {getattr(settings, f.name)!r}; expected one of {choices}")


@dataclasses.dataclass
class SGDSettings:
    """What every SGD loop here shares; the lab's training and the defenses' fine-tuning extend it."""

    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0

    def optimizer(self, params, nesterov: bool = False) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                               nesterov=nesterov)
