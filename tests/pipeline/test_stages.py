"""Worker-side helpers of the distributed stages, on a real two-process gloo group.

Each rank is its own Python process (not forked from pytest), as Ray Train workers are.
"""

import socket
import subprocess
import sys
from pathlib import Path

import torch

RANK = """
import sys, torch, torch.distributed as dist
from torch import nn
from pipeline.workers import sync_buffers
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
torch.manual_seed(rank)
bn = nn.BatchNorm1d(3).train()
bn(torch.randn(8, 3) + 10 * rank)  # each rank updates its running statistics with its own batch
sync_buffers(bn)
torch.save([b.clone() for b in bn.buffers()], out)
dist.destroy_process_group()
"""


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_sync_buffers_gives_every_rank_rank_zeros_batchnorm_statistics(tmp_path: Path):
    port, root = _free_port(), Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(r), port, str(tmp_path / f"{r}.pt")], cwd=root)
             for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    zero, one = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2))
    assert float(zero[0].abs().max()) < 5  # rank 0's statistics, not rank 1's (shifted by 10)
    for a, b in zip(zero, one, strict=True):
        assert torch.equal(a, b)
