"""Worker plumbing shared by every stage: rank and collectives, device, progress lines, DDP, and
Ray Train's report / checkpoint / restore, all of which degrade to no-ops in a single process.

A stage written with these runs unchanged inside a Ray Train worker, in ``ScalingConfig(num_workers=0)``
local mode, or called directly in a test.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.artifacts import CheckpointOutput


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t, src)
    return t


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts them only at the start of each forward, so after the last step every rank holds
    statistics updated with its own batch. Each rank evaluates its share of the test shards, so
    without this the reported metrics mix models that differ from the one rank 0 saves.
    """
    for buf in model.buffers():
        broadcast_(buf)


def log(msg: str) -> None:
    """A progress line from rank 0 only (Ray forwards worker stdout to the driver)."""
    if world()[0] == 0:
        print(f"[fip] {msg}", flush=True)


def device() -> torch.device:
    """This worker's device (Ray Train assigns a GPU when the job asks for one)."""
    if in_ray_train():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def in_ray_train() -> bool:
    """Whether this code runs inside a Ray Train worker (else: in-process use, no reporting)."""
    try:
        import ray.train

        ray.train.get_context()
        return True
    except Exception:  # ImportError, or Ray's error for "not in a training session"
        return False


def wrap_ddp(model: nn.Module) -> nn.Module:
    """``ray.train.torch.prepare_model`` (DDP) with several workers; else the model itself."""
    if world()[1] <= 1:
        return model
    import ray.train.torch

    return ray.train.torch.prepare_model(model, move_to_device=False)


def report(metrics: dict, files: dict[str, bytes] | None = None) -> None:
    """``ray.train.report`` on every rank (the same number of calls); rank 0 attaches `files` as the checkpoint."""
    if not in_ray_train():
        return
    import ray.train
    from ray.train import Checkpoint

    if files is not None and world()[0] == 0:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def checkpoint(output: CheckpointOutput, metrics: dict) -> None:
    """A resumable checkpoint (torch state, this run's own tensors, and JSON logs) from rank 0, reported with
    `metrics` on every rank."""
    report(metrics, output.files() if world()[0] == 0 else None)


def restore() -> tuple[dict, dict] | None:
    """The latest checkpoint's (state, logs) on every rank, or None on a fresh start."""
    if not in_ray_train():
        return None
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        saved = CheckpointOutput.read(d)
    return (saved.state, saved.logs) if saved is not None else None
