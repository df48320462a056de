"""The purification loop on a toy backdoor, and its failure modes."""

import math

import pytest
import torch
from toy import acc_asr, blobs, train_backdoored

from fip.fisher import fisher_diag
from fip.purify import NonFiniteLossError, PurifyConfig, purify

pytestmark = pytest.mark.numerics  # figures from the CPU's kernels: `make test-avx2` runs them again


def test_fip_lowers_fisher_trace_and_trigger_success_while_accuracy_holds(one_thread):
    model = train_backdoored()
    acc0, asr0 = acc_asr(model)
    assert acc0 > 0.9 and asr0 > 0.85  # the toy model really is backdoored
    xv, yv = blobs(200, seed=5)
    trace0 = fisher_diag(model, [(xv, yv)]).trace()
    cfg = PurifyConfig(eta_f=0.5, eta_r=1.0, lr=0.05, iterations=300, batch_size=64, augment=False,
                       trace_estimator="exact", trace_every=1, max_grad_norm=0.0)
    result = purify(model, xv, yv, cfg, evaluate=lambda m: dict(zip(("acc", "asr"), acc_asr(m))))
    acc1, asr1 = acc_asr(result.model)
    trace1 = fisher_diag(result.model, [(xv, yv)]).trace()
    assert trace1 < 0.5 * trace0
    assert asr1 < 0.3
    assert acc1 > acc0 - 0.05
    assert acc_asr(model) == (acc0, asr0)  # the suspect model is untouched
    assert len(result.history) == 300 and all("trace" in h for h in result.history)
    assert result.evaluations[0]["step"] == 0 and result.evaluations[-1]["asr"] == pytest.approx(asr1)


def test_fast_fip_runs_and_returns_stock_model():
    model = train_backdoored(steps=300)
    xv, yv = blobs(100, seed=6)
    cfg = PurifyConfig(method="fast-fip", eta_f=0.5, eta_r=1.0, iterations=20, batch_size=32, augment=False)
    result = purify(model, xv, yv, cfg)
    assert type(result.model) is type(model)
    assert set(result.model.state_dict()) == set(model.state_dict())
    assert result.history[0]["trace"] > 0 and math.isfinite(result.history[-1]["total"])


def test_non_finite_loss_names_step_and_term():
    model = train_backdoored(steps=50)
    xv, yv = blobs(50, seed=7)
    cfg = PurifyConfig(eta_f=0.0, eta_r=0.0, lr=1e38, momentum=0.0, iterations=50, batch_size=16, augment=False)
    with pytest.raises(NonFiniteLossError, match=r"step \d+: loss term '(ce|total)' is (nan|inf)"):
        purify(model, xv, yv, cfg)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown method 'sft'"):
        PurifyConfig(method="sft")
    with pytest.raises(ValueError, match="eta_f must be a finite number >= 0, got -1"):
        PurifyConfig(eta_f=-1)
    with pytest.raises(ValueError, match="clean set D_val is empty"):
        purify(train_backdoored(steps=5), torch.zeros(0, 1, 4, 4), torch.zeros(0, dtype=torch.long),
               PurifyConfig(iterations=1))


def test_augment_batch_crops_only_the_requested_share_and_keeps_the_rest_in_place():
    from fip.training import augment_batch

    x = torch.rand(400, 1, 8, 8) + 0.1  # no zeros, so a shifted crop always shows padding
    def unmoved(out: torch.Tensor) -> torch.Tensor:
        return ((out == x) | (out == x.flip(-1))).flatten(1).all(1)

    assert unmoved(augment_batch(x, torch.Generator().manual_seed(0), pad=2, crop_prob=0.0)).all()
    share_moved = 1 - unmoved(augment_batch(x, torch.Generator().manual_seed(0), pad=2, crop_prob=0.5)).float().mean()
    # a cropped sample keeps its place only when both offsets land on the centre: 1/25 of the time
    assert abs(share_moved - 0.5 * 24 / 25) < 0.07
    all_moved = 1 - unmoved(augment_batch(x, torch.Generator().manual_seed(0), pad=2, crop_prob=1.0)).float().mean()
    assert abs(all_moved - 24 / 25) < 0.04
    with pytest.raises(ValueError, match="crop_prob"):
        PurifyConfig(crop_prob=1.5)


def test_crop_phase_ends_at_crop_until():
    from fip.purify import crop_prob_at

    cfg = PurifyConfig(iterations=10, crop_prob=0.8, crop_until=0.4)
    assert [crop_prob_at(cfg, s) for s in range(10)] == [0.8] * 4 + [0.0] * 6
    assert all(crop_prob_at(PurifyConfig(iterations=10), s) == 1.0 for s in range(10))


def test_distillation_term_runs_only_on_uncropped_steps():
    from fip.fisher import trainable_params
    from fip.purify import Purifier, prepare_model

    model = train_backdoored()
    cfg = PurifyConfig(iterations=4, crop_until=0.5, eta_kl=1.0, eta_f=0.0, eta_r=0.0, batch_size=8, lr=0.5)
    work = prepare_model(model, cfg)
    purifier = Purifier(work, {n: torch.zeros_like(p) for n, p in trainable_params(work).items()}, cfg)
    x, y = blobs(8, 0)
    records = [purifier.step(x, y) for _ in range(4)]
    assert ["kl" in r for r in records] == [False, False, True, True]
    assert records[2]["kl"] > 0  # two steps moved the model away from its teacher


def test_distillation_term_runs_on_every_step_without_augmentation():
    from fip.fisher import trainable_params
    from fip.purify import Purifier, prepare_model

    model = train_backdoored()
    cfg = PurifyConfig(iterations=3, augment=False, eta_kl=1.0, eta_f=0.0, eta_r=0.0, batch_size=8, lr=0.5)
    work = prepare_model(model, cfg)
    purifier = Purifier(work, {n: torch.zeros_like(p) for n, p in trainable_params(work).items()}, cfg)
    x, y = blobs(8, 0)
    assert all("kl" in purifier.step(x, y) for _ in range(3))  # no batch is cropped, so every one is taught
