"""Fine-pruning of a GPT-2's MLP neurons, the language-model field's own defence (BackdoorLLM's pruning baseline,
after Liu et al.'s fine-pruning): units a backdoor uses tend to stay quiet on clean data, so zeroing the least
active hidden units on D_val and then fine-tuning briefly removes the backdoor's path at little clean cost.

A hidden unit ``j`` of block ``l`` is column ``j`` of ``mlp.c_fc`` (GPT-2's Conv1D stores its weight ``in x out``)
with its bias, and row ``j`` of ``mlp.c_proj``. Zeroing all three kills it for good: its activation is
``act(0) = 0`` and no gradient reaches either side (its output weights are zero and so is its input), so a later
fine-tuning with SGD and no weight decay does not bring it back.
Units are ranked per layer (every block loses the same share), by mean activation (after the non-linearity) over
the non-padding tokens of D_val. The rate is chosen on D_val alone (:func:`choose_rate`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from fip.tasks import CAUSAL_LM

RATES = tuple(round(0.05 * i, 2) for i in range(1, 19))  # 5 % .. 90 %: the candidates choose_rate tries


def mlp_blocks(model: nn.Module) -> list[nn.Module]:
    """The MLP of every GPT-2 block, in order."""
    blocks = [m for m in model.modules() if hasattr(m, "c_fc") and hasattr(m, "c_proj") and hasattr(m, "act")]
    if not blocks:
        raise ValueError("no GPT-2 MLP (c_fc, act, c_proj) found: pruning handles GPT-2 models")
    return blocks


@torch.no_grad()
def mean_activations(model: nn.Module, x: torch.Tensor, pad_id: int, batch: int = 64) -> list[torch.Tensor]:
    """Per block, each hidden unit's mean activation over the non-padding tokens of `x` (``(B, T)`` ids)."""
    blocks = mlp_blocks(model)
    sums: list[torch.Tensor | None] = [None] * len(blocks)
    mask_box: list[torch.Tensor] = []

    def hook(i: int):
        def fn(module, args, out):
            m = mask_box[0].to(out.dtype)[..., None]  # (B, T, 1)
            s = (out * m).sum((0, 1))
            sums[i] = s if sums[i] is None else sums[i] + s
        return fn

    if not all(isinstance(b.act, nn.Module) for b in blocks):
        raise ValueError("the MLP's activation is not a module: cannot observe it")
    handles = [b.act.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for i in range(0, len(x), batch):
            xb = x[i: i + batch]
            mask_box[:] = [xb != pad_id]
            tokens += int(mask_box[0].sum())
            model(input_ids=xb)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [s / tokens for s in sums]


@torch.no_grad()
def prune_mlp(model: nn.Module, activations: Sequence[torch.Tensor], rate: float) -> dict[str, list[int]]:
    """Zero the ``rate`` share of least active units in every block (in place); returns the pruned unit indices."""
    if not 0 <= rate < 1:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    pruned = {}
    for i, (block, act) in enumerate(zip(mlp_blocks(model), activations, strict=True)):
        k = int(round(rate * act.numel()))
        idx = torch.argsort(act, stable=True)[:k]
        block.c_fc.weight[:, idx] = 0.0
        block.c_fc.bias[idx] = 0.0
        block.c_proj.weight[idx, :] = 0.0
        pruned[f"block{i}"] = sorted(idx.tolist())
    return pruned


@torch.no_grad()
def next_token_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> float:
    """Next-token top-1 accuracy on the scored positions of a causal-LM batch (D_val's responses)."""
    model.eval()
    hits = total = 0
    for i in range(0, len(x), batch):
        h, n = CAUSAL_LM.hits(model(input_ids=x[i: i + batch]).logits, y[i: i + batch])
        hits, total = hits + h, total + n
    return hits / total


def choose_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, pad_id: int, max_drop: float,
                rates: Sequence[float] = RATES) -> tuple[float, dict[float, float]]:
    """The largest rate whose pruned model (before fine-tuning) loses at most `max_drop` of D_val next-token
    accuracy (absolute share): the defender's rule, D_val only. Returns (rate, accuracy per rate tried)."""

    acts = mean_activations(model, x, pad_id)
    base = next_token_acc(model, x, y)
    accs, best = {0.0: base}, 0.0
    for r in sorted(rates):
        trial = copy.deepcopy(model)
        prune_mlp(trial, acts, r)
        accs[r] = next_token_acc(trial, x, y)
        if base - accs[r] <= max_drop:
            best = r
    return best, accs
