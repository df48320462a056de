"""Worker-side helpers of the distributed stages, on a real two-process gloo group."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.stages import sync_buffers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_buffers(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        bn = nn.BatchNorm1d(3).train()
        bn(torch.randn(8, 3) + 10 * rank)  # each rank updates its running statistics with its own batch
        sync_buffers(bn)
        out[rank] = [b.clone() for b in bn.buffers()]
    finally:
        dist.destroy_process_group()


def test_sync_buffers_gives_every_rank_rank_zeros_batchnorm_statistics():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_buffers, args=(_free_port(), out), nprocs=2)
        zero, one = out[0], out[1]
    assert float(zero[0].abs().max()) < 5  # rank 0's statistics, not rank 1's (shifted by 10)
    for a, b in zip(zero, one, strict=True):
        assert torch.equal(a, b)
