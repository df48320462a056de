"""ACC (and ASR / RA in benchmark mode) over sharded test data split across ranks.

Each rank counts its share with :func:`lab.metrics.count_batch`, the one definition of the
metrics, and the counts are all-reduced: the rates equal what :func:`lab.metrics.evaluate_model`
gives on the whole test set in one process.
"""

from __future__ import annotations

import torch
from torch import nn

from lab.attacks import Attack
from lab.metrics import MetricCounts, count_batch
from pipeline.shards import RankStream, ShardSource, rank_loader
from pipeline.workers import all_reduce_sum, world


@torch.no_grad()
def evaluate_shards(model: nn.Module, test: ShardSource, attack: Attack | None = None, limit: int | None = None,
                    skip_corrupt: bool = False, loader_workers: int = 0, batch_size: int = 256) -> dict[str, float]:
    """Metrics of `model` over the first `limit` test samples (all when None), counted on every rank."""
    rank, size = world()
    stream = RankStream(test, rank, size, skip_corrupt=skip_corrupt, limit=limit)
    counts = MetricCounts()
    trigger, target_of = (attack.trigger_floats, attack.target_of) if attack is not None else (None, None)
    for x, y, pad in rank_loader(stream, batch_size, loader_workers):
        keep = ~pad
        if keep.any():
            counts = counts + count_batch(model, x[keep], y[keep], trigger, target_of, batch_size)
    total = all_reduce_sum(counts.as_tensor())
    return MetricCounts.from_tensor(total).rates(with_attack=attack is not None)
