"""The method on the accepted families (torchvision, timm, Hugging Face) and on nn.MultiheadAttention: per-sample
Fisher by vmap against an explicit per-sample loop, Tr(F) through fused attention against the same loop, Fast
FIP's fold-back, and a few purification steps with finite losses."""

import math

import pytest
import torch
from family_models import CLASSES, AttentionNet, hf_folder, timm_spec, torchvision_spec
from references import loop_squared_grads, relative_error

from fip.fisher import fisher_diag, per_sample_grads, per_sample_grads_loop, trainable_params
from fip.io import load_model
from fip.kernels import guard_cpu_kernels
from fip.models import build_model
from fip.objective import trace_penalty
from fip.purify import PurifyConfig, purify
from fip.spectral import ShiftedSpectrum, SpectralShift, fold_spectral_shift, left_alone, to_spectral_shift

pytestmark = pytest.mark.numerics  # figures from the CPU's kernels: `make test-avx2` runs them again


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    return hf_folder(tmp_path_factory.mktemp("hf"), "vit")


@pytest.fixture(scope="module")
def hf_resnet(tmp_path_factory):
    return hf_folder(tmp_path_factory.mktemp("hf"), "resnet")


def _family(name, request) -> tuple[torch.nn.Module, int]:
    """(model in train mode, image size) of one family."""
    torch.manual_seed(0)
    if name == "torchvision":
        spec = torchvision_spec()
        return build_model(spec).train(), spec.image_size
    if name == "timm":
        spec = timm_spec()
        return build_model(spec).train(), spec.image_size
    if name == "mha":
        return guard_cpu_kernels(AttentionNet()).train(), 16
    loaded = load_model(request.getfixturevalue("hf_vit" if name == "hf-vit" else "hf_resnet"))
    return loaded.model.train(), loaded.spec.image_size


FAMILIES = ("torchvision", "timm", "hf-vit", "hf-resnet", "mha")


def _batch(size, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_vmap_fisher_matches_a_per_sample_loop(family, request):
    model, size = _family(family, request)
    x, y = _batch(size)
    est = fisher_diag(model, [(x[:3], y[:3]), (x[3:], y[3:])], chunk_size=2)
    assert model.training  # eval mode only inside the estimate: drop_path and BatchNorm statistics untouched
    ref = loop_squared_grads(model, x, y)
    assert est.count == 5 and relative_error(est.sums, ref) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_penalty_through_fused_attention_matches_the_loop_and_differentiates(family, request):
    model, size = _family(family, request)
    x, y = _batch(size, n=4, seed=2)
    reference = sum(float(s.sum()) for s in loop_squared_grads(model, x, y).values()) / len(x)
    exact = trace_penalty(model, x, y, "exact")
    assert exact.item() == pytest.approx(reference, rel=1e-4)
    signed = trace_penalty(model, x, y, "signed", probes=2, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(exact + signed, list(trainable_params(model).values()), allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)


class _WritesIntoAFreshTensor(torch.nn.Module):
    """An in-place write of a batched value into an unbatched tensor: the one thing vmap cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, CLASSES)

    def forward(self, x):
        out = torch.zeros(x.shape[0], CLASSES)
        out[:] = self.fc(x)
        return out


def test_the_loop_fallback_is_chosen_where_vmap_cannot_run():
    model = _WritesIntoAFreshTensor()
    x, y = torch.randn(5, 6), torch.randint(0, CLASSES, (5,))
    params = trainable_params(model)
    auto = per_sample_grads(model, x, y)  # vmap raises inside; the loop answers
    loop = per_sample_grads_loop(model, params, x, y)
    assert relative_error(auto, loop) < 1e-6
    assert trace_penalty(model, x, y, "exact").item() == pytest.approx(
        sum(float(g.pow(2).sum()) for g in loop.values()) / 5, rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_fip_is_exact_at_zero_shift_and_folds_back_into_the_users_architecture(family, request):
    model, size = _family(family, request)
    model.eval()
    stock_keys = set(model.state_dict())
    x, _ = _batch(size, n=3, seed=3)
    with torch.no_grad():
        before = model(x)
        to_spectral_shift(model)
        assert (model(x) - before).abs().max() < 1e-4
        for m in model.modules():
            if isinstance(m, SpectralShift | ShiftedSpectrum):
                m.delta.copy_(0.01 * torch.randn_like(m.delta))
        shifted = model(x)
        assert (shifted - before).abs().max() > 1e-6
        fold_spectral_shift(model)
    assert set(model.state_dict()) == stock_keys
    assert (model(x) - shifted).abs().max() < 1e-4


def test_fast_fip_shifts_multihead_attention_projections_and_names_what_it_left_alone():
    torch.manual_seed(4)
    model = AttentionNet().eval()
    assert left_alone(model) == ["pos"]
    in_proj = model.attn.in_proj_weight.detach().clone()
    to_spectral_shift(model)
    shifts = [m for m in model.modules() if isinstance(m, ShiftedSpectrum)]
    assert len(shifts) == 1 and isinstance(model.attn.out_proj, SpectralShift)
    assert all(n.endswith(".delta") for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        shifts[0].delta.fill_(-0.5)
    fold_spectral_shift(model)
    expected = torch.relu(torch.linalg.svdvals(in_proj.double()) - 0.5)
    got = torch.linalg.svdvals(model.attn.in_proj_weight.detach().double())
    assert torch.allclose(got, expected, atol=1e-5)


def test_left_alone_names_a_vits_tokens():
    names = left_alone(build_model(timm_spec()))
    assert set(names) == {"cls_token", "pos_embed"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["fip", "fast-fip"])
def test_a_few_purification_steps_run_with_finite_losses(family, method, request):
    model, size = _family(family, request)
    model.eval()
    x, y = _batch(size, n=16, seed=5)
    cfg = PurifyConfig(method=method, iterations=3, batch_size=8, trace_every=1, trace_batch=4, augment=True,
                       augment_pad=2, fisher_samples=8, eval_every=1)

    def evaluate(m):  # a folded snapshot each step: folding it must leave the model being trained intact
        with torch.no_grad():
            return {"acc": float((m(x).argmax(1) == y).float().mean())}

    result = purify(model, x, y, cfg, evaluate)
    assert len(result.history) == 3 and [e["step"] for e in result.evaluations] == [0, 1, 2, 3]
    assert all(math.isfinite(h["total"]) and h["trace"] > 0 for h in result.history)
    assert set(result.model.state_dict()) == set(model.state_dict())
    assert not any(isinstance(m, SpectralShift | ShiftedSpectrum) for m in result.model.modules())
    with torch.no_grad():
        assert bool(torch.isfinite(result.model(x)).all())
