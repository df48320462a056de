"""Diagonal Fisher Information: per-sample squared score gradients, averaged over a data stream.

``F_ii = E_(x,y) [ (d/d theta_i log p(y | x; theta))^2 ]`` with ``y`` the true label (empirical
Fisher, the default, as the FIP authors use) or ``y ~ p(. | x; theta)`` (true Fisher). What a sample,
its label and ``log p`` are is the task's (:mod:`fip.tasks`): an image and its class, or a token
sequence scored on its response (one sample = one sequence).

Per-sample gradients are taken with ``torch.func.vmap(grad)``; where vmap does not apply (a module
with in-place state updates, say) a plain per-sample loop gives the same numbers. Gradients are
always taken with the model in eval mode: norm layers then use their running statistics, so each
sample's gradient is its own and not a function of the rest of the batch. :class:`FisherDiag`
keeps the running *sum* and the sample *count*, so partial estimates from many workers combine
exactly: sum the sums, sum the counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call, grad, vmap

from fip.kernels import differentiable_attention
from fip.models import classifier_head
from fip.tasks import CLASSIFICATION, Task

FisherKind = Literal["empirical", "true"]
Params = dict[str, torch.Tensor]


def trainable_params(model: nn.Module) -> Params:
    """The parameters FIP tunes: those that require grad (all weights for FIP, the shifts for Fast FIP)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put `model` in eval mode (running norm statistics), restoring each module's flag."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def sample_labels(
    logits: torch.Tensor | None, kind: FisherKind, labels: torch.Tensor, generator=None, task: Task = CLASSIFICATION
) -> torch.Tensor:
    """The labels whose log-likelihood is differentiated: the true ones, or draws from the model.

    Draws happen on the generator's device (a CUDA generator with a model on the GPU; a CPU one
    still works there, through a copy of the probabilities) and land on the logits' device."""
    if kind == "empirical":
        return labels
    if kind == "true":
        return task.sample_labels(logits, labels, generator)
    raise ValueError(f"unknown Fisher kind {kind!r}; expected 'empirical' or 'true'")


def _sample_nll(model: nn.Module, task: Task):
    """-log p(y | x) of one sample as a function of the trainable parameters."""

    def nll(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return task.per_sample_nll(logits, y.unsqueeze(0))[0]

    return nll


def per_sample_grads_vmap(
    model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, task: Task = CLASSIFICATION
) -> Params:
    """Per-sample gradients of -log p(y|x), shape (B, *param.shape), by vmap over grad.

    Attention takes its math kernel (:func:`fip.kernels.differentiable_attention`): vmap has no batching rule
    for the fused kernels and would run them one sample at a time."""
    with differentiable_attention():
        return vmap(grad(_sample_nll(model, task)), in_dims=(None, 0, 0))(params, x, y)


def per_sample_grads_loop(
    model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False,
    task: Task = CLASSIFICATION,
) -> Params:
    """The same gradients by a plain loop over samples: the fallback where vmap does not apply."""
    names, tensors = list(params), list(params.values())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(len(x)):
        loss = task.per_sample_nll(model(x[i : i + 1]), y[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, tensors, create_graph=create_graph, allow_unused=True)
        for n, g, p in zip(names, grads, tensors, strict=True):
            out[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}


def per_sample_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: Params | None = None, vectorize: bool = True,
    task: Task = CLASSIFICATION,
) -> Params:
    """Per-sample score gradients for the batch, vectorised when possible (model in eval mode)."""
    params = trainable_params(model) if params is None else params
    with eval_mode(model):
        if vectorize:
            try:
                return per_sample_grads_vmap(model, params, x, y, task)
            except (RuntimeError, NotImplementedError):
                pass
        live = {n: p for n, p in model.named_parameters() if n in params}
        return per_sample_grads_loop(model, live, x, y, task=task)


@dataclass
class FisherDiag:
    """Running sum of per-sample squared gradients and the number of samples behind it.

    ``mean()`` is the diagonal Fisher ``Fbar``. Two estimates over disjoint data merge exactly
    with ``a + b`` (or :meth:`merge`), which is how workers' partial estimates are combined.
    """

    sums: Params
    count: int = 0
    kind: FisherKind = "empirical"
    meta: dict = field(default_factory=dict)

    @classmethod
    def zeros_like(cls, params: Params, kind: FisherKind = "empirical") -> FisherDiag:
        return cls({n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}, 0, kind)

    def add_(self, sq_grad_sums: Params, n: int) -> FisherDiag:
        for name, s in sq_grad_sums.items():
            self.sums[name] += s.detach().to(self.sums[name].dtype)
        self.count += n
        return self

    def merge(self, other: FisherDiag) -> FisherDiag:
        if self.kind != other.kind:
            raise ValueError(f"cannot merge a {self.kind} Fisher with a {other.kind} Fisher")
        if set(self.sums) != set(other.sums):
            raise ValueError("cannot merge Fisher estimates over different parameters")
        return FisherDiag({n: self.sums[n] + other.sums[n] for n in self.sums}, self.count + other.count, self.kind)

    __add__ = merge

    def mean(self, dtype: torch.dtype = torch.float32) -> Params:
        if self.count == 0:
            raise ValueError("Fisher estimate is empty: no samples were accumulated")
        return {n: (s / self.count).to(dtype) for n, s in self.sums.items()}

    def trace(self) -> float:
        """Tr(F) of the diagonal estimate: the mean per-sample squared score norm."""
        return float(sum(s.sum() for s in self.sums.values()) / max(self.count, 1))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {n: s.contiguous() for n, s in self.sums.items()}
        save_file(tensors, str(path), metadata={"count": str(self.count), "kind": self.kind})
        return path

    @classmethod
    def load(cls, path: str | Path) -> FisherDiag:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "count" not in meta:
            raise ValueError(f"{path} is not a Fisher file written by FisherDiag.save (no sample count)")
        return cls(load_file(str(path)), int(meta["count"]), meta.get("kind", "empirical"))


def squared_grad_sums(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    kind: FisherKind = "empirical",
    params: Params | None = None,
    chunk_size: int = 32,
    vectorize: bool = True,
    generator: torch.Generator | None = None,
    task: Task = CLASSIFICATION,
) -> Params:
    """Sum over the batch of per-sample squared score gradients, in chunks to bound memory: a chunk holds
    ``chunk_size`` copies of the trainable parameters' gradients (docs/language-models.md, "Memory")."""
    params = trainable_params(model) if params is None else params
    totals = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    with eval_mode(model), torch.no_grad():
        logits = model(x) if kind == "true" else None
    labels = sample_labels(logits, kind, y, generator, task)
    detached = {n: p.detach() for n, p in params.items()}
    for start in range(0, len(x), chunk_size):
        xs, ys = x[start : start + chunk_size], labels[start : start + chunk_size]
        grads = per_sample_grads(model, xs, ys, detached, vectorize=vectorize, task=task)
        for n, g in grads.items():
            totals[n] += g.detach().pow(2).sum(0).double()
    return totals


def fisher_diag(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    kind: FisherKind = "empirical",
    chunk_size: int = 32,
    vectorize: bool = True,
    device: torch.device | str | None = None,
    seed: int = 0,
    max_samples: int | None = None,
    progress=None,
    task: Task = CLASSIFICATION,
) -> FisherDiag:
    """Diagonal Fisher ``Fbar`` of `model` over `batches` of (inputs, labels).

    `progress`, when given, is called with the running sample count after each batch.
    """
    params = trainable_params(model)
    if not params:
        raise ValueError("model has no trainable parameters to estimate a Fisher for")
    num_outputs = output_size(model, task)
    # the true Fisher's labels are drawn where the model runs (a CPU generator cannot feed CUDA multinomial)
    on = torch.device(device) if device is not None else next(iter(params.values())).device
    generator = torch.Generator(device=on).manual_seed(seed)
    est = FisherDiag.zeros_like(params, kind)
    for x, y in batches:
        if max_samples is not None and est.count >= max_samples:
            break
        if max_samples is not None:
            x, y = x[: max_samples - est.count], y[: max_samples - est.count]
        if device is not None:
            x, y = x.to(device), y.to(device)
        task.check_batch(x, y, num_outputs)
        est.add_(squared_grad_sums(model, x, y, kind, params, chunk_size, vectorize, generator, task), len(x))
        if progress is not None:
            progress(est.count)
    if est.count == 0:
        raise ValueError("no samples reached the Fisher estimate: the data stream was empty")
    return est


def output_size(model: nn.Module, task: Task = CLASSIFICATION) -> int | None:
    """How many classes (or vocabulary entries) the model scores, where the model says: a classifier's head,
    a language model's output embedding; None where it cannot be told."""
    if task.name == "causal-lm":
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(out, "weight", None)
        return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None
    head = classifier_head(model)
    return head.out_features if head is not None else None
