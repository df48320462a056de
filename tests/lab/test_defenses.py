"""Every defense runs through one interface on a small backdoored model; choices use D_val only."""

import pytest
import torch

from fip.io import load_model
from lab.backdoor import attack_from_record
from lab.datasets import CleanSplit, load_dataset
from lab.defenses import DEFENSES, CleanSet, DefenseError, run_defense
from lab.defenses.common import most_aggressive_within
from lab.defenses.ibau import implicit_hypergradient

# figures from the CPU's kernels: `make test-avx2` runs them again. The level search's logic, the unknown name and
# the benchmark harness's smoke run (coarse thresholds) are not kernel figures: once, in `make test`
numerics = pytest.mark.numerics


@pytest.fixture(scope="module")
def digits_bn_lab(tmp_path_factory):
    """A backdoored PreActResNet (BatchNorm, layer2..4) on digits, for defenses that need them."""
    from lab.attacks import AttackConfig
    from lab.backdoor import LabConfig, make_backdoored_model
    from lab.train import TrainConfig

    cfg = LabConfig(attack=AttackConfig("badnets", params={"size": 2}), dataset="digits", arch="preactresnet18",
                    width=0.125, train=TrainConfig(epochs=15, batch_size=64, lr=0.05), clean_fraction=0.1)
    art = make_backdoored_model(cfg, tmp_path_factory.mktemp("bn-lab"), progress=False)
    split = CleanSplit.load(art.dval_path)
    dval = load_dataset("digits", "train").subset(split.indices)
    return art, CleanSet(dval.floats(), dval.y)


@numerics
@pytest.mark.parametrize("name", list(DEFENSES))
def test_each_defense_returns_a_stock_model_and_leaves_the_suspect_alone(name, digits_bn_lab):
    art, clean = digits_bn_lab
    suspect = load_model(art.model_path).model
    before = {k: v.clone() for k, v in suspect.state_dict().items()}
    steps = {"i-bau": 3}.get(name, 8)
    res = run_defense(name, suspect, clean, {"steps": steps, "batch_size": 32})
    assert type(res.model) is type(suspect)
    assert set(res.model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in suspect.state_dict().items())
    assert res.seconds > 0
    x = clean.x[:4]
    assert torch.isfinite(res.model(x)).all()


@numerics
def test_pruning_level_is_chosen_on_dval_accuracy_only(digits_bn_lab):
    art, clean = digits_bn_lab
    suspect = load_model(art.model_path).model
    base = clean.accuracy(suspect)
    res = run_defense("fp", suspect, clean, {"steps": 2})
    kept = [s for s in res.info["search"] if s["level"] <= res.info["pruned_fraction"]]
    assert all(s["dval_acc"] >= base - 0.10 for s in kept)
    later = [s for s in res.info["search"] if s["level"] > res.info["pruned_fraction"]]
    assert not later or later[0]["dval_acc"] < base - 0.10
    res = run_defense("anp", suspect, clean, {"steps": 5})
    assert 0 <= res.info["threshold"] <= 1 and res.info["pruned_neurons"] >= 0
    assert clean.accuracy(res.model) >= base - 0.10 - 1e-6


def test_most_aggressive_within_stops_at_the_first_violation():
    class Const(torch.nn.Module):
        def __init__(self, acc):
            super().__init__()
            self.acc = acc
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            out = torch.zeros(len(x), 2)
            out[: int(self.acc * len(x)), 1] = 1
            return out

    clean = CleanSet(torch.zeros(20, 1, 2, 2), torch.ones(20, dtype=torch.long))
    accs = {0.0: 1.0, 0.1: 0.95, 0.2: 0.8, 0.3: 0.95}
    level, _, trace = most_aggressive_within(lambda lv: Const(accs[lv]), [0.0, 0.1, 0.2, 0.3], clean, 0.1)
    assert level == 0.1 and [t["level"] for t in trace] == [0.0, 0.1, 0.2]


@numerics
def test_ibau_hypergradient_matches_the_closed_form():
    """Inner max of -(1/2)||d - A theta||^2 is d* = A theta; for outer ||d||^2 + c.theta the total
    derivative is 2 A^T A theta + c, which the implicit (Neumann) hypergradient must reproduce."""
    torch.manual_seed(0)
    a = torch.randn(3, 2, dtype=torch.float64)
    c = torch.randn(2, dtype=torch.float64)
    theta = torch.randn(2, dtype=torch.float64, requires_grad=True)
    d_star = (a @ theta).detach()
    (grad,) = implicit_hypergradient(
        [theta], d_star,
        inner_loss=lambda d: -0.5 * (d - a @ theta).pow(2).sum(),
        outer_loss=lambda d: d.pow(2).sum() + c @ theta,
        inner_lr=0.5, k=60,
    )
    expected = 2 * a.T @ a @ theta.detach() + c
    assert torch.allclose(grad, expected, rtol=1e-8)
    # without the implicit term the answer would be just c: the test can tell them apart
    assert not torch.allclose(expected, c)


def test_unknown_defense_is_named(digits_bn_lab):
    _, clean = digits_bn_lab
    with pytest.raises(DefenseError, match="unknown defense 'magic'; known: ft, fp, nad"):
        run_defense("magic", torch.nn.Linear(1, 1), clean)


def test_defense_table_quick_mode_runs_end_to_end(tmp_path):
    """The benchmark harness itself (2 attacks on real Fashion-MNIST, small) so it cannot rot."""
    import benchmarks.defense_table as table

    out = table.run(["badnets", "blend"], ["ft", "fip", "fast-fip", "anp"], quick=True, steps=3, progress=False,
                    cache=tmp_path / "cache", results=tmp_path / "results")
    assert len(out["rows"]) == 8 and set(out["means"]) == {"ft", "fip", "fast-fip", "anp"}
    assert "fast_fip_time_over_fip" in out["ratios"] and "fip_time_over_anp" in out["ratios"]
    assert (tmp_path / "results" / "defenses-fashion-mnist-quick.md").read_text().startswith("# Defenses")
    record = out["rows"][0]
    assert 0 <= record["der"] <= 1 and record["asr_before"] > 0.5
    assert attack_from_record  # the harness rebuilt triggers from records
