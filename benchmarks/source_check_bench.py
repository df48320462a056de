"""What checking each source image as it is written costs `fip shard`, measured side by side in one run.

A source JPEG, PNG or WebP goes into a shard byte for byte; since issue 22 the writer also decodes it
(:func:`pipeline.shard_tasks.decode_all`: a JPEG at its smallest DCT scale), so a truncated or corrupt
file is left out and named at write time instead of failing a reader later. Timed per image on
ImageNet-shaped synthetic JPEGs, one process, interleaved (A, B, A, B, ...), best of `--repeat`:

- header only (what the writer did before: read the file, sniff the type, read the size);
- header + the check (what it does now);
- a full decode, for scale (what every reader does once per epoch).

    python -m benchmarks.source_check_bench [--images 1000] [--size 224]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from benchmarks.common import markdown_table, write_results
from benchmarks.scale_bench import synthetic_imagenet
from lab.backdoor import versions
from pipeline.shard_tasks import decode_all
from pipeline.shardfmt import sniff


def _header(data: bytes) -> None:
    sniff(data)
    with Image.open(io.BytesIO(data)) as im:
        im.size  # noqa: B018 (what the writer read before)


def _checked(data: bytes) -> None:
    sniff(data)
    with Image.open(io.BytesIO(data)) as im:
        im.size  # noqa: B018
        decode_all(im)


def _full(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as im:
        im.convert("RGB")


def _ms_per_image(fn: Callable[[bytes], None], files: list[Path]) -> float:
    start = time.perf_counter()
    for f in files:
        fn(f.read_bytes())
    return (time.perf_counter() - start) / len(files) * 1e3


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=224, help="typical image side")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fip-source-check-") as tmp:
        root = synthetic_imagenet(Path(tmp), args.images, classes=10, size=args.size)
        files = sorted((root / "train").rglob("*.JPEG"))
        ways = {"header only (before)": _header, "header + check (now)": _checked, "full decode (a reader)": _full}
        best = {name: float("inf") for name in ways}
        for _ in range(args.repeat):
            for name, fn in ways.items():
                best[name] = min(best[name], _ms_per_image(fn, files))
    base = best["header only (before)"]
    rows = [[name, round(ms, 3), round(ms / base, 2)] for name, ms in best.items()]
    payload = {"images": args.images, "size": args.size, "repeat": args.repeat, "ms_per_image": best,
               "versions": versions()}
    md = (f"# Checking source images while writing shards\n\n`python -m benchmarks.source_check_bench`: "
          f"{args.images} synthetic JPEGs, sides {int(0.8 * args.size)}-{int(1.3 * args.size)} px, one process, "
          f"best of {args.repeat}, interleaved.\n\n"
          + markdown_table(["per image", "ms", "x header only"], rows))
    write_results("source_check", payload, md)
    print(md)
    return payload


if __name__ == "__main__":
    main()
