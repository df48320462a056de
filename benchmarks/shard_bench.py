"""Shard read throughput (samples/s), measured side by side: in-memory tensors vs local tar shards vs
the same shards on an S3 endpoint on loopback (moto's server, started here).

    python -m benchmarks.shard_bench [--samples 10000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from benchmarks.common import markdown_table, write_results
from lab.backdoor import versions
from lab.datasets import load_dataset
from pipeline.shard_writer import write_shards
from pipeline.shards import RankStream, open_shards, rank_loader
from pipeline.storage import Storage, StorageSettings


def _rate(fn, n: int) -> float:
    t = time.perf_counter()
    count = fn()
    assert count == n, (count, n)
    return n / (time.perf_counter() - t)


def stream_count(spec: str, store: Storage | None = None, batch: int = 256) -> int:
    return sum(len(y) for _, y, _ in rank_loader(RankStream(open_shards(spec, store), 0, 1), batch))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10000)
    args = p.parse_args(argv)
    data = load_dataset("fashion-mnist", "test").subset(range(args.samples))
    tmp = tempfile.mkdtemp(prefix="fip-shard-bench-")
    local = os.path.join(tmp, "local")
    write_shards(data, local, maxcount=1000)

    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # moto accepts any credentials; boto3 reads them from the environment, as it would real ones
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    store = Storage(StorageSettings(s3_endpoint=f"http://127.0.0.1:{port}"))
    store.s3_client().create_bucket(Bucket="bench")
    write_shards(data, "s3://bench/fmnist", maxcount=1000, store=store)
    try:
        x = data.floats()

        def in_memory() -> int:
            n = 0
            for i in range(0, len(x), 256):
                batch = x[i : i + 256].clone()
                n += len(batch)
            return n

        rates = {
            "in-memory": _rate(in_memory, args.samples),
            "local shards": _rate(lambda: stream_count(local), args.samples),
            "S3 shards (loopback)": _rate(lambda: stream_count("s3://bench/fmnist", store), args.samples),
        }
    finally:
        server.stop()
    rows = [[k, f"{v:,.0f}", f"{rates['local shards'] / v:.3f}"] for k, v in rates.items()]
    md = (f"# Shard read throughput ({args.samples} Fashion-MNIST images, PNG in tar, 1 reader, "
          f"{torch.get_num_threads()} threads)\n\n" + markdown_table(["source", "samples/s", "local / this"], rows))
    write_results("shards", {"samples": args.samples, "rates": rates, "versions": versions()}, md)
    print(md)
    return rates


if __name__ == "__main__":
    main()
