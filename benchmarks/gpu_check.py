"""The GPU checks behind ``benchmarks/gpu_check.sh`` (issue 12, item 6); every part also runs on the
CPU at toy sizes, which is how the tests keep it working without a GPU.

- ``mfu``: one ResNet-50 FIP (and Fast FIP) step at 224x224 through the pipeline's own GPU path
  (bf16 autocast, channels-last: ``pipeline.transforms``): seconds, FLOPs counted by torch's
  FlopCounterMode, and model FLOPs utilisation against the card's published dense bf16 peak and
  against a measured bf16 matmul.
- ``fisher``: per-sample Fisher samples/s (empirical, and true with labels drawn on the GPU).
- ``loader``: a synthetic JPEG set written as shards here, read with the train transform by 1..N
  DataLoader workers (samples/s), against what one FIP step consumes (samples/s), and the two
  together: FIP steps fed by the loader.
- ``ray``: 1 Ray Train worker on the GPU against 2 sharing it (0.5 GPU each), same global batch.

    python -m benchmarks.gpu_check --part mfu [--batch 64] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

# published dense (no sparsity) bf16 tensor-core peaks, TFLOP/s
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0,
                    "L40S": 362.0}


def card_peak_tflops(name: str) -> float | None:
    """The published bf16 peak of a card, by the longest key its name contains (None: unknown)."""
    hits = [k for k in PEAK_BF16_TFLOPS if k in name]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, n: int = 8192, repeat: int = 20) -> float:
    """What a large bf16 (GPU) / fp32 (CPU) matmul reaches here: the practical roof."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        a @ b
    _sync(device)
    return 2 * n**3 * repeat / (time.perf_counter() - t) / 1e12


def _resnet50(size: int, width: float, classes: int = 1000):
    from fip.models import ModelSpec, build_model

    torch.manual_seed(0)
    return build_model(ModelSpec("resnet50", classes, 3, size, width))


def fip_step_mfu(device: str = "cuda", batch: int = 64, steps: int = 10, size: int = 224, width: float = 1.0,
                 methods: tuple[str, ...] = ("fip", "fast-fip"), matmul_n: int = 8192) -> dict:
    """Seconds, FLOPs and MFU of FIP steps (plain, trace, the every-5th average) on `device`."""
    from torch.utils.flop_counter import FlopCounterMode

    from fip.fisher import trainable_params
    from fip.purify import Purifier, PurifyConfig, prepare_model
    from pipeline.transforms import batch_to_device, mixed_precision, prepare_for_device

    dev = torch.device(device)
    model = prepare_for_device(_resnet50(size, width), dev)
    x = batch_to_device(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8), dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    out: dict = {"device": name, "batch": batch, "size": size, "width": width,
                 "published_peak_tflops": card_peak_tflops(name) if dev.type == "cuda" else None,
                 "matmul_tflops": matmul_tflops(dev, matmul_n)}
    for method in methods:
        cfg = PurifyConfig(method=method, batch_size=batch, trace_batch=min(32, batch))
        t = time.perf_counter()
        work = prepare_model(model, cfg)
        _sync(dev)
        row: dict = {"prepare_s": time.perf_counter() - t}
        p = Purifier(work, {n: torch.ones_like(q) for n, q in trainable_params(work).items()}, cfg)
        for kind, step_no in (("plain", 1), ("trace", 0)):
            def step(p=p, step_no=step_no) -> None:
                p.step_count = step_no
                with mixed_precision(dev):
                    p.step(x, y)

            for _ in range(2):  # warm-up: cuDNN picks its algorithms
                step()
            _sync(dev)
            t = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(dev)
            row[f"{kind}_s"] = (time.perf_counter() - t) / steps
            with FlopCounterMode(display=False) as counter:
                step()
            row[f"{kind}_flops"] = counter.get_total_flops()
        every = cfg.trace_every
        row["avg_s"] = ((every - 1) * row["plain_s"] + row["trace_s"]) / every
        row["avg_flops"] = ((every - 1) * row["plain_flops"] + row["trace_flops"]) / every
        row["tflops_per_s"] = row["avg_flops"] / row["avg_s"] / 1e12
        row["samples_per_s"] = batch / row["avg_s"]
        if out["published_peak_tflops"]:
            row["mfu_published"] = row["tflops_per_s"] / out["published_peak_tflops"]
        row["mfu_matmul"] = row["tflops_per_s"] / out["matmul_tflops"]
        if dev.type == "cuda":
            row["max_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
            torch.cuda.reset_peak_memory_stats(dev)
        out[method] = row
    return out


def fisher_rate(device: str = "cuda", batch: int = 64, chunk: int = 32, steps: int = 5, size: int = 224,
                width: float = 1.0) -> dict:
    """Per-sample Fisher samples/s, empirical and true (labels drawn on the model's device)."""
    from fip.fisher import squared_grad_sums, trainable_params
    from fip.training import derive_seed
    from pipeline.transforms import batch_to_device, mixed_precision, prepare_for_device

    dev = torch.device(device)
    model = prepare_for_device(_resnet50(size, width), dev)
    params = trainable_params(model)
    x = batch_to_device(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8), dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    out: dict = {"batch": batch, "chunk": chunk}
    for kind in ("empirical", "true"):
        g = torch.Generator(device=dev).manual_seed(derive_seed(0, "fisher-labels", 0))
        with mixed_precision(dev):
            squared_grad_sums(model, x[:chunk], y[:chunk], kind, params, chunk, generator=g)
            _sync(dev)
            t = time.perf_counter()
            for _ in range(steps):
                sums = squared_grad_sums(model, x, y, kind, params, chunk, generator=g)
            _sync(dev)
        out[f"{kind}_samples_per_s"] = steps * batch / (time.perf_counter() - t)
        out[f"{kind}_finite"] = bool(all(torch.isfinite(s).all() for s in sums.values()))
    return out


def make_shards(folder: Path, images: int, classes: int, size: int, workers: int) -> Path:
    """A synthetic JPEG set (benchmarks.scale_bench) written as shards with the streaming writer."""
    from benchmarks.scale_bench import synthetic_imagenet
    from pipeline.shard_sources import folder_source
    from pipeline.shard_writer import write_source

    root = synthetic_imagenet(folder / "inet", images, classes, size)
    dest = folder / "shards"
    write_source(folder_source(root, "train"), str(dest), maxcount=250, workers=workers)
    return dest


def loader_vs_gpu(shards: Path, device: str = "cuda", workers: tuple[int, ...] = (1, 4, 8, 12), batch: int = 64,
                  size: int = 224, width: float = 1.0, steps: int = 20, step_s: float | None = None) -> dict:
    """Loader samples/s by worker count (train transform, uint8, pinned), what FIP consumes, and both together."""
    from fip.fisher import trainable_params
    from fip.purify import Purifier, PurifyConfig, prepare_model
    from pipeline.shards import RankStream, open_shards, rank_loader
    from pipeline.transforms import batch_to_device, mixed_precision, prepare_for_device, train_transform

    dev = torch.device(device)
    source = open_shards(str(shards))
    out: dict = {"batch": batch, "loader": []}

    def stream(epoch: int) -> RankStream:
        s = RankStream(source, 0, 1, shuffle=True, transform=train_transform(size), as_uint8=True)
        s.set_epoch(epoch)
        return s

    for w in workers:
        n, t, first = 0, time.perf_counter(), None
        for xb, _, _ in rank_loader(stream(w), batch, w, pin_memory=dev.type == "cuda", prefetch_factor=4):
            if first is None:
                first, n0 = time.perf_counter(), len(xb)
            n += len(xb)
        end = time.perf_counter()
        out["loader"].append({"workers": w, "samples_per_s": (n - n0) / max(end - first, 1e-9),
                              "startup_s": first - t})
    cfg = PurifyConfig(batch_size=batch, trace_batch=min(32, batch))
    work = prepare_model(prepare_for_device(_resnet50(size, width), dev), cfg)
    p = Purifier(work, {n: torch.ones_like(q) for n, q in trainable_params(work).items()}, cfg)
    if step_s is None:  # what FIP consumes when its batches are already on the device
        x = batch_to_device(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8), dev)
        y = torch.randint(0, 1000, (batch,), device=dev)
        for _ in range(2):
            with mixed_precision(dev):
                p.step(x, y)
        _sync(dev)
        t = time.perf_counter()
        for _ in range(steps):
            with mixed_precision(dev):
                p.step(x, y)
        _sync(dev)
        step_s = (time.perf_counter() - t) / steps
    out["gpu_consumes_samples_per_s"] = batch / step_s
    best = max(out["loader"], key=lambda r: r["samples_per_s"])
    done, t = 0, None
    while done < steps:  # FIP fed by the loader (the best worker count), epoch after epoch
        for xb, yb, _ in rank_loader(stream(100 + done), batch, best["workers"], pin_memory=dev.type == "cuda",
                                     prefetch_factor=4):
            if len(yb) < batch:
                continue
            with mixed_precision(dev):
                p.step(batch_to_device(xb, dev), yb.to(dev, non_blocking=True))
            if t is None:
                _sync(dev)
                t = time.perf_counter()
                continue
            done += 1
            if done >= steps:
                break
    _sync(dev)
    out["fed_samples_per_s"] = steps * batch / (time.perf_counter() - t)
    out["fed_workers"] = best["workers"]
    out["bound"] = "data" if best["samples_per_s"] < out["gpu_consumes_samples_per_s"] else "compute"
    return out


def _ray_worker(config: dict) -> None:
    """One Ray Train worker: FIP steps on synthetic device batches, DDP across the workers."""
    from fip.fisher import trainable_params
    from fip.purify import Purifier, PurifyConfig, prepare_model
    from pipeline.artifacts import METRICS
    from pipeline.transforms import batch_to_device, mixed_precision, prepare_for_device
    from pipeline.workers import device, report, world, wrap_ddp

    rank, size = world()
    dev = device()
    local = config["batch"] // size
    cfg = PurifyConfig(batch_size=config["batch"], trace_batch=min(32, local))
    work = prepare_model(prepare_for_device(_resnet50(config["size"], config["width"]), dev), cfg)
    p = Purifier(work, {n: torch.ones_like(q) for n, q in trainable_params(work).items()}, cfg,
                 logits_fn=wrap_ddp(work), rank=rank)
    x = batch_to_device(torch.randint(0, 256, (local, 3, config["size"], config["size"]), dtype=torch.uint8), dev)
    y = torch.randint(0, 1000, (local,), device=dev)
    for _ in range(3):
        with mixed_precision(dev):
            p.step(x, y)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(config["steps"]):
        with mixed_precision(dev):
            p.step(x, y)
    _sync(dev)
    # Ray Train V2 keeps only metrics reported with a checkpoint (docs/stack-notes.md): rank 0 attaches one
    metrics = {"seconds": time.perf_counter() - t, "rank": rank}
    report(metrics, {METRICS: json.dumps(metrics).encode()} if rank == 0 else None)


def ray_sharing(workers: tuple[int, ...] = (1, 2), use_gpu: bool = True, batch: int = 64, steps: int = 10,
                size: int = 224, width: float = 1.0) -> dict:
    """Global samples/s with k Ray Train workers on one GPU (1/k GPU each), the same global batch."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out: dict = {"batch": batch, "runs": []}
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=os.cpu_count(), num_gpus=1 if use_gpu else 0, include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory() as storage:
            for k in workers:
                per = {"CPU": 1, **({"GPU": 1 / k} if use_gpu else {})}
                row: dict = {"workers": k}
                # NCCL refuses two ranks on one GPU (the driver picks gloo for a share); try it to record why
                for backend in (("nccl", "gloo") if use_gpu and k > 1 else ("nccl",) if use_gpu else ("gloo",)):
                    try:
                        t = time.perf_counter()
                        trainer = TorchTrainer(_ray_worker, train_loop_config={"batch": batch, "steps": steps,
                                                                               "size": size, "width": width},
                                               torch_config=TorchConfig(backend=backend),
                                               scaling_config=ScalingConfig(num_workers=k, use_gpu=use_gpu,
                                                                            resources_per_worker=per),
                                               run_config=RunConfig(name=f"share-{k}-{backend}", storage_path=storage))
                        result = trainer.fit()
                        seconds = result.metrics["seconds"]
                        row.update({"backend": backend, "seconds": seconds, "samples_per_s": steps * batch / seconds,
                                    "wall_s": time.perf_counter() - t})
                        break
                    except Exception as e:  # noqa: BLE001 (recorded: which backend failed and why)
                        row[f"{backend}_error"] = str(e).splitlines()[0][:300]
                out["runs"].append(row)
    finally:
        if started:
            ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", required=True, choices=["mfu", "fisher", "loader", "ray"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--images", type=int, default=4000, help="loader: synthetic JPEGs to write as shards")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="loader workers, or Ray workers")
    p.add_argument("--work-dir", default=None, help="loader: where the synthetic set and shards go")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--out", default=None, help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device visible to torch (a CPU-only wheel, or no GPU): pass --device cpu to try it here")
    if args.part == "mfu":
        result = fip_step_mfu(args.device, args.batch, args.steps, args.size, args.width, matmul_n=args.matmul_n)
    elif args.part == "fisher":
        result = fisher_rate(args.device, args.batch, min(32, args.batch), args.steps, args.size, args.width)
    elif args.part == "loader":
        folder = Path(args.work_dir or tempfile.mkdtemp(prefix="fip-gpu-check-"))
        shards = folder / "shards"
        if not (shards / "manifest.json").is_file():
            make_shards(folder, args.images, 1000, args.size, max(1, (os.cpu_count() or 2) - 2))
        result = loader_vs_gpu(shards, args.device, tuple(args.workers or (1, 4, 8, 12)), args.batch, args.size,
                               args.width, args.steps)
    else:
        result = ray_sharing(tuple(args.workers or (1, 2)), args.device.startswith("cuda"), args.batch, args.steps,
                             args.size, args.width)
    result = {"part": args.part, **result}
    line = json.dumps(result, default=str)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return result


if __name__ == "__main__":
    main()
