"""Hutchinson's Tr(H) carries its standard error, and that error is honest.

The reference is the exact trace of a tiny MLP's dense Hessian (torch.autograd.functional.hessian on a
flat parameter vector, a path independent of HessianOperator's double backward). Hutchinson's
variance with Rademacher probes is known exactly too: Var[v^T H v] = 2 * sum_{i != j} H_ij^2.
"""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fip.smoothness import Estimate, HessianOperator, hessian_trace, smoothness_report

pytestmark = pytest.mark.numerics  # figures from the CPU's kernels: `make test-avx2` runs them again


def _tiny_mlp(seed: int = 0, n: int = 32):
    """A 6-8-3 tanh MLP on random data, its batch, and its exact (dense) Hessian."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss(flat):
        params = {k: t.reshape(s) for k, t, s in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return model, [(x, y)], torch.autograd.functional.hessian(loss, flat)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only adds contention (5x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mlp():
    return _tiny_mlp()


def test_interval_covers_the_exact_trace(mlp):
    model, batches, hess = mlp
    exact = float(hess.trace())
    probe_var = 2 * (float((hess**2).sum()) - float((hess.diag() ** 2).sum()))
    op = HessianOperator(model, batches)
    rel, max_probes, seeds = 0.2, 2000, range(40)  # a loose target keeps it fast; the statistics are the same
    covered, errors, stderr_ratio = [], [], []
    for seed in seeds:
        est = hessian_trace(op, rel_stderr=rel, max_probes=max_probes, seed=seed)
        assert isinstance(est, Estimate) and est.probes < max_probes
        assert est.stderr <= rel * abs(est.value)  # it stopped because the target was met
        lo, hi = est.interval(2.0)
        covered.append(lo <= exact <= hi)
        errors.append(abs(est.value - exact) / abs(exact))
        stderr_ratio.append(est.stderr / math.sqrt(probe_var / est.probes))
    coverage, errors = float(np.mean(covered)), np.array(errors)
    # a 2-sigma interval should cover ~95 %; sequential stopping on a noisy std costs a little
    assert coverage >= 0.85, f"2-stderr coverage {coverage:.2f}"
    # the target is a standard error, so the error is below it about 2 times in 3 and below twice it ~always
    assert np.median(errors) <= rel, f"median relative error {np.median(errors):.3f}"
    assert np.mean(errors <= 2 * rel) >= 0.85, f"errors {np.sort(errors)}"
    # the reported stderr matches the exact one for that many probes (neither inflated nor shrunk)
    assert 0.8 <= np.median(stderr_ratio) <= 1.25 and min(stderr_ratio) >= 0.4, stderr_ratio


def test_stops_at_the_first_probe_count_that_meets_the_target(mlp):
    model, batches, _ = mlp
    op = HessianOperator(model, batches)
    est = hessian_trace(op, rel_stderr=0.2, max_probes=500, min_probes=10, seed=3)
    assert op.products == est.probes and 10 <= est.probes < 500
    # replay the same probes: the estimate is their mean, and no earlier count (>= 10) met the target
    g = torch.Generator().manual_seed(3)
    samples = []
    for _ in range(est.probes):
        v = op.random_rademacher(g)
        samples.append(float(v @ op(v)))
    samples = np.array(samples)
    assert est.value == pytest.approx(samples.mean(), rel=1e-12)
    assert est.stderr == pytest.approx(samples.std(ddof=1) / math.sqrt(est.probes), rel=1e-12)
    for n in range(10, est.probes):
        s = samples[:n]
        assert s.std(ddof=1) / math.sqrt(n) > 0.2 * abs(s.mean())
    # a tighter target takes more probes; an unreachable one spends exactly max_probes
    assert hessian_trace(op, rel_stderr=0.1, max_probes=500, seed=3).probes > est.probes
    capped = hessian_trace(op, rel_stderr=1e-6, max_probes=25, seed=3)
    assert capped.probes == 25 and capped.stderr > 1e-6 * abs(capped.value)


def test_zero_variance_stops_at_min_probes():
    """A diagonal Hessian makes every v^T H v equal Tr(H): standard error 0 after the minimum."""
    model = nn.Linear(4, 1, bias=False).double()
    x = torch.eye(4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)[:, None]
    op = HessianOperator(model, [(x, torch.zeros(4, 1, dtype=torch.float64))], loss_fn=F.mse_loss)
    est = hessian_trace(op, rel_stderr=0.01, min_probes=10)
    exact = 2 * (1 + 4 + 9 + 16) / 4  # H = 2 X^T X / n, diagonal
    assert (est.probes, est.stderr) == (10, 0.0) and est.value == pytest.approx(exact)
    assert str(est) == "15 ± 0 (10 probes)"


def test_bad_targets_are_refused(mlp):
    op = HessianOperator(*mlp[:2])
    with pytest.raises(ValueError, match="at least 2"):
        hessian_trace(op, max_probes=1)
    with pytest.raises(ValueError, match="finite number >= 0"):
        hessian_trace(op, rel_stderr=-0.1)
    assert op.products == 0


def test_report_carries_the_uncertainty(mlp):
    model, batches, hess = mlp
    rep = smoothness_report(model, batches, max_iter=50, trace_rel_stderr=0.2, max_probes=300, seed=1)
    d = rep.as_dict()
    assert set(d) == {"lambda_max", "hessian_trace", "hessian_trace_stderr", "hessian_trace_probes"}
    assert d["hessian_trace_stderr"] == rep.trace.stderr > 0 and d["hessian_trace_probes"] == rep.trace.probes
    assert abs(d["hessian_trace"] - float(hess.trace())) <= 4 * d["hessian_trace_stderr"]


def test_non_finite_weights_loss_and_products_raise(mlp):
    model, batches, _ = mlp
    broken = _tiny_mlp()[0]
    with torch.no_grad():
        broken[2].bias[1] = float("nan")
    with pytest.raises(
        ValueError, match=re.escape("model: weights hold NaN or infinite values (1 of 4 tensors, first 2.bias)")
    ):
        smoothness_report(broken, batches)
    x, y = batches[0]
    bad_x = x.clone()
    bad_x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="the loss on batch 0 is nan"):
        smoothness_report(model, [(bad_x, y)])
    # a finite loss whose second derivative is not: d/dz sqrt(z) at 0 is infinite
    op = HessianOperator(model, batches, loss_fn=lambda out, _y: torch.sqrt((out**2).sum() * 0))
    with pytest.raises(ValueError, match="Hessian-vector product holds .* NaN or infinite"):
        hessian_trace(op)


@pytest.fixture
def saved(tmp_path, tiny_spec):
    from fip.io import save_model
    from fip.models import build_model

    torch.manual_seed(0)
    model = build_model(tiny_spec)
    good = save_model(model, tiny_spec, tmp_path / "good.safetensors")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    return good, save_model(model, tiny_spec, tmp_path / "nan.safetensors")


def test_cli_prints_trace_with_its_stderr(saved, capsys):
    from fipcli.main import main

    good, nan = saved
    args = [
        "smoothness",
        "--dataset",
        "digits",
        "--samples",
        "16",
        "--iters",
        "3",
        "--trace-rel-stderr",
        "0.05",
        "--max-probes",
        "12",
    ]
    assert main([*args, "--model", str(good)]) == 0
    out, err = capsys.readouterr()
    record = json.loads(out.strip().splitlines()[-1])
    m = re.search(r"Tr\(H\) = (\S+) ± (\S+) \((\d+) probes\)", err)
    assert m, err
    assert float(m.group(1)) == pytest.approx(record["hessian_trace"], rel=1e-5)
    assert float(m.group(2)) == pytest.approx(record["hessian_trace_stderr"], rel=0.06)  # 2 digits
    assert int(m.group(3)) == record["hessian_trace_probes"] <= 12
    missed = record["hessian_trace_stderr"] > 0.05 * abs(record["hessian_trace"])
    assert ("above the target" in err) == missed
    assert main([*args, "--model", str(nan)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fip smoothness: error: ") and "weights hold NaN or infinite values (1 of " in err
    assert "\n" not in err
