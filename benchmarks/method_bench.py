"""The method's speed, measured side by side in one run:

- vectorised (vmap) per-sample Fisher vs a per-sample loop (same model, same samples);
- Fast FIP's trainable parameters vs FIP's for PreActResNet-18 (full width, CIFAR shape, and the
  lab's x0.125 Fashion-MNIST width);
- one FIP step vs one Fast FIP step (wall clock) and the FIP step's model FLOPs utilisation:
  achieved FLOP/s (counted by torch's FlopCounterMode) over this machine's measured fp32 matmul peak.

    python -m benchmarks.method_bench
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import markdown_table, write_results
from fip.fisher import fisher_diag
from fip.fisher import trainable_params as _tp
from fip.models import ModelSpec, build_model
from fip.purify import Purifier, PurifyConfig, prepare_model
from fip.spectral import count_trainable, to_spectral_shift
from fip.training import augment_batch
from lab.backdoor import versions


def timeit(fn, repeat: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = timeit(lambda: a @ b, repeat=5, warmup=2)
    return 2 * n**3 / seconds


def fisher_speed(samples: int = 128) -> dict:
    spec = ModelSpec("preactresnet18", 10, 1, 28, 0.125)
    torch.manual_seed(0)
    model = build_model(spec)
    x, y = torch.rand(samples, 1, 28, 28), torch.randint(0, 10, (samples,))
    vec = timeit(lambda: fisher_diag(model, [(x, y)], chunk_size=32), repeat=2)
    loop = timeit(lambda: fisher_diag(model, [(x, y)], vectorize=False), repeat=1, warmup=0)
    return {"samples": samples, "vmap_seconds": vec, "loop_seconds": loop, "speedup": loop / vec}


def parameter_counts() -> dict:
    out = {}
    for label, spec in (("cifar-width1", ModelSpec("preactresnet18", 10, 3, 32, 1.0)),
                        ("fmnist-width0.125", ModelSpec("preactresnet18", 10, 1, 28, 0.125))):
        model = build_model(spec)
        full = count_trainable(model)
        fast = count_trainable(to_spectral_shift(model))
        out[label] = {"fip": full, "fast_fip": fast, "ratio": full / fast}
    return out


def step_costs(batch: int = 128) -> dict:
    spec = ModelSpec("preactresnet18", 10, 1, 28, 0.125)
    torch.manual_seed(0)
    base = build_model(spec)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    g = torch.Generator().manual_seed(0)
    xb = augment_batch(x, g)
    out = {}
    for method in ("fip", "fast-fip"):
        for with_trace in (False, True):
            cfg = PurifyConfig(method=method, trace_every=1 if with_trace else 10**9, batch_size=batch)
            work = prepare_model(base, cfg)
            fbar = {n: torch.ones_like(p) for n, p in _tp(work).items()}
            p = Purifier(work, fbar, cfg)
            p.step_count = 1 if not with_trace else 0
            seconds = timeit(lambda p=p, wt=with_trace: (setattr(p, "step_count", 0 if wt else 1), p.step(xb, y)), repeat=3)
            with FlopCounterMode(display=False) as counter:
                p.step_count = 0 if with_trace else 1
                p.step(xb, y)
            flops = counter.get_total_flops()
            out[f"{method}{'+trace' if with_trace else ''}"] = {"seconds": seconds, "flops": flops, "flops_per_s": flops / seconds}
    # the loop adds the trace penalty every 5th step (trace_every=5): average step cost
    for m in ("fip", "fast-fip"):
        plain, traced = out[m]["seconds"], out[f"{m}+trace"]["seconds"]
        out[f"{m}-avg-every5"] = {"seconds": (4 * plain + traced) / 5,
                                  "flops": (4 * out[m]["flops"] + out[f"{m}+trace"]["flops"]) / 5}
        out[f"{m}-avg-every5"]["flops_per_s"] = out[f"{m}-avg-every5"]["flops"] / out[f"{m}-avg-every5"]["seconds"]
    return out


def main() -> dict:
    torch.manual_seed(0)
    peak = matmul_peak()
    fisher = fisher_speed()
    params = parameter_counts()
    steps = step_costs()
    mfu = steps["fip-avg-every5"]["flops_per_s"] / peak
    ratio = steps["fip-avg-every5"]["seconds"] / steps["fast-fip-avg-every5"]["seconds"]
    rows = [
        ["vmap Fisher vs loop (128 samples)", f"{fisher['loop_seconds']:.2f}s / {fisher['vmap_seconds']:.2f}s", f"{fisher['speedup']:.1f}x"],
        ["PreActResNet-18 (CIFAR, width 1) params FIP / Fast FIP", f"{params['cifar-width1']['fip']:,} / {params['cifar-width1']['fast_fip']:,}", f"{params['cifar-width1']['ratio']:.0f}x"],
        ["PreActResNet-18 (x0.125) params FIP / Fast FIP", f"{params['fmnist-width0.125']['fip']:,} / {params['fmnist-width0.125']['fast_fip']:,}", f"{params['fmnist-width0.125']['ratio']:.0f}x"],
        ["FIP step / Fast FIP step (avg, trace every 5th)", f"{steps['fip-avg-every5']['seconds'] * 1e3:.0f}ms / {steps['fast-fip-avg-every5']['seconds'] * 1e3:.0f}ms", f"{ratio:.2f}x"],
        ["FIP step FLOP/s vs fp32 matmul peak (MFU)", f"{steps['fip-avg-every5']['flops_per_s'] / 1e9:.1f} / {peak / 1e9:.1f} GFLOP/s", f"{100 * mfu:.1f}%"],
    ]
    md = (f"# Method benchmarks ({torch.get_num_threads()} CPU threads)\n\n"
          + markdown_table(["measure", "values", "ratio"], rows))
    payload = {"matmul_peak_flops": peak, "fisher": fisher, "params": params, "steps": steps, "mfu": mfu,
               "fip_over_fast_fip_step": ratio, "versions": versions()}
    write_results("method", payload, md)
    print(md)
    return payload


if __name__ == "__main__":
    main()
