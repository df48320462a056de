"""Tiny models of each accepted family, for the method's and the loader's tests (seconds each on 2 cores)."""

from __future__ import annotations

from dataclasses import dataclass
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


# ---------------------------------------------------------------- suspects as users bring them, on digits
@dataclass(frozen=True)
class UserModel:
    """A model file as its user saved it, and the flags that tell the pipeline what it is."""

    path: Path
    flags: tuple[str, ...]


def digits_user_models(root: Path, train) -> dict[str, UserModel]:
    """Three models trained briefly on 8 x 8 gray digits and saved as their ecosystems save them: torchvision's
    resnet18 as a ``torch.save`` state dict (3 channels at 16 px, ImageNet normalisation), timm's ``test_vit``
    as a bare safetensors state dict (1 channel at 32 px, its 0.5/0.5 normalisation), and an HF ViT folder
    (``save_pretrained``, 3 channels at 8 px, its preprocessor's normalisation). Each network resizes or widens
    the digits itself (``--data-shape 1,8,8``)."""
    from safetensors.torch import save_file

    from fip.families import default_normalization
    from fip.inputs import ADAPTER_KEY, NORMALIZATION_KEY, attach_inputs
    from fip.models import build_model
    from lab.train import TrainConfig, train_classifier

    tr = import_transformers()
    folder = root / "hf-vit"
    config = tr.ViTConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, num_labels=10)
    tr.AutoModelForImageClassification.from_config(config).save_pretrained(folder)
    tr.ViTImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(folder)
    geometry = ("--num-classes", "10", "--data-shape", "1,8,8")
    made = {
        "torchvision": (spec_for("torchvision:resnet18", num_classes=10, image_size=16), root / "resnet18.pth",
                        ("--arch", "torchvision:resnet18", "--image-size", "16", *geometry)),
        "timm": (spec_for("timm:test_vit", num_classes=10, in_channels=1, image_size=32), root / "test_vit.safetensors",
                 ("--arch", "timm:test_vit", "--in-channels", "1", "--image-size", "32", *geometry)),
        "hf": (spec_for(f"hf:{folder}"), folder / "model.safetensors", ("--data-shape", "1,8,8")),
    }
    out = {}
    for name, (spec, path, flags) in made.items():
        torch.manual_seed(0)
        model = build_model(spec)
        meta = {NORMALIZATION_KEY: default_normalization(spec)}
        if spec.input_shape != (1, 8, 8):
            meta[ADAPTER_KEY] = {"data_shape": [1, 8, 8]}
        attach_inputs(model, spec.input_shape, meta)
        train_classifier(model, train, TrainConfig(epochs=3 if name != "hf" else 30, batch_size=64, lr=0.05 if name != "hf" else 0.2))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if path.suffix == ".pth":
            torch.save(state, path)
        else:
            save_file(state, str(path))
        out[name] = UserModel(folder if name == "hf" else path, flags)
    return out
