"""Architectures the lab attacks and FIP purifies, looked up by name in one registry.

Every model is built from a :class:`ModelSpec`, which is also what the safetensors sidecar stores,
so a purified model always reloads into the stock architecture it came from. Besides ours, a spec may
name a torchvision, timm or Hugging Face model (``torchvision:resnet18``, ``timm:vit_tiny_patch16_224``,
``hf:<folder>``); :mod:`fip.families` checks and builds those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fip import families
from fip.kernels import guard_cpu_kernels


@dataclass(frozen=True)
class ModelSpec:
    """What it takes to rebuild a model: architecture name (ours, or ``source:name`` for a family model),
    classes, the input geometry the model expects (channels, square image size), width (ours only) and
    options (ours: small integers; families: builder keywords, or an HF folder's config)."""

    arch: str
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    width: float = 1.0
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """A spec comes from untrusted files (sidecar, safetensors header): refuse wrong types and absurd
        sizes here, before anything is allocated for them."""
        if not isinstance(self.arch, str) or not (self.arch in ARCHITECTURES or ":" in self.arch):
            raise ValueError(_unknown_architecture(self.arch))
        for name, lo, hi in (("num_classes", 2, MAX_CLASSES), ("in_channels", 1, MAX_CHANNELS),
                             ("image_size", 1, MAX_IMAGE_SIZE)):
            object.__setattr__(self, name, _bounded_int(name, getattr(self, name), lo, hi))
        w = self.width
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w <= MAX_WIDTH:
            raise ValueError(f"model spec: width must be a number in (0, {MAX_WIDTH}], got {w!r}")
        object.__setattr__(self, "width", float(w))
        if not isinstance(self.options, dict):
            raise ValueError(f"model spec: options must be a mapping, got {type(self.options).__name__}")
        if ":" in self.arch:  # torchvision:/timm:/hf: models check their own options (fip.families)
            families.check_spec(self)
            return
        allowed = ARCH_OPTIONS.get(self.arch, {})
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ValueError(f"model spec: unknown options {unknown} for {self.arch}; "
                             f"allowed: {sorted(allowed) or 'none'}")
        for key, value in self.options.items():
            _bounded_int(f"options.{key}", value, 1, allowed[key])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One input image's shape, (channels, height, width): what the model reads, and what its data must hold."""
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def task(self) -> str:
        """What the model does (:mod:`fip.tasks`): "classification", or "causal-lm" for an ``hf:`` language model."""
        return families.spec_task(self)

    @property
    def source(self) -> str:
        """Where the architecture comes from: "fip" (ours), "torchvision", "timm" or "hf"."""
        return self.arch.partition(":")[0] if ":" in self.arch else "fip"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        if not isinstance(d, dict):
            raise ValueError(f"model spec must be a mapping, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model spec has unknown fields {sorted(map(str, unknown))}; expected {sorted(known)}")
        if "arch" not in d:
            raise ValueError("model spec has no 'arch'")
        return cls(**d)


def _unknown_architecture(arch) -> str:
    """One line: the unknown name, our names, the families' forms, and the close names among ours."""
    import difflib

    known = sorted(ARCHITECTURES)
    close = difflib.get_close_matches(str(arch), known, n=3, cutoff=0.5)
    return (f"unknown architecture {arch!r}; known: {', '.join(known)}, or torchvision:<builder>, timm:<name>, "
            f"hf:<folder>" + (f"; close names: {', '.join(close)}" if close else ""))


# Upper bounds for specs read from files: far above any real model here, far below what would exhaust memory.
MAX_CLASSES = 1_000_000
MAX_CHANNELS = 64
MAX_IMAGE_SIZE = 4096
MAX_WIDTH = 64.0
MAX_PARAMETERS = 2_000_000_000  # 8 GB of float32 weights


def _bounded_int(name: str, value, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi], or a one-line error naming the field (floats and bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"model spec: {name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"model spec: {name} must be in [{lo}, {hi}], got {value}")
    return int(value)


def _channels(base: int, width: float) -> int:
    return max(4, int(round(base * width)))


# ---------------------------------------------------------------- PreActResNet-18
class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False)) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreActResNet-18 (He et al. 2016) as in BackdoorBench; `width` scales every stage's channels."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        widths = [_channels(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for i, (cout, stride) in enumerate(zip(widths, (1, 2, 2, 2), strict=True)):
            blocks = [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
            layers.append(nn.Sequential(*blocks))
            cin = cout
            setattr(self, f"layer{i + 1}", layers[-1])
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


# ---------------------------------------------------------------- ResNet-50
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, mid: int, stride: int) -> None:
        super().__init__()
        cout = mid * self.expansion
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 for 224x224 ImageNet-style inputs (7x7 stem + max-pool, stages 3-4-6-3)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        stem = _channels(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        cin = stem
        for i, (blocks, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2), strict=True)):
            mid = _channels(64 * 2**i, width)
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(cin, mid, stride if b == 0 else 1))
                cin = mid * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ---------------------------------------------------------------- VGG-style
class VGG(nn.Module):
    """A VGG-11-style net with batch norm; stages of 3x3 convs and max-pools, one linear head."""

    cfg = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, size = in_channels, image_size
        for v in self.cfg:
            if v == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            cout = _channels(int(v), width)
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=False)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


# ---------------------------------------------------------------- small ViT
class Attention(nn.Module):
    """Multi-head self-attention with plain Linear projections, so Fast FIP can shift their spectra."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # explicit softmax attention: unlike the fused kernel it supports vmap and forward-mode AD
        attn = torch.softmax(q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5), dim=-1)
        out = attn @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SmallViT(nn.Module):
    """A small Vision Transformer: patch embedding, class token, `depth` pre-norm blocks."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        image_size: int = 32,
        patch: int = 4,
        depth: int = 4,
        heads: int = 4,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"ViT patch size {patch} must divide the image size {image_size}")
        dim = heads * max(4, int(round(32 * width)))
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


# ---------------------------------------------------------------- registry
def _preact(spec: ModelSpec) -> nn.Module:
    return PreActResNet18(spec.num_classes, spec.in_channels, spec.width)


def _resnet50(spec: ModelSpec) -> nn.Module:
    return ResNet50(spec.num_classes, spec.in_channels, spec.width)


def _vgg(spec: ModelSpec) -> nn.Module:
    return VGG(spec.num_classes, spec.in_channels, spec.width, spec.image_size)


def _vit(spec: ModelSpec) -> nn.Module:
    return SmallViT(spec.num_classes, spec.in_channels, spec.width, spec.image_size, **spec.options)


ARCHITECTURES: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "preactresnet18": _preact,
    "resnet50": _resnet50,
    "vgg11": _vgg,
    "vit-small": _vit,
}


# Options an architecture takes from its spec, with their upper bounds (all positive integers).
ARCH_OPTIONS: dict[str, dict[str, int]] = {"vit-small": {"patch": 64, "depth": 64, "heads": 64}}


def classifier_head(model: nn.Module) -> nn.Linear | None:
    """The classifier's head: the model's last ``nn.Linear`` (every architecture here ends in one), whose
    inputs are the penultimate features and whose outputs are the classes; None for a model without one."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def parameter_count(spec: ModelSpec) -> int:
    """Parameters `spec` would allocate, counted on the meta device (nothing is allocated)."""
    if spec.source != "fip":
        return families.parameter_count(spec)
    with torch.device("meta"):
        return sum(p.numel() for p in ARCHITECTURES[spec.arch](spec).parameters())


def build_model(spec: ModelSpec) -> nn.Module:
    """Instantiate `spec.arch` from the registry, after checking on the meta device that it is not absurdly
    large (a spec from a file could otherwise ask for petabytes); its convolutions and BatchNorms get the CPU layout
    guards (:mod:`fip.kernels`)."""
    n = parameter_count(spec)
    if n > MAX_PARAMETERS:
        raise ValueError(f"model spec {spec.arch} (num_classes {spec.num_classes}, width {spec.width:g}) would have "
                         f"{n:,} parameters; refusing more than {MAX_PARAMETERS:,}")
    if spec.source != "fip":
        return guard_cpu_kernels(families.build(spec))
    return guard_cpu_kernels(ARCHITECTURES[spec.arch](spec))


def spec_for(arch: str, **given: Any) -> ModelSpec:
    """The spec of `arch` with the fields `given` (None: not given) over the family's defaults; an ``hf:``
    folder's config and preprocessor normalisation are read into the spec's options, so the spec alone
    rebuilds the model later."""
    fields = {**families.family_defaults(arch), **{k: v for k, v in given.items() if v is not None}}
    if families.split_arch(arch)[0] == "hf" and given.get("options"):
        fields["options"] = {**families.family_defaults(arch)["options"], **given["options"]}
    return ModelSpec(arch, **fields)
