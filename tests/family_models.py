"""Tiny models of each accepted family, for the method's and the loader's tests (seconds each on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fip.families import import_transformers
from fip.models import ModelSpec, spec_for

CLASSES = 4


def torchvision_spec() -> ModelSpec:
    """torchvision's resnet18 (BatchNorm, in-place ReLU, `out += identity`) on 32 x 32 inputs."""
    return spec_for("torchvision:resnet18", num_classes=CLASSES, image_size=32)


def timm_spec() -> ModelSpec:
    """timm's vit_tiny_patch16_224 at 16 x 16 with 4 x 4 patches, 2 blocks, stochastic depth (drop_path) on;
    its attention calls the fused scaled_dot_product_attention."""
    return spec_for("timm:vit_tiny_patch16_224", num_classes=CLASSES, image_size=16,
                    options={"patch_size": 4, "depth": 2, "drop_path_rate": 0.1})


def hf_folder(root: Path, kind: str = "vit") -> Path:
    """An HF image classifier written by save_pretrained from a small config, with a preprocessor config."""
    tr = import_transformers()
    torch.manual_seed(0)
    if kind == "vit":
        config = tr.ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=32, num_labels=CLASSES)
    else:
        config = tr.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                 num_labels=CLASSES)
    folder = root / f"hf-{kind}"
    tr.AutoModelForImageClassification.from_config(config).save_pretrained(folder)
    tr.ViTImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return folder


class AttentionNet(nn.Module):
    """nn.MultiheadAttention (in_proj_weight is a bare Parameter), BatchNorm, LayerNorm and an in-place op."""

    def __init__(self, dim: int = 8, classes: int = CLASSES) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.bn = nn.BatchNorm2d(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.1)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.bn(self.embed(x)).flatten(2).transpose(1, 2) + self.pos
        a, _ = self.attn(t, t, t, need_weights=False)
        t = self.norm(t + a)
        t.relu_()
        return self.head(t.mean(1))
