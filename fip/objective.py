"""The FIP objective (docs/paper.md, "The objective"):

    L(theta) = CE(theta; D_val)
             + eta_F * Tr(F(theta))                                   # backdoor suppressor
             + (eta_r / 2) * sum_i Fbar_ii (theta_i - theta_b,i)^2    # clean-distribution regulariser

``Tr(F(theta)) = E ||grad_theta log p(y|x; theta)||^2`` is the mean *per-sample* squared score norm.
Three differentiable estimators of it are provided, all of the per-sample quantity (none is the
biased squared norm of the batch-mean gradient, whose cross terms ``g_i . g_j`` do not vanish):

- ``exact``: per-sample gradients (vmap over grad, loop fallback), squared and averaged; the
  definition itself, B gradient evaluations plus a double backward.
- ``signed`` (default): with random signs ``s_i = +-1`` over the *samples*,
  ``E_s ||sum_i s_i g_i||^2 = sum_i ||g_i||^2`` because the cross terms average out. One probe is
  one backward pass of ``sum_i s_i l_i`` with ``create_graph``, so it costs what a gradient-norm
  penalty costs, whatever the batch size; its value and gradient are unbiased and their noise does
  not grow with the number of parameters.
- ``hutchinson``: Rademacher probes ``v`` in *parameter* space, ``E_v (v . g_i)^2 = ||g_i||^2``,
  each ``v . g_i`` from one forward-mode JVP. Unbiased too, but ``||v||^2`` equals the number of
  parameters, so the gradient of the estimate is very noisy on large models (on the lab's
  PreActResNet-18 it diverged at eta_F = 1e-3); kept for small models and comparison.

All are taken with the model in eval mode so each sample's score is its own. A sample's
``log p(y|x)`` is the task's (:mod:`fip.tasks`): for a language model, one sequence's mean over its
response tokens, so every term works per sequence.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, jvp

from fip.fisher import (
    FisherKind,
    Params,
    eval_mode,
    per_sample_grads_loop,
    per_sample_grads_vmap,
    sample_labels,
    trainable_params,
)
from fip.kernels import differentiable_attention
from fip.tasks import CLASSIFICATION, Task

TraceEstimator = Literal["exact", "signed", "hutchinson"]


def trace_penalty_exact(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: FisherKind = "empirical", generator=None,
    task: Task = CLASSIFICATION,
) -> torch.Tensor:
    """``Tr(F)`` on the batch: mean over samples of ``||grad log p(y_i|x_i)||^2``, differentiable."""
    params = trainable_params(model)
    with eval_mode(model):
        if kind == "true":
            with torch.no_grad():
                y = sample_labels(model(x), kind, y, generator, task)
        try:
            grads = per_sample_grads_vmap(model, params, x, y, task)
        except (RuntimeError, NotImplementedError):
            grads = per_sample_grads_loop(model, params, x, y, create_graph=True, task=task)
    return sum(g.pow(2).sum() for g in grads.values()) / len(x)


def trace_penalty_signed(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    probes: int = 1,
    kind: FisherKind = "empirical",
    generator: torch.Generator | None = None,
    task: Task = CLASSIFICATION,
) -> torch.Tensor:
    """Unbiased sample-sign estimate ``mean_k ||sum_i s_ki g_i||^2 / B`` of ``Tr(F)``, differentiable."""
    if probes < 1:
        raise ValueError(f"trace probes must be >= 1, got {probes}")
    params = list(trainable_params(model).values())
    with eval_mode(model):
        logits = model(x)
        if kind == "true":
            y = sample_labels(logits, kind, y, generator, task)
        nll = task.per_sample_nll(logits, y)
        total = x.new_zeros(())
        for _ in range(probes):
            signs = torch.randint(0, 2, (len(x),), generator=generator).to(nll) * 2 - 1
            grads = torch.autograd.grad((signs * nll).sum(), params, create_graph=True)
            total = total + sum(g.pow(2).sum() for g in grads)
    return total / (probes * len(x))


def rademacher_like(params: Params, generator: torch.Generator | None = None) -> Params:
    out = {}
    for name, p in params.items():
        bits = torch.randint(0, 2, p.shape, generator=generator, device="cpu", dtype=torch.int8)
        out[name] = (bits.to(device=p.device, dtype=p.dtype) * 2 - 1)
    return out


def trace_penalty_hutchinson(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    probes: int = 1,
    kind: FisherKind = "empirical",
    generator: torch.Generator | None = None,
    task: Task = CLASSIFICATION,
) -> torch.Tensor:
    """Unbiased JVP/Hutchinson estimate of ``Tr(F)`` on the batch (see module docstring), differentiable."""
    if probes < 1:
        raise ValueError(f"trace probes must be >= 1, got {probes}")
    params = trainable_params(model)
    with eval_mode(model):
        if kind == "true":
            with torch.no_grad():
                y = sample_labels(model(x), kind, y, generator, task)

        def batch_nll(p: Params) -> torch.Tensor:
            return task.per_sample_nll(functional_call(model, p, (x,)), y)

        total = x.new_zeros(())
        for _ in range(probes):
            _, directional = jvp(batch_nll, (params,), (rademacher_like(params, generator),))
            total = total + directional.pow(2).mean()
    return total / probes


def trace_penalty(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    estimator: TraceEstimator = "signed",
    probes: int = 1,
    kind: FisherKind = "empirical",
    generator: torch.Generator | None = None,
    task: Task = CLASSIFICATION,
) -> torch.Tensor:
    """``Tr(F(theta))`` on a batch by the chosen estimator (the ``eta_F`` term of the objective).

    Attention runs on its math kernel here (:func:`fip.kernels.differentiable_attention`): the penalty is
    differentiated twice, which the fused attention kernels do not support."""
    with differentiable_attention():
        if estimator == "exact":
            return trace_penalty_exact(model, x, y, kind, generator, task)
        if estimator == "signed":
            return trace_penalty_signed(model, x, y, probes, kind, generator, task)
        if estimator == "hutchinson":
            return trace_penalty_hutchinson(model, x, y, probes, kind, generator, task)
    raise ValueError(f"unknown trace estimator {estimator!r}; expected 'exact', 'signed' or 'hutchinson'")


def clean_distribution_penalty(params: Params, anchor: Params, fbar: Params) -> torch.Tensor:
    """``sum_i Fbar_ii (theta_i - theta_b,i)^2``: keeps weights that carry clean knowledge near the start.

    The objective multiplies this by ``eta_r / 2``.
    """
    missing = set(params) - set(fbar)
    if missing:
        raise ValueError(f"Fisher diagonal lacks parameters {sorted(missing)[:3]}...; was it estimated on this model?")
    total = None
    for name, p in params.items():
        term = (fbar[name] * (p - anchor[name]).pow(2)).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor | None = None,
    task: Task = CLASSIFICATION,
) -> torch.Tensor:
    """Mean over the batch of ``KL(p_teacher || p_student)`` (a language model's: over its scored positions).

    With the suspect as teacher on clean inputs, this is the function-space form of the
    clean-distribution regulariser. The Fisher-weighted distance is its second-order expansion in
    the weights. Unlike that distance, it does not pull back weights that clean inputs never use,
    such as the trigger's.
    """
    return task.kl(student_logits, teacher_logits, y)


def fip_objective(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    anchor: Params,
    fbar: Params,
    eta_f: float,
    eta_r: float,
    with_trace: bool = True,
    estimator: TraceEstimator = "signed",
    probes: int = 1,
    kind: FisherKind = "empirical",
    generator: torch.Generator | None = None,
    logits_fn=None,
    trace_batch: int | None = None,
    eta_kl: float = 0.0,
    teacher_logits: torch.Tensor | None = None,
    task: Task = CLASSIFICATION,
) -> dict[str, torch.Tensor]:
    """All terms of ``L(theta)`` on one batch; ``total`` is what is differentiated.

    `logits_fn` computes the CE logits (a DDP wrapper in the distributed loop); the penalty terms
    always differentiate the plain module. `trace_batch` caps how many of the batch's samples
    enter the ``Tr(F)`` estimate (it is a mean over samples, so any subset is unbiased).
    With `teacher_logits` (the suspect's, on the same batch) and ``eta_kl > 0``, our extension
    ``eta_kl * KL(p_teacher || p_theta)`` is added; see :func:`distillation_kl`.
    """
    logits = (logits_fn or model)(x)
    ce = task.mean_nll(logits, y)
    params = trainable_params(model)
    terms = {"ce": ce}
    if with_trace and eta_f > 0:
        xt, yt = (x[:trace_batch], y[:trace_batch]) if trace_batch else (x, y)
        terms["trace"] = trace_penalty(model, xt, yt, estimator, probes, kind, generator, task)
    if eta_r > 0:
        terms["clean_reg"] = clean_distribution_penalty(params, anchor, fbar)
    if eta_kl > 0 and teacher_logits is not None:
        terms["kl"] = distillation_kl(logits, teacher_logits, y, task)
    total = ce
    if "kl" in terms:
        total = total + eta_kl * terms["kl"]
    if "trace" in terms:
        total = total + eta_f * terms["trace"]
    if "clean_reg" in terms:
        total = total + 0.5 * eta_r * terms["clean_reg"]
    terms["total"] = total
    return terms
