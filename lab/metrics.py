"""ACC, ASR, RA and DER, one definition each, used by the lab, the defenses' benchmark and the pipeline.

:func:`count_batch` counts one batch (hits and totals); :class:`MetricCounts` adds up, so the same
definition serves an in-memory test set (:func:`evaluate_model`) and a sharded one split across
ranks (``pipeline.evaluation``, which all-reduces the counts).

- ACC: top-1 accuracy on the clean test set.
- ASR: among triggered test images **whose true class is not the target**, the fraction classified
  as the target (all-to-one); for all-to-all every image counts and its target is ``(y+1) mod K``.
- RA: accuracy of those same triggered images against their true labels.
- DER = ``[max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2``
  (BackdoorBench's own function adds the ACC term: a known bug we do not copy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Arg-max predictions for float inputs, in eval mode, batched."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy_from_predictions(preds: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((preds == labels).float().mean())


def backdoor_mask(labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Which triggered images count for ASR/RA: those whose true class differs from their target."""
    return labels != targets


def attack_success_rate_from_predictions(preds: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> float:
    mask = backdoor_mask(labels, targets)
    if not mask.any():
        raise ValueError("no triggered test image has a true class other than the target")
    return float((preds[mask] == targets[mask]).float().mean())


def robust_accuracy_from_predictions(preds: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> float:
    mask = backdoor_mask(labels, targets)
    if not mask.any():
        raise ValueError("no triggered test image has a true class other than the target")
    return float((preds[mask] == labels[mask]).float().mean())


def defense_effectiveness_rating(acc_before: float, asr_before: float, acc_after: float, asr_after: float) -> float:
    """DER in [0, 1]; 0.5 means no change, 1 means ASR fell by 100 points at no ACC cost."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1) / 2


COUNT_FIELDS = ("correct", "total", "attack_hits", "robust_hits", "attack_total")


@dataclass
class MetricCounts:
    """Hits and totals behind ACC, ASR and RA; counts from disjoint batches (or ranks) add up exactly."""

    correct: float = 0.0
    total: float = 0.0
    attack_hits: float = 0.0  # triggered non-target images sent to their target
    robust_hits: float = 0.0  # ... classified as their true class
    attack_total: float = 0.0

    def __add__(self, other: MetricCounts) -> MetricCounts:
        return MetricCounts(*(getattr(self, f) + getattr(other, f) for f in COUNT_FIELDS))

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([getattr(self, f) for f in COUNT_FIELDS], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> MetricCounts:
        return cls(*(float(v) for v in t.tolist()))

    def rates(self, with_attack: bool) -> dict[str, float]:
        """ACC, and ASR/RA when an attack was measured."""
        if self.total == 0:
            raise ValueError("accuracy of an empty set is undefined")
        out = {"acc": self.correct / self.total}
        if with_attack:
            if self.attack_total == 0:
                raise ValueError("no triggered test image has a true class other than the target")
            out["asr"] = self.attack_hits / self.attack_total
            out["ra"] = self.robust_hits / self.attack_total
        return out


def count_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Callable[[torch.Tensor], torch.Tensor] | None = None,
    target_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 512,
) -> MetricCounts:
    """Counts for one batch of float images: clean hits, and with a trigger the attack and robust hits."""
    counts = MetricCounts(correct=float((predict(model, x, batch_size) == y.cpu()).sum()), total=float(len(y)))
    if trigger is not None and target_of is not None:
        y = y.cpu()
        targets = target_of(y)
        mask = backdoor_mask(y, targets)
        if mask.any():
            preds = predict(model, trigger(x.cpu()[mask]), batch_size)
            counts.attack_hits = float((preds == targets[mask]).sum())
            counts.robust_hits = float((preds == y[mask]).sum())
            counts.attack_total = float(mask.sum())
    return counts


def evaluate_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Callable[[torch.Tensor], torch.Tensor] | None = None,
    target_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 512,
) -> dict[str, float]:
    """ACC on (x, y) float images; with a trigger and its target map, also ASR and RA."""
    counts = MetricCounts()
    for i in range(0, len(x), batch_size):
        counts = counts + count_batch(model, x[i : i + batch_size], y[i : i + batch_size], trigger, target_of,
                                      batch_size)
    return counts.rates(with_attack=trigger is not None and target_of is not None)
