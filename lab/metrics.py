"""ACC, ASR, RA and DER, one definition each, used by the lab, the pipeline and the benchmark.

- ACC: top-1 accuracy on the clean test set.
- ASR: among triggered test images **whose true class is not the target**, the fraction classified
  as the target (all-to-one); for all-to-all every image counts and its target is ``(y+1) mod K``.
- RA: accuracy of those same triggered images against their true labels.
- DER = ``[max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2``
  (BackdoorBench's own function adds the ACC term: a known bug we do not copy).
"""

from __future__ import annotations

from collections.abc import Callable

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


def evaluate_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Callable[[torch.Tensor], torch.Tensor] | None = None,
    target_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 512,
) -> dict[str, float]:
    """ACC on (x, y) float images; with a trigger and its target map, also ASR and RA."""
    out = {"acc": accuracy_from_predictions(predict(model, x, batch_size), y)}
    if trigger is not None and target_of is not None:
        targets = target_of(y)
        mask = backdoor_mask(y, targets)
        triggered = torch.cat([trigger(x[mask][i : i + batch_size]) for i in range(0, int(mask.sum()), batch_size)])
        preds = predict(model, triggered, batch_size)
        out["asr"] = float((preds == targets[mask]).float().mean())
        out["ra"] = float((preds == y[mask]).float().mean())
    return out
