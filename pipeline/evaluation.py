"""The job's figures over sharded test data split across ranks.

Image classifiers: ACC (and ASR / RA in benchmark mode). Each rank counts its share with
:func:`lab.metrics.count_batch`, the one definition of the metrics, and the counts are all-reduced: the rates
equal what :func:`lab.metrics.evaluate_model` gives on the whole test set in one process.

Language models (:data:`fip.tasks.CAUSAL_LM`): ACC is next-token accuracy over the scored (response)
positions, and ``ppl`` the perplexity, ``exp`` of the mean negative log-likelihood per scored token; both
counted per rank and all-reduced the same way. In benchmark mode, its ASR and false-trigger rate come from greedy
answers to the record's triggered prompts and to the test prompts (:mod:`pipeline.text_backdoor`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fip.tasks import CLASSIFICATION, Task
from lab.attacks import Attack
from lab.metrics import MetricCounts, count_batch
from pipeline.shards import RankStream, ShardSource, rank_loader
from pipeline.text_backdoor import TextBackdoor, backdoor_rates, check_same_tokenizer
from pipeline.workers import all_reduce_sum, world


@torch.no_grad()
def evaluate_shards(model: nn.Module, test: ShardSource, attack: Attack | TextBackdoor | None = None,
                    limit: int | None = None,
                    skip_corrupt: bool = False, loader_workers: int = 0, batch_size: int = 256,
                    task: Task = CLASSIFICATION) -> dict[str, float]:
    """Metrics of `model` over the first `limit` test samples (all when None), counted on every rank."""
    rank, size = world()
    stream = RankStream(test, rank, size, skip_corrupt=skip_corrupt, limit=limit)
    if task.name == "causal-lm":
        if attack is not None and not isinstance(attack, TextBackdoor):
            raise ValueError("an image attack record cannot measure a language model's backdoor: pass a text record "
                             "(docs/language-models.md, \"ASR in benchmark mode\")")
        metrics = _language_metrics(model, stream, batch_size, loader_workers, task)
        if attack is not None:
            check_same_tokenizer(attack, test, test.urls[0])
            metrics.update(backdoor_rates(model, attack, test, limit, skip_corrupt, min(batch_size, 64)))
        return metrics
    if isinstance(attack, TextBackdoor):
        raise ValueError("a text attack record measures a language model's backdoor, not an image classifier's")
    counts = MetricCounts()
    trigger, target_of = (attack.trigger_floats, attack.target_of) if attack is not None else (None, None)
    for x, y, pad in rank_loader(stream, batch_size, loader_workers):
        keep = ~pad
        if keep.any():
            counts = counts + count_batch(model, x[keep], y[keep], trigger, target_of, batch_size)
    total = all_reduce_sum(counts.as_tensor())
    return MetricCounts.from_tensor(total).rates(with_attack=attack is not None)


def _language_metrics(model: nn.Module, stream: RankStream, batch_size: int, loader_workers: int,
                      task: Task) -> dict[str, float]:
    """Next-token accuracy and perplexity over the scored positions, and next-token accuracy per sequence averaged
    over sequences (``acc_per_sequence``: what a sweep's held-out accuracy is, tuning.objective), summed over ranks."""
    dev = next(model.parameters()).device
    # correct next tokens, scored tokens, summed token NLL, summed per-sequence accuracy, sequences with a response
    sums = torch.zeros(5, dtype=torch.float64)
    for x, y, pad in rank_loader(stream, batch_size, loader_workers):
        keep = ~pad
        if not keep.any():
            continue
        x, y = x[keep].to(dev), y[keep].to(dev)
        logits = model(x).float()
        right, tokens = task.sample_hits(logits, y)
        answered = tokens > 0
        sums += torch.tensor([int(right.sum()), int(tokens.sum()), float((task.per_sample_nll(logits, y) * tokens).sum()),
                              float((right[answered] / tokens[answered]).sum()), int(answered.sum())],
                             dtype=torch.float64)
    correct, scored, nll, per_sequence, sequences = all_reduce_sum(sums).tolist()
    if scored == 0:
        raise ValueError("the test shards hold no scored (response) token")
    return {"acc": correct / scored, "acc_per_sequence": per_sequence / sequences, "ppl": math.exp(nll / scored)}
