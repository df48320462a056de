"""ImageNet-shaped scaling, measured on this machine:

- a synthetic ImageNet-shaped set made here (1000 classes, JPEG, sides around ``--size``), written
  with the streaming shard writer at N and 4N images: samples/s, what the writer buffered, and the
  peak RSS of the writing process and of its workers (each write in a fresh process);
- reading those shards: the raw tar rate (bytes only) against decode + resize + centre crop to 224
  through the DataLoader with 1, 2 and 4 worker processes;
- ResNet-50 (``fip.models`` "resnet50", 1000 classes) at 224: per-sample Fisher samples/s and FIP /
  Fast FIP steps/s at a tiny batch, with the FLOPs of each, which docs/scale.md turns into GPU costs.

    python -m benchmarks.scale_bench [--images 2000] [--size 224] [--model-batch 2]

The JPEGs are drawn from a pool of distinct smooth random images (their bytes reused across
files), so decoding costs what a photograph of that size costs; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, markdown_table, write_results

POOL = 64  # distinct JPEGs behind the synthetic set


def synthetic_imagenet(root: Path, images: int, classes: int = 1000, size: int = 224, seed: int = 0) -> Path:
    """``root/train/<class>/<n>.JPEG`` with `images` files over `classes` folders, sides in [0.8, 1.3] x size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(POOL):
        h, w = (int(v) for v in rng.integers(int(0.8 * size), int(1.3 * size) + 1, 2))
        coarse = rng.integers(0, 255, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC)).astype(np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)  # some texture
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        pool.append(buf.getvalue())
    base = root / "train"
    for c in range(classes):
        (base / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        (base / f"n{i % classes:08d}" / f"n{i % classes:08d}_{i}.JPEG").write_bytes(pool[i % POOL])
    return root


def _write_in_fresh_process(root: Path, dest: Path, workers: int, maxcount: int) -> dict:
    """One shard write in its own interpreter, so its peak RSS is that write's alone."""
    code = (
        "import json, resource, sys\n"
        "from benchmarks.scale_bench import _write_child\n"
        "if __name__ == '__main__':\n"
        f"    print(json.dumps(_write_child({str(root)!r}, {str(dest)!r}, {workers}, {maxcount})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _write_child(root: str, dest: str, workers: int, maxcount: int) -> dict:
    from pipeline.shard_sources import folder_source
    from pipeline.shard_writer import write_source

    result = write_source(folder_source(root, "train"), dest, maxcount=maxcount, workers=workers)
    s = result.stats
    kb = 1024  # ru_maxrss is in KiB on Linux
    return {"samples": s.samples, "seconds": s.seconds, "samples_per_s": s.samples / s.seconds,
            "shards": s.shards_written, "bytes": s.bytes_written, "peak_buffered_samples": s.peak_buffered,
            "rss_writer_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb,
            "rss_worker_mb": s.peak_worker_rss_mb}


def raw_read_rate(dest: Path) -> float:
    """Samples/s of reading the shards' bytes and grouping them into samples, nothing decoded."""
    from pipeline.shardfmt import iter_tar_samples

    start, n = time.perf_counter(), 0
    for tar in sorted(dest.glob("*.tar")):
        with open(tar, "rb") as f:
            n += sum(1 for _ in iter_tar_samples(f))
    return n / (time.perf_counter() - start)


def loader_rate(dest: Path, workers: int, batch: int = 64, size: int = 224) -> dict:
    """Decode + resize + centre crop to `size` in `workers` DataLoader processes, uint8 batches."""
    from pipeline.shards import RankStream, open_shards, rank_loader
    from pipeline.transforms import eval_transform

    stream = RankStream(open_shards(str(dest)), 0, 1, transform=eval_transform(size), as_uint8=True)
    start = time.perf_counter()
    first = None
    n = 0
    for x, _, _ in rank_loader(stream, batch, num_workers=workers, prefetch_factor=4 if workers else None):
        if first is None:
            first, n0 = time.perf_counter(), len(x)
        n += len(x)
    end = time.perf_counter()
    return {"workers": workers, "samples": n, "samples_per_s": n / (end - start),
            "steady_samples_per_s": (n - n0) / max(end - first, 1e-9), "startup_s": first - start}


def resnet50_rates(batch: int, steps: int, size: int = 224) -> dict:
    """Fisher samples/s and FIP / Fast FIP steps/s of ResNet-50 at `size` (CPU, fp32, tiny batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fip.fisher import squared_grad_sums, trainable_params
    from fip.models import ModelSpec, build_model
    from fip.purify import Purifier, PurifyConfig, prepare_model

    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet50", 1000, 3, size))
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    out = {"batch": batch, "threads": torch.get_num_threads(),
           "params": sum(p.numel() for p in model.parameters())}
    work = prepare_model(model, PurifyConfig())
    squared_grad_sums(work, x[:1], y[:1])  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        squared_grad_sums(work, x, y, chunk_size=batch)
    out["fisher_samples_per_s"] = steps * batch / (time.perf_counter() - t)
    for method in ("fip", "fast-fip"):
        t = time.perf_counter()
        cfg = PurifyConfig(method=method, batch_size=batch, trace_batch=batch)
        w = prepare_model(model, cfg)
        prepare_s = time.perf_counter() - t
        p = Purifier(w, {n: torch.ones_like(q) for n, q in trainable_params(w).items()}, cfg)
        row = {"prepare_s": prepare_s, "trainable": sum(q.numel() for q in trainable_params(w).values())}
        for kind, step_no in (("plain", 1), ("trace", 0)):
            p.step_count = step_no
            p.step(x, y)  # warm-up
            t = time.perf_counter()
            for _ in range(steps):
                p.step_count = step_no
                p.step(x, y)
            row[f"{kind}_step_s"] = (time.perf_counter() - t) / steps
            with FlopCounterMode(display=False) as counter:
                p.step_count = step_no
                p.step(x, y)
            row[f"{kind}_step_flops"] = counter.get_total_flops()
        every = cfg.trace_every  # the loop adds the trace term every 5th step
        row["avg_step_s"] = ((every - 1) * row["plain_step_s"] + row["trace_step_s"]) / every
        row["avg_step_flops"] = ((every - 1) * row["plain_step_flops"] + row["trace_step_flops"]) / every
        row["steps_per_s"] = 1 / row["avg_step_s"]
        out[method] = row
    with FlopCounterMode(display=False) as counter:
        squared_grad_sums(work, x, y, chunk_size=batch)
    out["fisher_flops_per_sample"] = counter.get_total_flops() / batch
    # Fast FIP rebuilds every W' = U diag(relu(s + delta)) V^T each forward: work that does not shrink with the batch
    from fip.spectral import SpectralShift

    layers = [m for m in w.modules() if isinstance(m, SpectralShift)]
    with FlopCounterMode(display=False) as counter:
        sum(m.shifted_weight().sum() for m in layers).backward()
    out["fast-fip"]["rebuild_flops_fwd_bwd"] = counter.get_total_flops()
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="N; the second write has 4N")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--size", type=int, default=224, help="typical image side")
    p.add_argument("--workers", type=int, default=2, help="shard-writing processes")
    p.add_argument("--maxcount", type=int, default=250, help="samples per shard")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--model-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed repetitions of each model measurement")
    p.add_argument("--skip-model", action="store_true", help="data path only")
    p.add_argument("--skip-data", action="store_true",
                   help="model part only; the data part is kept from benchmarks/results/scale.json")
    p.add_argument("--keep", default=None, help="keep the synthetic set and shards in this folder")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the model part (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.images < args.classes:
        p.error(f"--images {args.images} leaves classes empty: at least --classes {args.classes}")
    work = Path(args.keep or tempfile.mkdtemp(prefix="fip-scale-bench-"))
    payload: dict = {"images": args.images, "classes": args.classes, "size": args.size, "cpus": os.cpu_count(),
                     "threads": torch.get_num_threads(), "load_before": os.getloadavg()[0], "writes": {},
                     "reads": {}}
    try:
        if args.skip_data:
            old = json.loads((RESULTS / "scale.json").read_text())
            payload.update({k: old[k] for k in ("images", "classes", "size", "writes", "reads", "load_before")})
            payload["writes"] = {int(k): v for k, v in payload["writes"].items()}
            args.images, args.classes, args.size = old["images"], old["classes"], old["size"]
        for n in () if args.skip_data else (args.images, 4 * args.images):
            root = synthetic_imagenet(work / f"inet-{n}", n, args.classes, args.size)
            dest = work / f"shards-{n}"
            shutil.rmtree(dest, ignore_errors=True)
            payload["writes"][n] = _write_in_fresh_process(root, dest, args.workers, args.maxcount)
            print(f"[scale] wrote {n} images: {payload['writes'][n]['samples_per_s']:.0f}/s", flush=True)
        dest = work / f"shards-{args.images}"
        if not args.skip_data:
            payload["reads"]["raw_tar_samples_per_s"] = raw_read_rate(dest)
            payload["reads"]["loader"] = [loader_rate(dest, w) for w in args.loader_workers]
            print(f"[scale] read: raw {payload['reads']['raw_tar_samples_per_s']:.0f}/s", flush=True)
        if not args.skip_model:
            payload["resnet50"] = resnet50_rates(args.model_batch, args.steps)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    from lab.backdoor import versions

    payload["versions"] = versions()
    payload["load_after"] = os.getloadavg()[0]
    md = render(payload, args)
    write_results("scale", payload, md)
    print(md)
    return payload


def render(payload: dict, args) -> str:
    w = payload["writes"]
    n, n4 = args.images, 4 * args.images
    rows = [[f"{k:,}", f"{v['samples_per_s']:,.0f}", f"{v['bytes'] / 1e6:,.0f}", v["peak_buffered_samples"],
             f"{v['rss_writer_mb']:,.0f}", f"{v['rss_worker_mb']:,.0f}"] for k, v in ((n, w[n]), (n4, w[n4]))]
    busy = max(payload["load_before"], payload["load_after"]) > 0.5 * (payload["cpus"] or 1)
    md = (f"# Scale benchmark ({payload['cpus']} CPUs, model part on {payload['threads']} torch thread(s); load average "
          f"{payload['load_before']:.1f} before, {payload['load_after']:.1f} after"
          + (": other work shared the CPUs" if busy else "") + ")\n\n"
          f"Synthetic ImageNet-shaped set: {args.classes} classes, JPEG q90, sides {int(0.8 * args.size)}-"
          f"{int(1.3 * args.size)} px; shards of {args.maxcount}, {args.workers} writing processes.\n\n"
          "## Writing (source JPEG bytes kept)\n\n"
          + markdown_table(["images", "samples/s", "MB written", "writer buffered (samples)", "peak RSS writer MB",
                            "peak RSS worker MB"], rows))
    r = payload["reads"]
    rows = [["raw tar (bytes only)", "-", f"{r['raw_tar_samples_per_s']:,.0f}", "-", "-"]]
    rows += [[f"decode + resize + crop 224, {row['workers']} loader worker(s)", row["samples"],
              f"{row['samples_per_s']:,.0f}", f"{row['steady_samples_per_s']:,.0f}", f"{row['startup_s']:.2f}"]
             for row in r["loader"]]
    md += (f"\n## Reading {n:,} images\n\n"
           + markdown_table(["path", "samples", "samples/s", "steady samples/s", "first batch s"], rows))
    if "resnet50" in payload:
        m = payload["resnet50"]
        rows = [["per-sample Fisher", f"{m['fisher_samples_per_s']:.2f} samples/s",
                 f"{m['fisher_flops_per_sample'] / 1e9:.1f} GFLOP/sample", "-"]]
        for method in ("fip", "fast-fip"):
            row = m[method]
            rows.append([f"{method} step (trace every 5th)", f"{row['steps_per_s']:.3f} steps/s",
                         f"{row['avg_step_flops'] / 1e9:.1f} GFLOP/step",
                         f"{row['trainable']:,} trainable; plain {row['plain_step_s']:.2f}s, trace "
                         f"{row['trace_step_s']:.2f}s, prepare {row['prepare_s']:.1f}s"
                         + (f"; rebuilding every W' (fwd+bwd): {row['rebuild_flops_fwd_bwd'] / 1e9:.1f} GFLOP, "
                            "whatever the batch" if "rebuild_flops_fwd_bwd" in row else "")])
        md += (f"\n## ResNet-50 at 224, batch {m['batch']}, fp32 CPU ({m['threads']} threads)\n\n"
               + markdown_table(["measure", "rate", "work", "notes"], rows))
    return md


if __name__ == "__main__":
    main()
