"""The model's input side: what a model does to ``[0, 1]`` images before its first layer.

Data, triggers and probes all live in ``[0, 1]`` at the data's own geometry. Two things a model may need
on top travel with the model, recorded in its metadata, and are applied by the model itself (forward
pre-hooks, so parameter names stay the architecture's and ``deepcopy`` copies them):

- ``input_adapter``: the data holds ``(C, H, W)`` images and the network takes another geometry (a gray
  Fashion-MNIST image for a 3-channel torchvision ResNet, 28 px for a ViT built for 32). A one-channel
  image is repeated over the network's channels and the image is resized bilinearly to its size.
- ``input_normalization``: per-channel ``(x - mean) / std`` with the network's channels (ImageNet's for
  torchvision, a timm model's ``pretrained_cfg``, an HF preprocessor's).

:func:`attach_inputs` puts both on a model, adapter first; :func:`data_shape` is the image shape the
model then takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NORMALIZATION_KEY = "input_normalization"
ADAPTER_KEY = "input_adapter"


class InputSpecError(ValueError):
    """A recorded or requested normalisation or input adapter is malformed or cannot fit the model."""


# ---------------------------------------------------------------- normalisation
@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` that a model expects on ``[0, 1]`` inputs."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise InputSpecError(f"normalisation needs one mean and one std per channel, got {self.mean} and {self.std}")
        if any(not s > 0 for s in self.std):
            raise InputSpecError(f"normalisation std must be > 0, got {self.std}")

    def to_metadata(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_metadata(cls, meta: dict | None) -> Normalization | None:
        """The normalisation recorded in a model's metadata (``input_normalization``), if any."""
        entry = (meta or {}).get(NORMALIZATION_KEY)
        if not entry:
            return None
        try:
            return cls(tuple(float(v) for v in entry["mean"]), tuple(float(v) for v in entry["std"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InputSpecError(f"model metadata {NORMALIZATION_KEY!r} is malformed: {entry!r} ({e})") from e

    @classmethod
    def parse(cls, text: str) -> Normalization:
        """``imagenet``, or ``MEAN/STD`` with comma-separated values (``0.5/0.25``, ``0.49,0.48,0.45/0.25,0.24,0.26``)."""
        if text.strip().lower() == "imagenet":
            return IMAGENET_NORMALIZATION
        mean, sep, std = text.partition("/")
        try:
            if not sep:
                raise ValueError("expected MEAN/STD")
            return cls(tuple(float(v) for v in mean.split(",")), tuple(float(v) for v in std.split(",")))
        except ValueError as e:
            raise InputSpecError(f"normalisation {text!r}: {e}; expected auto, off, imagenet or MEAN/STD with "
                                 "comma-separated values, e.g. 0.5,0.5,0.5/0.25,0.25,0.25") from e

    def for_channels(self, channels: int) -> Normalization:
        """One value repeated over `channels`; otherwise the channel counts must agree."""
        if len(self.mean) == channels:
            return self
        if len(self.mean) == 1:
            return Normalization(self.mean * channels, self.std * channels)
        raise InputSpecError(f"normalisation has {len(self.mean)} channels but the model takes {channels}")


IMAGENET_NORMALIZATION = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class _NormalizeInput:
    """Forward pre-hook: normalises the first input on whatever device and dtype it arrives in."""

    def __init__(self, norm: Normalization) -> None:
        self.mean = torch.tensor(norm.mean).view(-1, 1, 1)
        self.std = torch.tensor(norm.std).view(-1, 1, 1)

    def __call__(self, module: nn.Module, args: tuple):
        x = args[0]
        return ((x - self.mean.to(device=x.device, dtype=x.dtype)) / self.std.to(device=x.device, dtype=x.dtype),
                *args[1:])


# ---------------------------------------------------------------- geometry
@dataclass(frozen=True)
class InputAdapter:
    """The data's image shape ``(C, H, W)`` that a model with another input geometry takes: one channel is
    repeated over the network's channels, and the image resized bilinearly to the network's size."""

    data_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        shape = tuple(self.data_shape)
        if len(shape) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape):
            raise InputSpecError(f"input adapter: the data shape must be three positive integers C,H,W, got {shape!r}")
        object.__setattr__(self, "data_shape", shape)

    def check(self, network_shape: Sequence[int]) -> None:
        """Refuse channels that cannot be adapted (3 to 1, 2 to 3): only gray widens."""
        c, net_c = self.data_shape[0], int(network_shape[0])
        if c not in (1, net_c):
            raise InputSpecError(f"data with {c} channels cannot feed a model that takes {net_c}: only one channel "
                                 "(gray) is repeated to the model's channels")

    def to_metadata(self) -> dict:
        return {"data_shape": list(self.data_shape)}

    @classmethod
    def from_metadata(cls, meta: dict | None) -> InputAdapter | None:
        entry = (meta or {}).get(ADAPTER_KEY)
        if not entry:
            return None
        try:
            return cls(tuple(entry["data_shape"]))
        except (KeyError, TypeError) as e:
            raise InputSpecError(f"model metadata {ADAPTER_KEY!r} is malformed: {entry!r} ({e})") from e

    @classmethod
    def parse(cls, text: str) -> InputAdapter:
        """``C,H,W`` (``1,28,28``)."""
        try:
            return cls(tuple(int(v) for v in text.split(",")))
        except ValueError as e:
            raise InputSpecError(f"data shape {text!r}: expected C,H,W, e.g. 1,28,28") from e


class _AdaptInput:
    """Forward pre-hook: gray repeated to `channels`, then a bilinear resize to `size` x `size`."""

    def __init__(self, channels: int, size: int) -> None:
        self.channels, self.size = channels, size

    def __call__(self, module: nn.Module, args: tuple):
        x = args[0]
        if x.shape[-3] == 1 and self.channels > 1:
            x = x.expand(*x.shape[:-3], self.channels, *x.shape[-2:])
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x, *args[1:])


# ---------------------------------------------------------------- the model's whole input side
def data_shape(network_shape: Sequence[int], metadata: dict | None) -> tuple[int, int, int]:
    """The ``(C, H, W)`` images a model with these metadata takes: the adapter's, else the network's own."""
    adapter = InputAdapter.from_metadata(metadata)
    return adapter.data_shape if adapter else tuple(int(v) for v in network_shape)


def attach_inputs(model: nn.Module, network_shape: Sequence[int], metadata: dict | None) -> nn.Module:
    """Make `model` take ``[0, 1]`` images as its data holds them: the recorded input adapter, then the recorded
    normalisation (with the network's channels), as forward pre-hooks; returns the model."""
    channels, size = int(network_shape[0]), int(network_shape[-1])
    adapter = InputAdapter.from_metadata(metadata)
    if adapter is not None:
        adapter.check(network_shape)
        if tuple(adapter.data_shape) != tuple(network_shape):
            model.register_forward_pre_hook(_AdaptInput(channels, size))
    norm = Normalization.from_metadata(metadata)
    if norm is not None:
        model.register_forward_pre_hook(_NormalizeInput(norm.for_channels(channels)))
    return model


def without_input_hooks(model: nn.Module) -> nn.Module:
    """`model` (changed in place) without the pre-hooks :func:`attach_inputs` added: for a tool that prepares the
    network's input itself (a Hugging Face pipeline's image processor)."""
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, _AdaptInput | _NormalizeInput):
            del model._forward_pre_hooks[key]
    return model
