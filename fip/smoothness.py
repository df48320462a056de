"""Smoothness analysis of the loss surface (METHOD.md, "Why it works"), PyHessian-style.

- ``lambda_max``: power iteration on Hessian-vector products.
- ``Tr(H)``: Hutchinson's estimator ``E_v[v^T H v]`` with Rademacher ``v``.
- eigenvalue spectral density: stochastic Lanczos quadrature (SLQ), returned as nodes and weights
  and plotted as a Gaussian-smoothed density.

All products are with the Hessian of the mean loss over the given batches, model in eval mode,
with respect to the trainable parameters. The paper's numbers use one batch of 200 clean images,
up to 100 iterations at tolerance 1e-3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fip.fisher import eval_mode, trainable_params

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


def _flat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


class HessianOperator:
    """``v -> H v`` for the mean loss over `batches` (double backward, one pass per batch)."""

    def __init__(self, model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn = F.cross_entropy) -> None:
        if not batches:
            raise ValueError("Hessian analysis needs at least one batch")
        self.model, self.batches, self.loss_fn = model, list(batches), loss_fn
        self.params = list(trainable_params(model).values())
        self.dim = sum(p.numel() for p in self.params)
        self.products = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(v)
        n = sum(len(x) for x, _ in self.batches)
        with eval_mode(self.model):
            for x, y in self.batches:
                loss = self.loss_fn(self.model(x), y)
                grads = torch.autograd.grad(loss, self.params, create_graph=True)
                hv = torch.autograd.grad(_flat(grads), self.params, grad_outputs=v, retain_graph=False)
                total += _flat(hv).detach() * (len(x) / n)
        self.products += 1
        return total

    def random_rademacher(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, 2, (self.dim,), generator=generator).to(self.params[0]) * 2 - 1


def hessian_max_eigenvalue(
    op: HessianOperator, max_iter: int = 100, tol: float = 1e-3, seed: int = 0
) -> tuple[float, torch.Tensor]:
    """``lambda_max`` (largest in magnitude) by power iteration; returns (eigenvalue, eigenvector)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(op.dim, generator=g).to(op.params[0])
    v /= v.norm()
    eig = None
    for _ in range(max_iter):
        hv = op(v)
        new = float(v @ hv)
        v = hv / (hv.norm() + 1e-12)
        if eig is not None and abs(new - eig) / (abs(eig) + 1e-6) < tol:
            eig = new
            break
        eig = new
    return float(eig), v


def hessian_trace(op: HessianOperator, max_iter: int = 100, tol: float = 1e-3, seed: int = 0) -> float:
    """``Tr(H)`` by Hutchinson: running mean of ``v^T H v`` until its relative change is below `tol`."""
    g = torch.Generator().manual_seed(seed)
    samples: list[float] = []
    mean = 0.0
    for i in range(max_iter):
        v = op.random_rademacher(g)
        samples.append(float(v @ op(v)))
        new = float(np.mean(samples))
        if i > 0 and abs(new - mean) / (abs(mean) + 1e-6) < tol:
            return new
        mean = new
    return mean


@dataclass
class SpectralDensity:
    """SLQ quadrature: per run, Ritz values (nodes) and their weights (which sum to 1 per run)."""

    nodes: np.ndarray  # (runs, steps)
    weights: np.ndarray  # (runs, steps)

    def density(self, grid: np.ndarray, sigma: float | None = None) -> np.ndarray:
        """Gaussian-smoothed density on `grid`; integrates to ~1."""
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        sigma = sigma if sigma is not None else max((hi - lo) / 200, 1e-6)
        diff = grid[None, None, :] - self.nodes[..., None]
        kern = np.exp(-(diff**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
        return (self.weights[..., None] * kern).sum(axis=1).mean(axis=0)

    def trace_estimate(self, dim: int) -> float:
        """``Tr(H) ~= dim * E[sum_j w_j theta_j]`` (a by-product of the quadrature)."""
        return float(dim * (self.weights * self.nodes).sum(axis=1).mean())


def lanczos(op: HessianOperator, steps: int, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`steps` Lanczos iterations with full reorthogonalisation; returns the tridiagonal's (alpha, beta)."""
    steps = min(steps, op.dim)
    v = torch.randn(op.dim, generator=generator).to(op.params[0])
    v /= v.norm()
    basis = [v]
    alphas, betas = [], []
    w = op(v)
    for j in range(steps):
        alpha = float(w @ basis[j])
        alphas.append(alpha)
        w = w - alpha * basis[j] - (betas[-1] * basis[j - 1] if j > 0 else 0)
        for b in basis:  # full reorthogonalisation keeps the Ritz values honest
            w = w - (w @ b) * b
        beta = float(w.norm())
        if j == steps - 1 or beta < 1e-10:
            break
        betas.append(beta)
        basis.append(w / beta)
        w = op(basis[-1])
    return np.array(alphas), np.array(betas[: len(alphas) - 1])


def spectral_density(op: HessianOperator, runs: int = 1, steps: int = 90, seed: int = 0) -> SpectralDensity:
    """Eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019)."""
    g = torch.Generator().manual_seed(seed)
    all_nodes, all_weights = [], []
    for _ in range(runs):
        alpha, beta = lanczos(op, steps, g)
        t = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
        evals, evecs = np.linalg.eigh(t)
        all_nodes.append(evals)
        all_weights.append(evecs[0, :] ** 2)
    k = min(len(n) for n in all_nodes)
    return SpectralDensity(np.stack([n[-k:] for n in all_nodes]), np.stack([w[-k:] for w in all_weights]))


@dataclass
class Smoothness:
    lambda_max: float
    trace: float
    density: SpectralDensity | None = None

    def as_dict(self) -> dict[str, float]:
        return {"lambda_max": self.lambda_max, "hessian_trace": self.trace}


def smoothness_report(
    model: nn.Module,
    batches: Sequence[Batch],
    max_iter: int = 100,
    tol: float = 1e-3,
    density_steps: int = 0,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
) -> Smoothness:
    """``lambda_max``, ``Tr(H)`` and (when `density_steps` > 0) the SLQ density of `model`'s loss."""
    op = HessianOperator(model, batches, loss_fn)
    lam, _ = hessian_max_eigenvalue(op, max_iter, tol, seed)
    tr = hessian_trace(op, max_iter, tol, seed)
    esd = spectral_density(op, 1, density_steps, seed) if density_steps > 0 else None
    return Smoothness(lam, tr, esd)


def plot_spectral_density(
    densities: dict[str, SpectralDensity], path: str | Path, title: str = "Hessian eigenvalue density"
) -> Path:
    """Plot one or more SLQ densities (e.g. suspect vs purified) on a log scale to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo = min(float(d.nodes.min()) for d in densities.values())
    hi = max(float(d.nodes.max()) for d in densities.values())
    pad = 0.05 * (hi - lo + 1e-6)
    grid = np.linspace(lo - pad, hi + pad, 2000)
    sigma = max((hi - lo) / 200, 1e-6)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, d in densities.items():
        ax.semilogy(grid, d.density(grid, sigma) + 1e-12, label=f"{label} (max {d.nodes.max():.3g})")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)")
    ax.set_ylim(bottom=1e-8)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
