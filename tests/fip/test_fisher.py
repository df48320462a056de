"""The diagonal Fisher against independent computations: a per-sample loop and a closed form."""

import pytest
import torch
import torch.nn.functional as F
from references import loop_squared_grads, relative_error
from torch import nn

from fip.fisher import FisherDiag, fisher_diag, per_sample_grads, per_sample_grads_loop, trainable_params
from fip.models import build_model

pytestmark = pytest.mark.numerics  # figures from the CPU's kernels: `make test-avx2` runs them again


def test_vectorised_fisher_matches_per_sample_loop(tiny_spec):
    torch.manual_seed(0)
    model = build_model(tiny_spec)
    model.train()  # fisher_diag must switch to eval mode itself and restore this flag
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    est = fisher_diag(model, [(x[:5], y[:5]), (x[5:], y[5:])], chunk_size=4)
    assert model.training
    ref = loop_squared_grads(model, x, y)
    assert est.count == 12
    assert relative_error(est.sums, ref) < 1e-5


def test_loop_fallback_matches_vmap(tiny_spec):
    torch.manual_seed(1)
    model = build_model(tiny_spec).eval()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    params = trainable_params(model)
    vec = per_sample_grads(model, x, y)
    loop = per_sample_grads_loop(model, params, x, y)
    assert set(vec) == set(loop)
    assert relative_error(vec, loop) < 1e-5
    slow = fisher_diag(model, [(x, y)], vectorize=False)
    fast = fisher_diag(model, [(x, y)])
    assert relative_error(slow.sums, fast.sums) < 1e-5


def test_logistic_regression_fisher_closed_form():
    """Softmax regression: d/dW_kj log p(y|x) = (1[y=k] - p_k) x_j, d/db_k = 1[y=k] - p_k."""
    torch.manual_seed(2)
    n, d, k = 400, 5, 3
    model = nn.Linear(d, k).double()
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randint(0, k, (n,))
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    r = F.one_hot(y, k).double() - p
    closed_w = torch.einsum("nk,nj->kj", r**2, x**2) / n
    closed_b = (r**2).mean(0)
    est = fisher_diag(model, [(x, y)]).mean(torch.float64)
    assert torch.allclose(est["weight"], closed_w, rtol=1e-10)
    assert torch.allclose(est["bias"], closed_b, rtol=1e-10)

    # true Fisher: E_{y~p}(1[y=k]-p_k)^2 = p_k(1-p_k); sampled labels converge to it
    reps = 200
    xr = x.repeat(reps, 1)
    true = fisher_diag(model, [(xr, y.repeat(reps))], kind="true", seed=3, chunk_size=len(xr)).mean(torch.float64)
    closed_true_w = torch.einsum("nk,nj->kj", p * (1 - p), x**2) / n
    rel = (true["weight"] - closed_true_w).abs().max() / closed_true_w.abs().max()
    assert rel < 0.03
    # and it differs from the empirical one (it is not silently using true labels)
    assert (true["weight"] - closed_w).abs().max() / closed_w.abs().max() > 0.05


def test_partial_estimates_combine_exactly(tiny_spec):
    torch.manual_seed(4)
    model = build_model(tiny_spec)
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,))
    a = fisher_diag(model, [(x[:3], y[:3])])
    b = fisher_diag(model, [(x[3:], y[3:])])
    union = fisher_diag(model, [(x, y)])
    merged = a + b
    assert merged.count == union.count == 10
    for n in union.sums:
        assert torch.allclose(merged.sums[n], union.sums[n], rtol=1e-6, atol=1e-12)
    assert abs(merged.trace() - union.trace()) / union.trace() < 1e-6


def test_fisher_save_load_roundtrip(tmp_path, tiny_spec):
    model = build_model(tiny_spec)
    est = fisher_diag(model, [(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))])
    back = FisherDiag.load(est.save(tmp_path / "f.safetensors"))
    assert back.count == 4 and back.kind == "empirical"
    assert all(torch.equal(back.sums[n], est.sums[n]) for n in est.sums)


def test_bad_labels_are_refused(tiny_spec):
    model = build_model(tiny_spec)
    import pytest

    with pytest.raises(ValueError, match="label out of range"):
        fisher_diag(model, [(torch.randn(2, 1, 8, 8), torch.tensor([0, 10]))])
    with pytest.raises(ValueError, match="2 inputs but 3 labels"):
        fisher_diag(model, [(torch.randn(2, 1, 8, 8), torch.tensor([0, 1, 2]))])
    with pytest.raises(ValueError, match="empty"):
        fisher_diag(model, [])
