"""Hessian analysis on linear least squares, whose Hessian is known in closed form: H = 2 X^T X / n."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fip.smoothness import (
    HessianOperator,
    hessian_max_eigenvalue,
    hessian_trace,
    plot_spectral_density,
    spectral_density,
)

pytestmark = pytest.mark.numerics  # figures from the CPU's kernels: `make test-avx2` runs them again


@pytest.fixture
def least_squares():
    torch.manual_seed(0)
    n, d = 200, 12
    scales = torch.linspace(0.2, 3.0, d)
    x = torch.randn(n, d, dtype=torch.float64) * scales
    y = torch.randn(n, 1, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    h = 2 * x.T @ x / n
    return model, [(x[:120], y[:120]), (x[120:], y[120:])], torch.linalg.eigvalsh(h)


def test_lambda_max_and_trace_match_closed_form(least_squares):
    model, batches, eig = least_squares
    op = HessianOperator(model, batches, loss_fn=F.mse_loss)
    lam, vec = hessian_max_eigenvalue(op, max_iter=200, tol=1e-6)
    assert lam == pytest.approx(float(eig.max()), rel=0.01)
    tr = hessian_trace(op, rel_stderr=0.005, max_probes=2000, seed=1)
    assert tr.value == pytest.approx(float(eig.sum()), rel=0.02)
    assert abs(tr.value - float(eig.sum())) <= 3 * tr.stderr
    assert tr.stderr <= 0.005 * tr.value and tr.probes < 2000


def test_slq_recovers_spectrum_and_plots(least_squares, tmp_path):
    model, batches, eig = least_squares
    op = HessianOperator(model, batches, loss_fn=F.mse_loss)
    esd = spectral_density(op, runs=3, steps=12)
    # with as many Lanczos steps as dimensions the Ritz values are the eigenvalues
    assert np.allclose(np.sort(esd.nodes[0]), eig.numpy(), rtol=1e-6, atol=1e-8)
    assert np.allclose(esd.weights.sum(axis=1), 1.0)
    slq = esd.trace_estimate(op.dim)
    assert slq.value == pytest.approx(float(eig.sum()), rel=0.5)
    assert slq.probes == 3 and 0 < slq.stderr < slq.value  # a standard error over the 3 runs
    grid = np.linspace(float(eig.min()) - 1, float(eig.max()) + 1, 4000)
    dens = esd.density(grid)
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, rel=0.02)
    png = plot_spectral_density({"suspect": esd}, tmp_path / "esd.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
