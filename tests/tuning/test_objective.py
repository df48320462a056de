"""The objective's pieces without Ray: the D_val split, the features, the score, the search space."""

import math
import random

import pytest
import torch
from torch import nn

from tuning.holdout import split_dval
from tuning.objective import Holdout, ObjectiveWeights, fisher_trace, measure, score
from tuning.report import spearman
from tuning.space import SearchSpace

pytestmark = pytest.mark.numerics  # figures from the CPU's kernels: `make test-avx2` runs them again


def test_split_is_class_balanced_disjoint_and_seeded():
    y = torch.arange(10).repeat_interleave(20)
    train, held = split_dval(y, 0.3, seed=1)
    assert set(train).isdisjoint(held) and len(train) + len(held) == 200
    assert torch.bincount(y[held], minlength=10).tolist() == [6] * 10
    again, _ = split_dval(y, 0.3, seed=1)
    other, _ = split_dval(y, 0.3, seed=2)
    assert (again == train).all() and not (other == train).all()
    with pytest.raises(ValueError, match="class 3 has 1 clean sample"):
        split_dval(torch.tensor([0, 0, 3]), 0.3, 0)


def test_features_against_hand_computation(one_thread):
    torch.manual_seed(0)
    suspect = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(12, 1, 2, 2), torch.arange(12) % 3
    holdout = Holdout.from_suspect(suspect, x, y)
    same = measure(suspect, holdout)
    assert same["agreement"] == 1.0 and same["kl_to_suspect"] == pytest.approx(0.0, abs=1e-7)
    assert same["trace_ratio"] == pytest.approx(1.0)
    # Tr(F) by a plain loop over samples
    ref = 0.0
    for i in range(12):
        suspect.zero_grad()
        nn.functional.cross_entropy(suspect(x[i : i + 1]), y[i : i + 1]).backward()
        ref += sum(float(p.grad.pow(2).sum()) for p in suspect.parameters())
    assert fisher_trace(suspect, x, y) == pytest.approx(ref / 12, rel=1e-5)
    moved = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    feats = measure(moved, holdout)
    p, q = torch.softmax(suspect(x), 1), torch.softmax(moved(x), 1)
    assert feats["kl_to_suspect"] == pytest.approx(float((p * (p / q).log()).sum(1).mean().detach()), rel=1e-4)
    assert feats["agreement"] == float((p.argmax(1) == q.argmax(1)).float().mean())


def test_score_prices_accuracy_and_rewards_moving_and_flattening():
    w = ObjectiveWeights(acc=1.0, acc_budget=0.02, acc_excess=4.0, kl=0.1, kl_cap=1.0, curvature=0.1, uap=0.0)
    suspect = {"acc": 0.90}
    base = {"holdout_acc": 0.90, "kl_to_suspect": 0.0, "trace_ratio": 1.0}
    assert score(base, suspect, w) == 0.0
    assert score({**base, "kl_to_suspect": 0.5}, suspect, w) > 0
    assert score({**base, "trace_ratio": 0.5}, suspect, w) == pytest.approx(w.curvature * math.log(2))
    small = score({**base, "holdout_acc": 0.89}, suspect, w)
    large = score({**base, "holdout_acc": 0.80}, suspect, w)
    assert small == pytest.approx(-0.01) and large == pytest.approx(-0.1 - w.acc_excess * 0.08)
    # the defaults estimate DER: -(ACC lost) - uap_max, i.e. 2 * DER - 1 up to the suspect's ASR, with the
    # probe's share standing for the ASR left; curvature and KL are measured, not scored
    d = ObjectiveWeights()
    probed = {**base, "uap_max": 0.8}
    assert score({**probed, "trace_ratio": 0.5, "kl_to_suspect": 0.7}, suspect, d) == pytest.approx(-0.8)
    # 3 points of accuracy for 60 points less reach to one class: better; 10 points for 5: worse
    assert score({**probed, "holdout_acc": 0.87, "uap_max": 0.2}, suspect, d) == pytest.approx(-0.23)
    assert score({**probed, "holdout_acc": 0.80, "uap_max": 0.75}, suspect, d) < score(probed, suspect, d)
    assert score({**probed, "holdout_acc": 0.95}, suspect, d) == pytest.approx(-0.8)  # no credit beyond the suspect
    with pytest.raises(ValueError, match="objective weight kl must be"):
        ObjectiveWeights(kl=-1)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_job_flags_pin_the_space_and_space_flags_win():
    """``fip tune --iterations 10`` runs 10 steps (the default space fixes 300), ``--lr`` stops the search over lr
    with a line saying so, and a later ``--space`` flag wins over both."""
    space, pinned = SearchSpace.default().under_flags({"iterations": 10, "lr": 0.01, "batch_size": 16})
    assert "iterations" not in space.fixed and "lr" not in space.dims and "lr" not in space.fixed
    assert pinned == ["--lr 0.01 pins purify.lr, which the search space would search (loguniform [0.002, 0.03])"]
    assert space.with_flags(["lr=1000"]).fixed["lr"] == 1000


def test_search_space_from_text_and_flags():
    space = SearchSpace.default().with_flags(["lr=0.02", "iterations=choice:10,20", "eta_f=loguniform:1e-4:1e-2"])
    # the default fixes 300 iterations of FIP; a flag turns a fixed setting back into a searched one
    assert space.fixed == {"lr": 0.02, "method": "fip"} and space.dims["iterations"].args == (10, 20)
    rng = random.Random(0)
    for _ in range(20):
        s = space.sample(rng)
        assert 1e-4 <= s["eta_f"] <= 1e-2 and s["iterations"] in (10, 20) and s["method"] == "fip"
    with pytest.raises(ValueError, match="'eta_x' is not a purify setting"):
        SearchSpace.from_dict({"eta_x": {"uniform": [0, 1]}})
    with pytest.raises(ValueError, match="loguniform needs low > 0"):
        SearchSpace.from_dict({"eta_f": {"loguniform": [0, 1]}})
    with pytest.raises(ValueError, match="method='sgd' is not a valid purify setting"):
        SearchSpace.from_dict({"method": {"choice": ["fip", "sgd"]}})
    with pytest.raises(ValueError, match="expected NAME=KIND"):
        space.with_flags(["lr"])


class _PlantedDirection(nn.Module):
    """Linear logits with a planted 'backdoor' direction v into class 0 of gain 10 and margin 1: a shared
    perturbation along v of norm r sends every image to class 0 exactly when 10 r > 1; classes 1 and 2
    split the images by the sign of their offset along u (|u . offset| = 0.4), so reaching either for every
    image needs a norm above 0.4."""

    def __init__(self, v: torch.Tensor, u: torch.Tensor):
        super().__init__()
        self.v, self.u = v, u

    def forward(self, x):
        z = x.flatten(1) - 0.5
        return torch.stack([10 * z @ self.v - 1, z @ self.u, -(z @ self.u)], 1)


def test_universal_flip_finds_the_planted_direction_and_respects_the_radius(one_thread):
    from tuning.objective import universal_flip

    d = 16
    v = torch.zeros(d)
    v[0] = 1.0
    u = torch.zeros(d)
    u[1] = 1.0
    signs = torch.tensor([1.0, -1.0]).repeat(15)
    x = (0.5 + 0.4 * signs[:, None] * u).view(30, 1, 4, 4)
    y = torch.where(signs > 0, 1, 2)
    model = _PlantedDirection(v, u)
    strong = universal_flip(model, x, y, radius=0.2)  # 10 * 0.2 = 2 > 1: every image to class 0
    assert strong["uap_class"] == 0 and strong["uap_max"] == 1.0
    weak = universal_flip(model, x, y, radius=0.05)  # 10 * 0.05 = 0.5 < 1: class 0 is out of reach
    assert weak["uap_max"] == 0.0  # and classes 1 and 2 need a norm above 0.4 for the other class's images
    assert universal_flip(model, x, y, radius=0.6)["uap_max"] == 1.0


def test_universal_flip_reports_every_class_and_the_images_it_moved(one_thread):
    from tuning.objective import universal_flip

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(30, 1, 4, 4), torch.tensor([0] * 6 + [1] * 10 + [2] * 14)
    found = universal_flip(model, x, y, radius=0.8)
    hits = found["uap_hits"]
    assert hits.shape == (3, 30) and not hits[y[None, :] == torch.arange(3)[:, None]].any()  # never its own class
    for c in range(3):  # each class's share counts only the images of the other classes
        assert found["uap_rates"][c] == pytest.approx(hits[c].sum().item() / int((y != c).sum()))
    assert found["uap_max"] == max(found["uap_rates"]) and found["uap_class"] == found["uap_rates"].index(found["uap_max"])


def test_the_probe_is_measured_and_scored_only_when_weighted(one_thread):
    from tuning.objective import evaluate_objective

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(30, 1, 4, 4), torch.arange(3).repeat(10)
    holdout = Holdout.from_suspect(model, x, y)
    plain = evaluate_objective(model, holdout, ObjectiveWeights(uap=0.0))
    assert "uap_max" not in plain
    probed = evaluate_objective(model, holdout, ObjectiveWeights(uap=0.5))
    assert 0 <= probed["uap_max"] <= 1
    assert probed["objective"] == pytest.approx(plain["objective"] - 0.5 * probed["uap_max"])


def test_universal_flip_leaves_the_model_as_it_found_it(one_thread):
    from tuning.objective import universal_flip

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    model[1].bias.requires_grad_(False)  # a frozen part stays frozen
    model.train()
    universal_flip(model, torch.rand(12, 1, 4, 4), torch.arange(3).repeat(4), radius=0.5)
    assert model.training and model[1].weight.requires_grad and not model[1].bias.requires_grad
    assert model[1].weight.grad is None  # only the perturbation was differentiated
