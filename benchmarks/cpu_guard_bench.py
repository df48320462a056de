"""What the CPU convolution layout guard (:mod:`fip.kernels`) costs, measured side by side in one run.

The guard hands each convolution a channels-last CPU input in the default layout (a copy), which keeps
oneDNN's AVX2 weight-gradient kernel from corrupting the heap. Timed here with and without it, on one
thread as a Ray Train worker runs, interleaved (A, B, A, B, ...), best of `--repeat`:

- the demo's model (PreActResNet-18 x0.125, 1x28x28): one FIP step (cross-entropy, Tr(F) penalty, Fisher
  pull) at batch 128, on default-layout input (what the shards give) and on channels-last input;
- ResNet-50 at 224x224: one training step (forward + backward) at batch 4, both layouts.

    python -m benchmarks.cpu_guard_bench
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, write_results
from fip.fisher import trainable_params
from fip.models import ModelSpec, build_model
from fip.purify import Purifier, PurifyConfig, prepare_model
from lab.backdoor import versions


def unguarded(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with the layout guard's hooks removed (the state before the guard)."""
    for m in model.modules():
        m._forward_pre_hooks.clear()
    return model


def paired_best(a: Callable[[], None], b: Callable[[], None], repeat: int) -> tuple[float, float]:
    """Best wall time of `a` and of `b`, run alternately after one warm-up each."""
    a(), b()
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, fn in enumerate((a, b)):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best[0], best[1]


def fip_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    cfg = PurifyConfig(iterations=10_000, batch_size=len(x), trace_every=1)
    work = prepare_model(model, cfg)
    fbar = {n: torch.rand_like(p) for n, p in trainable_params(work).items()}
    purifier = Purifier(work, fbar, cfg)
    return lambda: purifier.step(x, y)


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    params = list(model.parameters())

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        torch.autograd.grad(loss, params)

    return step


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--resnet-batch", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    cases = [
        ("demo FIP step", ModelSpec("preactresnet18", 10, 1, 28, 0.125), 128, fip_step),
        ("ResNet-50 train step", ModelSpec("resnet50", 1000, 3, 224), args.resnet_batch, train_step),
    ]
    rows, payload = [], {"versions": versions(), "threads": 1, "cases": []}
    for name, spec, batch, make in cases:
        torch.manual_seed(0)
        model = build_model(spec)
        x = torch.rand(batch, spec.in_channels, spec.image_size, spec.image_size, generator=g)
        y = torch.randint(0, spec.num_classes, (batch,), generator=g)
        for layout, inp in (("default", x), ("channels-last", channels_last(x))):
            guarded, plain = make(model, inp, y), make(unguarded(copy.deepcopy(model)), inp, y)
            t_guard, t_plain = paired_best(guarded, plain, args.repeat)
            payload["cases"].append({"case": name, "input": layout, "batch": batch, "guarded_s": t_guard,
                                     "unguarded_s": t_plain, "ratio": t_guard / t_plain})
            rows.append([name, layout, batch, t_guard, t_plain, t_guard / t_plain])
            print(f"{name} ({layout} input): guarded {t_guard:.3f}s, unguarded {t_plain:.3f}s, "
                  f"ratio {t_guard / t_plain:.3f}", flush=True)
    md = ("# The CPU convolution layout guard: cost\n\n"
          "One thread, best of the paired runs (fip.kernels; docs/stack-notes.md for the bug it guards against).\n\n"
          + markdown_table(["case", "input layout", "batch", "guarded s", "unguarded s", "ratio"], rows))
    write_results("cpu_guard", payload, md)
    return payload


if __name__ == "__main__":
    main()
