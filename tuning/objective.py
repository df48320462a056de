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

A language model is scored the same way, per sample (:mod:`fip.tasks`: one sample is one sequence): accuracy
is each held-out sequence's next-token accuracy on its response, averaged over sequences, so a short answer
counts as much as a long block of text; agreement and KL are per scored position, ``Tr(F)`` is per sequence,
and the probe inserts a few tokens instead of adding a perturbation (:mod:`tuning.text_probe`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from fip.fisher import squared_grad_sums, trainable_params
from fip.tasks import CLASSIFICATION, Task


@dataclass(frozen=True)
class ObjectiveWeights:
    """Weights of :func:`score`; the defaults and their reasons are in docs/tuning.md.

    The defaults make the objective an estimate of DER (2 * DER - 1 = ASR removed - ACC lost): the
    held-out accuracy lost stands for the ACC term, and `uap_max`, the share of held-out images one
    small shared perturbation sends to a single class, for the ASR left. Pre-registered (commit c20076b)
    after the first eight sweeps, they chose better than :data:`KL_BUDGET_WEIGHTS` on eight fresh ones
    (docs/tuning.md, "Round 2")."""

    acc: float = 1.0  # per unit of held-out accuracy lost (the ACC term of DER, as measured on held-out data)
    acc_budget: float = 0.0  # accuracy lost up to this costs only `acc`; beyond it `acc + acc_excess`
    acc_excess: float = 0.0  # extra weight on accuracy lost beyond the budget
    kl: float = 0.0  # per nat of KL(suspect || purified) on held-out images, capped at kl_cap
    kl_cap: float = 1.0
    curvature: float = 0.0  # per unit of -log(Tr F purified / Tr F suspect)
    uap: float = 1.0  # per unit of `uap_max` (universal_flip); 0: not measured, not scored

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"objective weight {name} must be a finite number >= 0, got {value}")
        if self.kl_cap <= 0:
            raise ValueError(f"objective weight kl_cap must be > 0, got {self.kl_cap}")


    def with_flags(self, pairs: list[str]) -> ObjectiveWeights:
        """These weights with `NAME=VALUE` changes (`fip tune --objective-weight uap=0.5`)."""
        known = asdict(self)
        changed = dict(known)
        for pair in pairs:
            name, sep, value = pair.partition("=")
            if not sep or name.strip() not in known:
                raise ValueError(f"--objective-weight expects NAME=VALUE with NAME one of {', '.join(known)}, "
                                 f"got {pair!r}")
            try:
                changed[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"--objective-weight {name.strip()}: expected a number, got {value!r}") from None
        return ObjectiveWeights(**changed)


# The first weights, set before any validation: flatter than the suspect scores (the paper's reading)
A_PRIORI_WEIGHTS = ObjectiveWeights(acc=1.0, acc_budget=0.02, acc_excess=4.0, kl=0.1, kl_cap=1.0, curvature=0.1,
                                    uap=0.0)
# The defaults of the first eight sweeps: spend a 3-point accuracy budget on moving away from the
# suspect's predictions (KL as the credit). Fresh 300-iteration sweeps showed them keeping the backdoor
# on LC and Trojan, where the trials closest to the suspect keep the most accuracy (docs/tuning.md)
KL_BUDGET_WEIGHTS = ObjectiveWeights(acc=0.5, acc_budget=0.03, acc_excess=10.0, kl=1.0, kl_cap=1.0, uap=0.0)
# The first candidate with the universal-perturbation term (KL_BUDGET_WEIGHTS plus half a `uap_max`)
UAP_CANDIDATE_WEIGHTS = replace(KL_BUDGET_WEIGHTS, uap=0.5)
# The other weightings benchmarks/tuned_table.py reports beside the default objective, by name
CANDIDATE_WEIGHTS = {"kl-budget": KL_BUDGET_WEIGHTS, "uap-half": UAP_CANDIDATE_WEIGHTS}
# Radius of universal_flip's perturbation, as a share of the held-out images' mean L2 norm (docs/tuning.md)
UAP_RELATIVE_RADIUS = 0.06


@dataclass
class Holdout:
    """The defender's held-out clean samples (images: float, [0, 1], with labels; text: token ids with their
    aligned labels), and the suspect's view of them: its logits at every scored prediction."""

    x: torch.Tensor
    y: torch.Tensor
    suspect_logits: torch.Tensor  # (predictions, classes): one row per image, or per scored token of the responses
    suspect: dict[str, float]  # the suspect's own features (acc, trace)
    task: Task = CLASSIFICATION
    suspect_samples: dict[str, str] = field(default_factory=dict)  # its per-sample record (tuning.stability), encoded

    @classmethod
    def from_suspect(cls, suspect: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task = CLASSIFICATION
                     ) -> Holdout:
        if len(x) == 0:
            raise ValueError("the held-out clean set is empty")
        logits, targets = scored_logits(suspect, x, y, task)
        holdout = cls(x, y, logits, {}, task)
        holdout.suspect = {"acc": sample_accuracy(logits.argmax(1), targets, task.owners(y)),
                           "trace": fisher_trace(suspect, x, y, task)}
        return holdout

    @property
    def samples(self) -> int:
        """How many samples the accuracy averages over (images, or sequences with a response)."""
        return len(self.task.owners(self.y).unique())


def sample_accuracy(pred: torch.Tensor, targets: torch.Tensor, owners: torch.Tensor) -> float:
    """Accuracy per sample, averaged over samples: each sample's share of correct predictions (`owners[i]`: the
    sample prediction `i` belongs to). An image makes one prediction, so this is plain accuracy; a sequence makes
    one per response token, and a sequence weighs the same whatever its length."""
    if len(targets) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    _, owner = owners.unique(return_inverse=True)
    count = torch.zeros(int(owner.max()) + 1).index_add_(0, owner, torch.ones(len(owner)))
    hits = torch.zeros_like(count).index_add_(0, owner, (pred == targets).float())
    return float((hits / count).mean())


@torch.no_grad()
def scored_logits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task = CLASSIFICATION,
                  batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) of every prediction the held-out set scores, one row each: per image, or per scored
    response token of a language model (position t's logits against token t + 1), so accuracy, agreement and
    KL read the same for both tasks. A language model's batch is smaller: its logits hold a whole vocabulary
    per position."""
    was = model.training
    model.eval()
    batch = batch if task == CLASSIFICATION else max(1, batch // 32)
    rows, targets = [], []
    for i in range(0, len(x), batch):
        out, target = task.scored(model(x[i : i + batch]), y[i : i + batch])
        rows.append(out)
        targets.append(target)
    model.train(was)
    return torch.cat(rows), torch.cat(targets)


def fisher_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task = CLASSIFICATION) -> float:
    """``Tr(F)``: mean over samples (sequences) of the squared per-sample score norm (empirical Fisher, true
    labels), over all weights, model in eval mode; the quantity FIP's trace term lowers (docs/method.md)."""
    params = {n: p for n, p in model.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    sums = squared_grad_sums(model, x, y, "empirical", trainable_params(model), task=task)
    return float(sum(t.sum() for t in sums.values())) / len(x)


def measure(model: nn.Module, holdout: Holdout) -> dict[str, float]:
    """The features of one purified model on the held-out clean samples (no trigger, no test data)."""
    logits, targets = scored_logits(model, holdout.x, holdout.y, holdout.task)
    pred, ref = logits.argmax(1), holdout.suspect_logits.argmax(1)
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(holdout.suspect_logits, 1), log_target=True,
                  reduction="batchmean")
    trace = fisher_trace(model, holdout.x, holdout.y, holdout.task)
    return {"holdout_acc": sample_accuracy(pred, targets, holdout.task.owners(holdout.y)),
            "agreement": float((pred == ref).float().mean()),
            "kl_to_suspect": float(kl),
            "holdout_trace": trace,
            "trace_ratio": trace / max(holdout.suspect["trace"], 1e-12)}


def uap_radius(x: torch.Tensor, relative: float = UAP_RELATIVE_RADIUS) -> float:
    """The perturbation norm for `universal_flip`: a share of the images' mean L2 norm, so it means the same
    for any image size and scale."""
    return relative * float(x.flatten(1).norm(dim=1).mean())


def universal_flip(model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: float, steps: int = 10) -> dict:
    """How easily one shared perturbation sends held-out images to a single class: per class `c`, one
    perturbation of L2 norm <= `radius` is fitted to all held-out images of other classes by normalised
    gradient ascent on their mean log p(c); the result is the share it sends to `c`.

    A backdoor is exactly such a perturbation (its trigger sends nearly every input to the target), so a
    model that still carries one should have a class far easier to reach than the others. Reads no
    trigger: the defender's diagnostic, reported beside the objective (docs/tuning.md).

    Also returns every class's share (``uap_rates``), which image each class's perturbation moved
    (``uap_hits``, classes x images) and which images counted (``uap_eligible``: an image of class `c` is never
    counted for `c`), so the held-out images can be resampled without probing again (:mod:`tuning.stability`)."""
    was = model.training
    model.eval()
    trainable = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # gradients for the perturbation only
    try:
        with torch.no_grad():
            classes = model(x[:1]).shape[1]
        others = [torch.nonzero(y != c).flatten() for c in range(classes)]
        owner = torch.cat([torch.full((len(i),), c) for c, i in enumerate(others)])
        inputs = torch.cat([x[i] for i in others])
        delta = torch.zeros(classes, *x.shape[1:], requires_grad=True)
        lr = 2.5 * radius / steps
        for _ in range(steps):
            logp = F.log_softmax(model((inputs + delta[owner]).clamp(0, 1)), 1)
            (grad,) = torch.autograd.grad(logp[torch.arange(len(owner)), owner].sum(), delta)
            with torch.no_grad():
                shape = (classes,) + (1,) * (x.dim() - 1)
                delta += lr * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
                delta *= (radius / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(shape)
        with torch.no_grad():
            hit = scored_logits(model, (inputs + delta[owner]).clamp(0, 1), owner)[0].argmax(1) == owner
        rates = torch.stack([hit[owner == c].float().mean() for c in range(classes)])
        hits = torch.zeros(classes, len(x), dtype=torch.bool)
        hits[owner, torch.cat(others)] = hit
        eligible = y[None, :] != torch.arange(classes)[:, None]
    finally:
        for p, flag in zip(model.parameters(), trainable, strict=True):
            p.requires_grad_(flag)
        model.train(was)
    return {"uap_max": float(rates.max()), "uap_class": int(rates.argmax()), "uap_median": float(rates.median()),
            "uap_rates": rates.tolist(), "uap_hits": hits, "uap_eligible": eligible}


def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task = CLASSIFICATION) -> dict:
    """The task's trigger-free probe: a universal perturbation for images (:func:`universal_flip`), a few
    inserted soft tokens for a language model (:func:`tuning.text_probe.insertion_flip`)."""
    if task == CLASSIFICATION:
        return universal_flip(model, x, y, uap_radius(x))
    from tuning.text_probe import insertion_flip

    return insertion_flip(model, x, y)


def score(features: dict[str, float], suspect: dict[str, float], w: ObjectiveWeights = ObjectiveWeights()) -> float:
    """The objective to maximise: accuracy kept, minus the price of accuracy lost, plus credit for moving
    away from the suspect in function space and towards a flatter minimum, minus how easily one shared
    perturbation still sends images to a single class (docs/tuning.md)."""
    drop = suspect["acc"] - features["holdout_acc"]
    acc_term = -w.acc * max(0.0, drop) - w.acc_excess * max(0.0, drop - w.acc_budget)
    move = w.kl * min(features["kl_to_suspect"], w.kl_cap) / w.kl_cap
    flat = -w.curvature * math.log(max(features["trace_ratio"], 1e-12))
    universal = -w.uap * features["uap_max"] if w.uap else 0.0
    return acc_term + move + flat + universal


def evaluate_probed(model: nn.Module, holdout: Holdout, w: ObjectiveWeights = ObjectiveWeights()
                    ) -> tuple[dict[str, float], dict | None]:
    """:func:`evaluate_objective`, and the probe's whole result beside it (None when the probe is not weighted):
    a report can read every target's rate, which the features leave out."""
    feats, found = measure(model, holdout), None
    if w.uap:  # the probe costs about as much as a short fine-tune: only when it is scored
        found = probe(model, holdout.x, holdout.y, holdout.task)
        feats.update({"uap_max": found["uap_max"], "uap_class": found["uap_class"]})
    return {**feats, "objective": score(feats, holdout.suspect, w)}, found


def evaluate_objective(model: nn.Module, holdout: Holdout, w: ObjectiveWeights = ObjectiveWeights()) -> dict[str, float]:
    """:func:`measure` plus its :func:`score` as ``objective``."""
    return evaluate_probed(model, holdout, w)[0]
