"""Whether a purified model may be registered at all: a run that diverged or wrecked the model must not
take an alias.

The verdict reads only what the defender has: the training history and D_val (the clean set). The
purified model and the suspect are measured on the same D_val samples in the same way (accuracy and
mean cross-entropy), so the comparison needs no trigger, no test data and no attack record. The rules,
in order (the first that fails is the reason):

1. the training loss stayed finite at every step;
2. every weight of the purified model is finite;
3. its D_val cross-entropy is finite and at most ln(K) above the suspect's, K the number of classes
   (ln(K) is the cross-entropy of a uniform guess: a larger rise is worse than knowing nothing);
4. its D_val accuracy fell by at most ``acceptance.max_dval_acc_drop`` (:class:`AcceptanceSettings`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from fip.io import LoadedModel
from fip.tasks import task_named
from pipeline.config import AcceptanceSettings
from pipeline.shards import ShardSource, read_all
from pipeline.transforms import model_input


class PurificationRejected(ValueError):
    """The purified model failed the acceptance check; it was neither registered nor given an alias."""


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    metrics: dict[str, float]

    def tags(self) -> dict[str, str]:
        """The run's MLflow tags: the verdict and, when refused, why."""
        return {"acceptance": "passed" if self.passed else "rejected", "acceptance_reason": self.reason[:500]}


@torch.no_grad()
def dval_fit(loaded: LoadedModel, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy and mean negative log-likelihood (cross-entropy) of a model on D_val samples, per its task
    (:mod:`fip.tasks`: an image's class, a sequence's next tokens), on the CPU (on a copy: the caller's model
    stays where it is). The model is loaded as :func:`pipeline.suspect.load_suspect` loads it: it
    normalises its ``[0, 1]`` inputs itself."""
    model: nn.Module = copy.deepcopy(loaded.model).cpu().eval()
    task = task_named(loaded.spec.task)
    correct, scored, nll = 0, 0, 0.0
    for i in range(0, len(y), 256):
        yb = y[i : i + 256]
        logits = model(model_input(x[i : i + 256])).float()
        nll += float(task.per_sample_nll(logits, yb).sum())
        hits, count = task.hits(logits, yb)
        correct, scored = correct + hits, scored + count
    return {"acc": correct / max(scored, 1), "ce": nll / len(y)}


def _diverged_step(history: Iterable[dict]) -> dict | None:
    return next((rec for rec in history if any(isinstance(v, float) and not math.isfinite(v)
                                               for k, v in rec.items() if k != "step")), None)


def _non_finite_weight(model: nn.Module) -> str | None:
    return next((name for name, t in model.state_dict().items()
                 if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def judge_purified(suspect: LoadedModel, purified: LoadedModel, clean: ShardSource, settings: AcceptanceSettings,
                   history: Iterable[dict] = (), skip_corrupt: bool = False) -> Verdict:
    """The verdict on `purified` (see the module docstring); its metrics are the D_val measurements made. Both
    models as :func:`pipeline.suspect.load_suspect` loads them; D_val read once, leaving out malformed
    samples when the job does (`skip_corrupt`)."""
    bad = _diverged_step(history)
    if bad is not None:
        terms = ", ".join(f"{k} {v}" for k, v in bad.items() if k != "step")
        return Verdict(False, f"the training loss diverged at step {bad.get('step')} ({terms})", {})
    name = _non_finite_weight(purified.model)
    if name is not None:
        return Verdict(False, f"the purified weights left the finite range (NaN or infinite values in {name})", {})
    x, y, _ = read_all(clean, limit=settings.dval_samples, skip_corrupt=skip_corrupt)
    before, after = dval_fit(suspect, x, y), dval_fit(purified, x, y)
    metrics = {"dval_acc_suspect": before["acc"], "dval_ce_suspect": before["ce"],
               "dval_acc_purified": after["acc"], "dval_ce_purified": after["ce"]}
    chance = math.log(purified.spec.num_classes)
    measured = f"D_val ({min(clean.total, settings.dval_samples or clean.total)} samples)"
    if not math.isfinite(after["ce"]) or after["ce"] > before["ce"] + chance:
        return Verdict(False, f"the loss diverged: cross-entropy on {measured} rose from {before['ce']:.4g} to "
                              f"{after['ce']:.4g}, more than ln({purified.spec.num_classes}) = {chance:.2f} above the "
                              "suspect's (worse than a uniform guess)", metrics)
    drop = before["acc"] - after["acc"]
    if drop > settings.max_dval_acc_drop:
        return Verdict(False, f"accuracy on {measured} collapsed from {100 * before['acc']:.1f} % to "
                              f"{100 * after['acc']:.1f} %, a drop of more than acceptance.max_dval_acc_drop = "
                              f"{settings.max_dval_acc_drop:g}", metrics)
    return Verdict(True, f"accuracy on {measured} {100 * before['acc']:.1f} % -> {100 * after['acc']:.1f} %, cross-entropy "
                         f"{before['ce']:.4g} -> {after['ce']:.4g}", metrics)


def rejection(verdict: Verdict) -> PurificationRejected:
    """The one-line error of a refused model."""
    return PurificationRejected(f"purified model rejected, not registered: {verdict.reason}")
