"""The FIP objective's terms against independent computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fip.fisher import trainable_params
from fip.models import build_model
from fip.objective import (
    clean_distribution_penalty,
    distillation_kl,
    fip_objective,
    trace_penalty_exact,
    trace_penalty_hutchinson,
    trace_penalty_signed,
)

pytestmark = pytest.mark.numerics  # figures from the CPU's kernels: `make test-avx2` runs them again


class TinyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _sum_sq_grad_norms(model, x, y):
    total = 0.0
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters()))
        total += sum(float(g.pow(2).sum()) for g in grads)
    return total / len(x)


def test_exact_trace_is_mean_per_sample_squared_grad_norm(tiny_spec):
    torch.manual_seed(0)
    model = build_model(tiny_spec).eval()
    x, y = torch.randn(7, 1, 8, 8), torch.randint(0, 10, (7,))
    exact = float(trace_penalty_exact(model, x, y))
    assert exact == pytest.approx(_sum_sq_grad_norms(model, x, y), rel=1e-5)
    # and it is not the biased squared norm of the batch-mean gradient
    mean_grad = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert exact > 1.5 * sum(float(g.pow(2).sum()) for g in mean_grad)


def test_exact_trace_gradient_matches_finite_differences():
    torch.manual_seed(1)
    model = TinyConvNet().double()
    x, y = torch.randn(5, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    params = list(model.parameters())
    value = trace_penalty_exact(model, x, y)
    grads = torch.autograd.grad(value, params)
    eps = 1e-6
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(eps * d)
        up = float(trace_penalty_exact(model, x, y))
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(2 * eps * d)
        down = float(trace_penalty_exact(model, x, y))
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(eps * d)
        fd = (up - down) / (2 * eps)
        analytic = float(sum((g * d).sum() for g, d in zip(grads, direction)))
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_hutchinson_trace_within_tolerance_of_exact(tiny_spec):
    """Stated tolerance: with 400 Rademacher probes the estimate is within 5% of the exact trace;
    one probe is unbiased, so its mean over seeds converges to the same value."""
    torch.manual_seed(3)
    model = TinyConvNet()
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 4, (16,))
    exact = float(trace_penalty_exact(model, x, y))
    gen = torch.Generator().manual_seed(4)
    estimate = float(trace_penalty_hutchinson(model, x, y, probes=400, generator=gen))
    assert estimate == pytest.approx(exact, rel=0.05)
    # on a BatchNorm network (eval mode) as well, with fewer probes and a looser bound
    net = build_model(tiny_spec).eval()
    xb, yb = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    exact_bn = float(trace_penalty_exact(net, xb, yb))
    assert float(trace_penalty_hutchinson(net, xb, yb, probes=100, generator=gen)) == pytest.approx(exact_bn, rel=0.15)


def test_hutchinson_gradient_is_unbiased_on_average():
    torch.manual_seed(5)
    model = TinyConvNet().double()
    x, y = torch.randn(6, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (6,))
    params = list(model.parameters())
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(trace_penalty_exact(model, x, y), params)])
    gen = torch.Generator().manual_seed(6)
    est = torch.cat([g.flatten() for g in torch.autograd.grad(trace_penalty_hutchinson(model, x, y, probes=400, generator=gen), params)])
    cos = float(exact @ est / (exact.norm() * est.norm()))
    assert cos > 0.95


def test_clean_distribution_penalty_and_total():
    torch.manual_seed(7)
    model = TinyConvNet()
    params = trainable_params(model)
    anchor = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in params.items()}
    fbar = {n: torch.rand_like(p) for n, p in params.items()}
    ref = sum(float((fbar[n] * (params[n].detach() - anchor[n]) ** 2).sum()) for n in params)
    assert float(clean_distribution_penalty(params, anchor, fbar)) == pytest.approx(ref, rel=1e-5)
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 4, (4,))
    terms = fip_objective(model, x, y, anchor, fbar, eta_f=0.3, eta_r=2.0, estimator="exact")
    expected = terms["ce"] + 0.3 * terms["trace"] + 0.5 * 2.0 * terms["clean_reg"]
    assert float(terms["total"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(terms["clean_reg"]) == pytest.approx(ref, rel=1e-5)


def test_signed_estimator_within_tolerance_of_exact_with_aligned_gradient(tiny_spec):
    """Stated tolerance: 300 sign probes give the trace within 5% and a gradient with cosine > 0.95."""
    torch.manual_seed(8)
    for model, x, y in (
        (TinyConvNet().double(), torch.randn(12, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (12,))),
        (build_model(tiny_spec).double().eval(), torch.randn(12, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (12,))),
    ):
        params = list(model.parameters())
        exact = trace_penalty_exact(model, x, y)
        g_exact = torch.cat([g.flatten() for g in torch.autograd.grad(exact, params)])
        gen = torch.Generator().manual_seed(9)
        est = trace_penalty_signed(model, x, y, probes=300, generator=gen)
        g_est = torch.cat([g.flatten() for g in torch.autograd.grad(est, params)])
        assert float(est) == pytest.approx(float(exact), rel=0.05)
        assert float(g_exact @ g_est / (g_exact.norm() * g_est.norm())) > 0.95


def test_signed_estimator_is_exact_for_a_single_sample():
    """With one sample the sign is irrelevant: ||s g||^2 = ||g||^2 exactly."""
    torch.manual_seed(10)
    model = TinyConvNet()
    x, y = torch.randn(1, 1, 6, 6), torch.randint(0, 4, (1,))
    assert float(trace_penalty_signed(model, x, y)) == pytest.approx(float(trace_penalty_exact(model, x, y)), rel=1e-5)


def test_distillation_kl_is_the_mean_kl_of_the_teacher_to_the_student_and_enters_the_total():
    torch.manual_seed(3)
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    ref = 0.0
    for i in range(5):
        p = [float(v) for v in torch.softmax(teacher[i], 0)]
        q = [float(v) for v in torch.softmax(student[i], 0)]
        ref += sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q, strict=True))
    assert float(distillation_kl(student, teacher)) == pytest.approx(ref / 5, rel=1e-5)
    assert float(distillation_kl(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)

    model = TinyConvNet()
    params = trainable_params(model)
    anchor = {n: p.detach().clone() for n, p in params.items()}
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 4, (4,))
    t_logits = torch.randn(4, 4)
    terms = fip_objective(model, x, y, anchor, anchor, eta_f=0.0, eta_r=0.0, eta_kl=0.7, teacher_logits=t_logits)
    assert float(terms["kl"]) == pytest.approx(float(distillation_kl(model(x), t_logits)), rel=1e-6)
    assert float(terms["total"]) == pytest.approx(float(terms["ce"] + 0.7 * terms["kl"]), rel=1e-6)
    assert "kl" not in fip_objective(model, x, y, anchor, anchor, eta_f=0.0, eta_r=0.0, eta_kl=0.7)
