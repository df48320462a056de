"""What the per-sample loop costs against vmap on the accepted model families, side by side in one run.

For each family (torchvision resnet18, timm ViT-Tiny and ConvNeXt-Atto, an HF ViT built from a local config,
a model with ``nn.MultiheadAttention``): the diagonal Fisher by vmap and by the per-sample loop on the same
samples, and the exact Tr(F) penalty (value and its gradient) both ways; which path ``per_sample_grads``
chooses by itself; the relative difference of the two Fishers; and how many weights Fast FIP leaves alone.

    python -m benchmarks.families_bench
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import markdown_table, write_results
from benchmarks.method_bench import timeit
from fip.families import import_transformers, spec_for
from fip.fisher import fisher_diag, per_sample_grads_loop, per_sample_grads_vmap, trainable_params
from fip.io import load_model
from fip.kernels import differentiable_attention, guard_cpu_kernels
from fip.models import build_model
from fip.objective import trace_penalty
from fip.spectral import left_alone

CLASSES = 10


class MultiheadNet(nn.Module):
    """Patch embedding, two nn.MultiheadAttention blocks with LayerNorm, a linear head."""

    def __init__(self, dim: int = 64, size: int = 32, patch: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (size // patch) ** 2, dim))
        self.blocks = nn.ModuleList(nn.MultiheadAttention(dim, 4, batch_first=True) for _ in range(2))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for attn, norm in zip(self.blocks, self.norms, strict=True):
            t = t + attn(norm(t), norm(t), norm(t), need_weights=False)[0]
        return self.head(t.mean(1))


def hf_vit(root: Path) -> nn.Module:
    tr = import_transformers()
    config = tr.ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=128, num_labels=CLASSES)
    tr.ViTForImageClassification(config).save_pretrained(root / "hf-vit")
    return load_model(root / "hf-vit").model


def families(root: Path) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "torchvision resnet18 (32x32)": build_model(spec_for("torchvision:resnet18", num_classes=CLASSES, image_size=32)),
        "timm vit_tiny_patch16_224 (32x32, patch 4)": build_model(
            spec_for("timm:vit_tiny_patch16_224", num_classes=CLASSES, image_size=32, options={"patch_size": 4})),
        "timm convnext_atto (32x32)": build_model(spec_for("timm:convnext_atto", num_classes=CLASSES, image_size=32)),
        "HF ViT (4 layers, hidden 64, 32x32)": hf_vit(root),
        "nn.MultiheadAttention net (2 blocks)": guard_cpu_kernels(MultiheadNet()),
    }


def exact_trace_with_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loop: bool) -> None:
    """Tr(F) by per-sample gradients, then its gradient: the vmap path, or the loop it falls back to."""
    params = trainable_params(model)
    if loop:
        with differentiable_attention():
            grads = per_sample_grads_loop(model, params, x, y, create_graph=True)
            value = sum(g.pow(2).sum() for g in grads.values()) / len(x)
    else:
        value = trace_penalty(model, x, y, "exact")
    torch.autograd.grad(value, list(params.values()))


def chosen_path(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str:
    try:
        per_sample_grads_vmap(model, {n: p.detach() for n, p in trainable_params(model).items()}, x[:2], y[:2])
        return "vmap"
    except (RuntimeError, NotImplementedError):
        return "loop"


def measure(name: str, model: nn.Module, samples: int, trace_samples: int) -> dict:
    model.eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(samples, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (samples,), generator=g)
    vec = fisher_diag(model, [(x, y)], chunk_size=8)
    slow = fisher_diag(model, [(x, y)], vectorize=False)
    num = sum(float((vec.sums[k] - slow.sums[k]).pow(2).sum()) for k in vec.sums) ** 0.5
    den = sum(float(slow.sums[k].pow(2).sum()) for k in slow.sums) ** 0.5
    fisher_vmap = timeit(lambda: fisher_diag(model, [(x, y)], chunk_size=8), repeat=2)
    fisher_loop = timeit(lambda: fisher_diag(model, [(x, y)], vectorize=False), repeat=2)
    xt, yt = x[:trace_samples], y[:trace_samples]
    trace_vmap = timeit(lambda: exact_trace_with_gradient(model, xt, yt, loop=False), repeat=2)
    trace_loop = timeit(lambda: exact_trace_with_gradient(model, xt, yt, loop=True), repeat=2)
    return {"family": name, "parameters": sum(p.numel() for p in model.parameters()),
            "chosen": chosen_path(model, x, y), "fisher_rel_diff": num / den,
            "fisher_vmap_s": fisher_vmap, "fisher_loop_s": fisher_loop, "fisher_loop_over_vmap": fisher_loop / fisher_vmap,
            "trace_vmap_s": trace_vmap, "trace_loop_s": trace_loop, "trace_loop_over_vmap": trace_loop / trace_vmap,
            "fast_fip_left_alone": left_alone(model)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32, help="samples of the Fisher estimate")
    ap.add_argument("--trace-samples", type=int, default=8, help="samples of the Tr(F) penalty (trace_batch)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, model, args.samples, args.trace_samples) for name, model in families(Path(tmp)).items()]
    table = markdown_table(
        ["family", "params", "path chosen", "Fisher vmap / loop (s)", "loop / vmap", "Tr(F)+grad vmap / loop (s)",
         "loop / vmap", "Fisher rel. diff", "Fast FIP leaves alone"],
        [[r["family"], f"{r['parameters']:,}", r["chosen"], f"{r['fisher_vmap_s']:.2f} / {r['fisher_loop_s']:.2f}",
          f"{r['fisher_loop_over_vmap']:.2f}x", f"{r['trace_vmap_s']:.2f} / {r['trace_loop_s']:.2f}",
          f"{r['trace_loop_over_vmap']:.2f}x", f"{r['fisher_rel_diff']:.1e}",
          ", ".join(r["fast_fip_left_alone"]) or "-"] for r in rows])
    md = (f"# Per-sample loop vs vmap on the model families (2 CPU threads, torch {torch.__version__}, "
          f"{platform.machine()})\n\n"
          f"Fisher over {args.samples} samples (vmap in chunks of 8), exact Tr(F) and its gradient over "
          f"{args.trace_samples} samples; best of 2 runs, all in one process. \"path chosen\": what "
          "`per_sample_grads` takes by itself (the loop only where vmap raises). `python -m benchmarks.families_bench`\n\n"
          + table)
    write_results("families", {"samples": args.samples, "trace_samples": args.trace_samples,
                               "torch": torch.__version__, "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
