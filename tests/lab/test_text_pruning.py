"""Fine-pruning of GPT-2 MLP units (lab.text.pruning) against a hand computation: with c_fc's weights zero, a
unit's activation is gelu_new(bias) at every token, so its mean over D_val and the ranking are known by hand."""

import math

import pytest
import torch

from fip.families import import_transformers
from fip.tasks import IGNORE
from lab.text.pruning import RATES, choose_rate, mean_activations, mlp_blocks, prune_mlp

PAD = 0


def gelu_new(b: float) -> float:
    return 0.5 * b * (1 + math.tanh(math.sqrt(2 / math.pi) * (b + 0.044715 * b ** 3)))


def tiny_gpt2(seed: int = 0):
    tf = import_transformers()
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=30, n_positions=16, n_embd=8, n_layer=2, n_head=2, n_inner=6,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return tf.GPT2LMHeadModel(cfg).eval()


BIASES = [[0.5, -2.0, 1.5, 0.0, -0.5, 3.0], [2.0, 1.0, -1.0, -3.0, 0.25, 0.75]]


def constant_units(model) -> None:
    with torch.no_grad():
        for block, b in zip(mlp_blocks(model), BIASES):
            block.c_fc.weight.zero_()
            block.c_fc.bias.copy_(torch.tensor(b))


def batch() -> torch.Tensor:
    x = torch.randint(1, 30, (3, 7), generator=torch.Generator().manual_seed(1))
    x[1, 4:] = PAD  # padding is not counted
    return x


def test_mean_activations_and_pruning_match_the_hand_computation():
    model = tiny_gpt2()
    constant_units(model)
    acts = mean_activations(model, batch(), PAD)
    for a, b in zip(acts, BIASES):
        assert a.tolist() == pytest.approx([gelu_new(v) for v in b], abs=1e-6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruned = prune_mlp(model, acts, rate=0.5)  # 3 of 6 units per block: the 3 lowest gelu_new(bias)
    assert pruned == {"block0": [1, 3, 4], "block1": [2, 3, 4]}
    for i, block in enumerate(mlp_blocks(model)):
        idx, keep = pruned[f"block{i}"], [j for j in range(6) if j not in pruned[f"block{i}"]]
        assert block.c_fc.weight[:, idx].abs().sum() == 0 and block.c_fc.bias[idx].abs().sum() == 0
        assert block.c_proj.weight[idx, :].abs().sum() == 0
        assert torch.equal(block.c_fc.bias[keep], before[f"transformer.h.{i}.mlp.c_fc.bias"][keep])
        assert torch.equal(block.c_proj.weight[keep], before[f"transformer.h.{i}.mlp.c_proj.weight"][keep])


def test_pruned_units_stay_dead_under_fine_tuning():
    """Zero in, zero out: no gradient reaches a pruned unit, so FT's SGD cannot revive it."""
    model = tiny_gpt2()
    x = batch()
    pruned = prune_mlp(model, mean_activations(model, x, PAD), rate=0.5)
    y = x.clone()
    y[x == PAD] = IGNORE
    model.train()
    model(input_ids=x, labels=y).loss.backward()
    for i, block in enumerate(mlp_blocks(model)):
        dead = pruned[f"block{i}"]
        assert block.c_fc.weight.grad[:, dead].abs().sum() == 0 and block.c_fc.bias.grad[dead].abs().sum() == 0
        assert block.c_proj.weight.grad[dead, :].abs().sum() == 0


def test_choose_rate_is_the_largest_within_the_allowed_drop():
    model = tiny_gpt2()
    x = batch()
    y = x.clone()
    y[x == PAD] = IGNORE
    rate, accs = choose_rate(model, x, y, PAD, max_drop=1.0)
    assert rate == max(RATES)  # any drop allowed: the largest candidate
    rate, accs = choose_rate(model, x, y, PAD, max_drop=0.0)
    assert accs[0.0] - accs[rate] <= 0 and all(accs[0.0] - accs[r] > 0 for r in RATES if r > rate)
