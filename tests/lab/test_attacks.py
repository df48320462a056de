"""Each trigger touches exactly the pixels it should, in the way it should; bad parameters are named."""

import numpy as np
import pytest
import torch

from lab.attacks import ATTACKS, AttackConfig, AttackError, build_attack, checkerboard
from lab.datasets import ImageSet

SHAPE = (1, 28, 28)


def _data(n=200, seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (n, *shape), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 10
    return ImageSet(x, y, [str(i) for i in range(10)], "synthetic")


def _attack(name, **kw):
    params = kw.pop("params", {})
    return build_attack(AttackConfig(name, params=params, **kw), SHAPE, 10)


def test_badnets_changes_only_its_patch():
    a = _attack("badnets")
    x = torch.rand(4, *SHAPE) * 0.5
    out = a.apply(x)
    changed = (out != x).any(0).any(0)
    expected = torch.zeros(28, 28, dtype=torch.bool)
    expected[25:28, 25:28] = True
    assert torch.equal(changed, expected)
    assert torch.all(out[..., 25:, 25:] == 1.0)
    board = _attack("badnets", params={"pattern": "checkerboard", "size": 4, "position": [2, 5]}).apply(x)
    assert torch.equal(board[0, :, 2:6, 5:9], checkerboard(4, 1))
    assert torch.equal(board[:, :, :2], x[:, :, :2])


def test_blend_is_the_convex_combination_everywhere():
    a = _attack("blend", params={"alpha": 0.2})
    x = torch.rand(3, *SHAPE)
    assert torch.allclose(a.apply(x), 0.8 * x + 0.2 * a.pattern)
    assert torch.equal(_attack("blend").pattern, a.pattern)  # seeded


def test_sig_poisons_only_target_class_and_keeps_labels():
    data = _data()
    a = _attack("sig", target=3, poison_rate=0.05)
    p = a.poison(data)
    assert torch.equal(p.data.y, data.y)
    assert set(data.y[p.poisoned].tolist()) == {3}
    changed = np.flatnonzero((p.data.x != data.x).flatten(1).any(1).numpy())
    assert set(changed) <= set(p.poisoned.tolist()) and len(changed) > 0
    col_signal = a.apply(torch.full((1, *SHAPE), 0.5))[0, 0] - 0.5
    assert torch.allclose(col_signal, col_signal[0:1].expand(28, 28))  # constant down each column


def test_dirty_label_poisoning_relabels_exactly_the_recorded_indices():
    data = _data()
    a = _attack("badnets", target=0, poison_rate=0.1, seed=5)
    p = a.poison(data)
    assert len(p.poisoned) == 20 and all(data.y[p.poisoned] != 0)
    assert torch.all(p.data.y[p.poisoned] == 0)
    others = np.setdiff1d(np.arange(len(data)), p.poisoned)
    assert torch.equal(p.data.y[others], data.y[others]) and torch.equal(p.data.x[others], data.x[others])
    assert a.poison(data).poisoned_hash == p.poisoned_hash  # same seed, same indices
    assert _attack("badnets", poison_rate=0.1, seed=6).poison(data).poisoned_hash != p.poisoned_hash


def test_all_to_all_targets_next_class_and_clean_label_refuses_it():
    a = _attack("blend", all_to_all=True)
    assert a.target_of(torch.tensor([0, 4, 9])).tolist() == [1, 5, 0]
    data = _data()
    p = a.poison(data)
    assert torch.equal(p.data.y[p.poisoned], (data.y[p.poisoned] + 1) % 10)
    with pytest.raises(AttackError, match="clean-label"):
        _attack("sig", all_to_all=True)


def test_wanet_warps_and_noise_samples_keep_labels():
    data = _data()
    a = _attack("wanet", params={"s": 1.0})
    x = torch.rand(2, *SHAPE)
    assert not torch.allclose(a.apply(x), x)
    identity = _attack("wanet", params={"s": 0.0})
    assert torch.allclose(identity.apply(x), x, atol=1e-5)
    p = a.poison(data)
    noise = np.array(p.extra["noise_indices"])
    assert len(noise) == 2 * len(p.poisoned) and not set(noise) & set(p.poisoned.tolist())
    assert torch.equal(p.data.y[noise], data.y[noise])


def test_bpp_quantises_to_its_levels():
    a = _attack("bpp", params={"levels": 8})
    out = a.apply(torch.rand(2, *SHAPE))
    assert torch.allclose(out * 7, torch.round(out * 7), atol=1e-6)
    dithered = _attack("bpp", params={"levels": 4, "dither": True}).apply(torch.rand(1, 1, 6, 6))
    assert torch.allclose(dithered * 3, torch.round(dithered * 3), atol=1e-6)


def test_label_consistent_perturbs_within_eps_and_stamps_four_corners():
    data = _data(n=100)
    ref = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    a = _attack("lc", target=2, poison_rate=0.05, params={"eps": 8 / 255, "steps": 3})
    a.fit(data, ref)
    p = a.poison(data)
    assert torch.equal(p.data.y, data.y) and set(data.y[p.poisoned].tolist()) == {2}
    corners = a.mask[0] > 0
    diff = (p.data.x[p.poisoned].float() - data.x[p.poisoned].float()).abs()
    assert diff[:, :, ~corners].max() <= 8 + 1  # eps (in pixel units), plus rounding
    assert torch.equal(p.data.x[p.poisoned][:, :, :3, :3].float() / 255, checkerboard(3, 1).expand(len(p.poisoned), 1, 3, 3))


def test_trojan_trigger_excites_its_neurons_and_stays_in_its_patch():
    torch.manual_seed(0)
    data = _data(n=64)
    ref = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    a = _attack("trojan", params={"steps": 50})
    random_patch = a.patch.clone()
    x = data.x.float() / 255
    feats = lambda img: ref[:3](img)  # noqa: E731
    before = feats(a.apply(x))
    a.fit(data, ref)
    after = feats(a.apply(x))
    assert after[:, a.neurons].mean() > before[:, a.neurons].mean()
    assert not torch.equal(a.patch, random_patch)
    changed = (a.apply(x) != x).any(0).any(0)
    assert not changed[:23].any() and not changed[:, :23].any()


def test_input_aware_triggers_depend_on_the_input():
    a = _attack("input-aware")
    x = torch.rand(4, *SHAPE)
    with torch.no_grad():
        p1, m1 = a.generator_net(x[:1])
        p2, m2 = a.generator_net(x[1:2])
    assert not torch.allclose(p1, p2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    loss = a.training_loss(model, x, torch.tensor([1, 2, 3, 4]))
    loss.backward()
    assert all(p.grad is not None for p in a.generator_net.parameters())
    state = a.state_tensors()
    b = _attack("input-aware", seed=9)
    b.load_state_tensors(state)
    assert torch.allclose(b.apply(x), a.apply(x))


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(name="nope"), "unknown attack 'nope'; known:"),
        (dict(name="badnets", poison_rate=1.5), r"poison rate must be in \(0, 1\), got 1.5"),
        (dict(name="badnets", target=10), r"target class 10 out of range: expected 0..9"),
        (dict(name="badnets", params={"size": 40}), "trigger size 40 does not fit the 28x28 image"),
        (dict(name="blend", params={"colour": 1}), r"unknown parameter\(s\) \['colour'\]"),
    ],
)
def test_bad_attack_settings_are_named(kw, msg):
    params = kw.pop("params", {})
    with pytest.raises(AttackError, match=msg):
        build_attack(AttackConfig(params=params, **kw), SHAPE, 10)


def test_every_registered_attack_builds():
    for name in ATTACKS:
        assert _attack(name).name == name


def test_input_aware_seeds_its_generator_without_touching_the_global_rng():
    from lab.attacks import TriggerGenerator

    torch.manual_seed(42)
    before = torch.get_rng_state()
    a = _attack("input-aware", seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(3)  # how the generator used to be seeded: same weights
    old = TriggerGenerator(1, 16).state_dict()
    new = a.generator_net.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old)
    assert not torch.equal(_attack("input-aware", seed=4).generator_net.state_dict()["net.0.weight"], new["net.0.weight"])


def test_trigger_params_merge_defaults_and_refuse_unknown_names():
    from lab.attacks import trigger_params

    assert trigger_params(AttackConfig("badnets", params={"size": 2})) == {"size": 2, "position": "bottom-right", "pattern": "white"}
    with pytest.raises(AttackError, match=r"badnets: unknown parameter\(s\) \['colour'\]"):
        trigger_params(AttackConfig("badnets", params={"colour": 1}))
    with pytest.raises(AttackError, match="unknown attack 'nope'"):
        trigger_params(AttackConfig("nope"))
