"""The defender's sweep objective: what a purified model looks like on held-out clean data, scored
without the trigger.

A sweep must choose among purified models without poisoned data (docs/paper.md, "Evaluation
protocol"). Everything here reads a held-out, class-balanced share of D_val that no trial trains on
(:mod:`tuning.holdout`) and the suspect model itself; nothing reads test data or an attack record.
docs/tuning.md gives the formula and the reasons for each term.

- :func:`measure` turns one model into the features the defender can see: held-out accuracy, top-1
  agreement and KL divergence to the suspect's predictions, and ``Tr(F)`` (the paper's curvature)
  on the held-out images.
- :func:`score` combines them, relative to the suspect's own features, into one number to maximise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fip.fisher import squared_grad_sums, trainable_params
from lab.metrics import accuracy_from_predictions


@dataclass(frozen=True)
class ObjectiveWeights:
    """Weights of :func:`score`; the defaults and their reasons are in docs/tuning.md.

    The defaults spend the accuracy budget on moving away from the suspect: held-out accuracy lost
    within `acc_budget` costs little, beyond it a lot, and KL to the suspect's predictions is the
    credit. They replaced :data:`A_PRIORI_WEIGHTS` after the first validation sweep (Blend) showed
    the curvature term pointing the wrong way (docs/tuning.md, "Validation")."""

    acc: float = 0.5  # per unit of held-out accuracy lost (the ACC term of DER, as measured on held-out data)
    acc_budget: float = 0.03  # the ACC drop the target allows; held-out noise is about 2 points
    acc_excess: float = 10.0  # extra weight on accuracy lost beyond the budget
    kl: float = 1.0  # per nat of KL(suspect || purified) on held-out images, capped at kl_cap
    kl_cap: float = 1.0
    curvature: float = 0.0  # per unit of -log(Tr F purified / Tr F suspect)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"objective weight {name} must be a finite number >= 0, got {value}")
        if self.kl_cap <= 0:
            raise ValueError(f"objective weight kl_cap must be > 0, got {self.kl_cap}")


# The first weights, set before any validation: flatter than the suspect scores (the paper's reading)
A_PRIORI_WEIGHTS = ObjectiveWeights(acc=1.0, acc_budget=0.02, acc_excess=4.0, kl=0.1, kl_cap=1.0, curvature=0.1)


@dataclass
class Holdout:
    """The defender's held-out clean images (float, [0, 1]) with labels, and the suspect's view of them."""

    x: torch.Tensor
    y: torch.Tensor
    suspect_logits: torch.Tensor
    suspect: dict[str, float]  # the suspect's own features (acc, trace)

    @classmethod
    def from_suspect(cls, suspect: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Holdout:
        if len(x) == 0:
            raise ValueError("the held-out clean set is empty")
        logits = _logits(suspect, x)
        holdout = cls(x, y, logits, {})
        holdout.suspect = {"acc": accuracy_from_predictions(logits.argmax(1), y), "trace": fisher_trace(suspect, x, y)}
        return holdout


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
    model.train(was)
    return out


def fisher_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """``Tr(F)``: mean over samples of the squared per-sample score norm (empirical Fisher, true labels),
    over all weights, model in eval mode; the quantity FIP's trace term lowers (docs/method.md)."""
    params = {n: p for n, p in model.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    sums = squared_grad_sums(model, x, y, "empirical", trainable_params(model))
    return float(sum(t.sum() for t in sums.values())) / len(x)


def measure(model: nn.Module, holdout: Holdout) -> dict[str, float]:
    """The features of one purified model on the held-out clean images (no trigger, no test data)."""
    logits = _logits(model, holdout.x)
    pred, ref = logits.argmax(1), holdout.suspect_logits.argmax(1)
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(holdout.suspect_logits, 1), log_target=True,
                  reduction="batchmean")
    trace = fisher_trace(model, holdout.x, holdout.y)
    return {"holdout_acc": accuracy_from_predictions(pred, holdout.y),
            "agreement": float((pred == ref).float().mean()),
            "kl_to_suspect": float(kl),
            "holdout_trace": trace,
            "trace_ratio": trace / max(holdout.suspect["trace"], 1e-12)}


def score(features: dict[str, float], suspect: dict[str, float], w: ObjectiveWeights = ObjectiveWeights()) -> float:
    """The objective to maximise: accuracy kept, minus the price of accuracy lost, plus credit for moving
    away from the suspect in function space and towards a flatter minimum (docs/tuning.md)."""
    drop = suspect["acc"] - features["holdout_acc"]
    acc_term = -w.acc * max(0.0, drop) - w.acc_excess * max(0.0, drop - w.acc_budget)
    move = w.kl * min(features["kl_to_suspect"], w.kl_cap) / w.kl_cap
    flat = -w.curvature * math.log(max(features["trace_ratio"], 1e-12))
    return acc_term + move + flat


def evaluate_objective(model: nn.Module, holdout: Holdout, w: ObjectiveWeights = ObjectiveWeights()) -> dict[str, float]:
    """:func:`measure` plus its :func:`score` as ``objective``."""
    feats = measure(model, holdout)
    return {**feats, "objective": score(feats, holdout.suspect, w)}
