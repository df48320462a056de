"""Smoothness analysis of the loss surface (docs/paper.md, "Why it works"), PyHessian-style.

- ``lambda_max``: power iteration on Hessian-vector products.
- ``Tr(H)``: Hutchinson's estimator ``E_v[v^T H v]`` with Rademacher ``v``, drawn until the standard
  error of the mean is a set fraction of the mean, and returned as an :class:`Estimate` with that
  standard error and the probe count.
- eigenvalue spectral density: stochastic Lanczos quadrature (SLQ), returned as nodes and weights
  and plotted as a Gaussian-smoothed density.

All products are with the Hessian of the mean loss over the given batches, model in eval mode,
with respect to the trainable parameters. The paper's numbers use one batch of 200 clean images and
up to 100 power iterations at tolerance 1e-3. Non-finite weights, losses or Hessian-vector products
raise ValueError: a NaN figure reported as a result is worse than no figure.
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
from fip.io import check_finite_weights
from fip.kernels import differentiable_attention

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
        # the math attention kernel: the fused ones have no double backward (fip.kernels.differentiable_attention)
        with eval_mode(self.model), differentiable_attention():
            for i, (x, y) in enumerate(self.batches):
                loss = self.loss_fn(self.model(x), y)
                if not torch.isfinite(loss):
                    raise ValueError(
                        f"the loss on batch {i} is {float(loss.detach())}: Hessian analysis needs a finite loss"
                    )
                grads = torch.autograd.grad(loss, self.params, create_graph=True)
                hv = torch.autograd.grad(_flat(grads), self.params, grad_outputs=v, retain_graph=False)
                total += _flat(hv).detach() * (len(x) / n)
        bad = int((~torch.isfinite(total)).sum())
        if bad:
            raise ValueError(f"the Hessian-vector product holds {bad} NaN or infinite values of {self.dim}")
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


@dataclass(frozen=True)
class Estimate:
    """A Monte Carlo figure with its standard error and the number of random probes behind it.

    Hutchinson's ``Tr(H)`` (and SLQ's) is a sample mean over random vectors, not an exact number;
    reported bare, a 30 % error reads like a measurement. ``value ± 2 * stderr`` is a ~95 % interval.
    """

    value: float
    stderr: float
    probes: int

    def interval(self, z: float = 2.0) -> tuple[float, float]:
        return self.value - z * self.stderr, self.value + z * self.stderr

    @property
    def rel_stderr(self) -> float:
        return self.stderr / abs(self.value) if self.value else math.inf

    def __str__(self) -> str:
        return f"{self.value:.6g} ± {self.stderr:.2g} ({self.probes} probes)"


def _mean_and_stderr(samples: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(samples, dtype=np.float64)
    if len(a) < 2:
        return float(a.mean()) if len(a) else math.nan, math.inf
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a)))


def _check_trace_target(rel_stderr: float, max_probes: int) -> None:
    if not (rel_stderr >= 0 and math.isfinite(rel_stderr)):
        raise ValueError(
            f"Tr(H) relative standard error target must be a finite number >= 0, got {rel_stderr}"
        )
    if max_probes < 2:
        raise ValueError(
            f"Tr(H) needs at least 2 Hutchinson probes for a standard error, got max_probes={max_probes}"
        )


def hessian_trace(
    op: HessianOperator, rel_stderr: float = 0.02, max_probes: int = 500, min_probes: int = 10, seed: int = 0
) -> Estimate:
    """``Tr(H)`` by Hutchinson: mean of ``v^T H v`` over Rademacher ``v``.

    Probes are drawn until the standard error of the mean (sample std / sqrt(n), n >= `min_probes`)
    is at most ``rel_stderr * |mean|``, or `max_probes` are spent. Stopping on the standard error,
    not on the running mean's last change, ties the stopping point to the estimator's actual spread;
    `min_probes` keeps the sample std itself from being a lucky guess.
    """
    _check_trace_target(rel_stderr, max_probes)
    min_probes = max(2, min(min_probes, max_probes))
    g = torch.Generator().manual_seed(seed)
    samples: list[float] = []
    while len(samples) < max_probes:
        v = op.random_rademacher(g)
        samples.append(float(v @ op(v)))
        if len(samples) >= min_probes:
            mean, stderr = _mean_and_stderr(samples)
            if stderr <= rel_stderr * abs(mean):
                break
    mean, stderr = _mean_and_stderr(samples)
    return Estimate(mean, stderr, len(samples))


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

    def trace_estimate(self, dim: int) -> Estimate:
        """``Tr(H) ~= dim * E[sum_j w_j theta_j]`` (a by-product of the quadrature), one sample per run;
        the standard error is over runs, so it is infinite for a single run."""
        mean, stderr = _mean_and_stderr(dim * (self.weights * self.nodes).sum(axis=1))
        return Estimate(mean, stderr, len(self.nodes))


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
    trace: Estimate
    density: SpectralDensity | None = None

    def as_dict(self) -> dict[str, float | int]:
        return {
            "lambda_max": self.lambda_max,
            "hessian_trace": self.trace.value,
            "hessian_trace_stderr": self.trace.stderr,
            "hessian_trace_probes": self.trace.probes,
        }


def smoothness_report(
    model: nn.Module,
    batches: Sequence[Batch],
    max_iter: int = 100,
    tol: float = 1e-3,
    density_steps: int = 0,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
    trace_rel_stderr: float = 0.02,
    max_probes: int = 500,
) -> Smoothness:
    """``lambda_max`` (power iteration, `max_iter`/`tol`), ``Tr(H)`` (Hutchinson, to `trace_rel_stderr`
    relative standard error or `max_probes`) and, when `density_steps` > 0, the SLQ density."""
    check_finite_weights(model)
    _check_trace_target(trace_rel_stderr, max_probes)  # before lambda_max's iterations, not after
    op = HessianOperator(model, batches, loss_fn)
    lam, _ = hessian_max_eigenvalue(op, max_iter, tol, seed)
    tr = hessian_trace(op, trace_rel_stderr, max_probes, seed=seed)
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
