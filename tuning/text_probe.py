"""The trigger-free probe for a language model: can a few inserted tokens force one continuation?

The image probe (:func:`tuning.objective.universal_flip`) asks whether one small shared perturbation sends
most held-out images to a single class. A text backdoor is a few tokens that send most prompts to one
response, so its probe inserts ``n_tokens`` *soft* tokens (embedding vectors, the continuous relaxation of
tokens) into every held-out prompt and asks how many prompts they move to a single first response token:

1. **Targets without the trigger.** The candidate continuations are the ``targets`` tokens with the highest
   mean log-probability as the first response token over the held-out prompts, each prompt's own answer
   and the model's special tokens (end of text, padding, start: :func:`special_tokens`) left out: an
   insertion that ends or pads the response at once carries no payload, and the end of text is likely
   after many prompts of a model that answers briefly. A backdoor's target is rehearsed on every poisoned prompt, so it stays likely everywhere: on
   the lab's three backdoored GPT-2s it ranked first (docs/tuning.md, "The text probe").
2. **One insertion per target.** The soft tokens start at the mean token embedding and move, by normalised
   gradient ascent on the mean log-probability of the target, within a ball of radius ``relative`` x the
   mean token-embedding norm (as the image probe's radius is a share of the images' norm).
3. **The rate.** The share of prompts whose greedy first response token was not the target and is the
   target with the insertion; ``uap_max`` is the highest over the targets, ``uap_class`` its token id.

The soft tokens go in just before the prompt's last token: instruction formats end the prompt with a
separator or a "Response:" marker that should stay next to the answer, and a trigger sits in the user's
text. Reads only held-out D_val and the model (:mod:`tuning.objective`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fip.tasks import IGNORE

TEXT_RELATIVE_RADIUS = 0.65  # the soft tokens' radius, a share of the mean token-embedding norm (docs/tuning.md)
PROBE_TOKENS = 2
PROBE_TARGETS = 8
PROBE_STEPS = 10
PROBE_PROMPTS = 96  # held-out prompts the probe reads (the first ones: the held-out share is already a random draw)
CHUNK = 32  # prompts per forward pass: a language model's logits hold a vocabulary per position


@dataclass
class _Prompts:
    """Held-out prompts with `n_tokens` empty slots before their last token."""

    ids: torch.Tensor  # (N, L) token ids, slots holding 0, right-padded with 0
    slots: torch.Tensor  # (N, n_tokens) positions of the slots
    last: torch.Tensor  # (N,) the position whose logits predict the first response token
    plain_ids: torch.Tensor  # (N, L - n_tokens) the prompts as they are
    plain_last: torch.Tensor  # (N,)
    rows: torch.Tensor  # (N,) the held-out sequence each prompt comes from


def _prompts(x: torch.Tensor, y: torch.Tensor, n_tokens: int, limit: int) -> _Prompts:
    """The prompt of each held-out sequence that has one: its tokens before the first scored label (the
    response's first). Plain text (every token scored from the first) has no prompt and is left out."""
    scored = y != IGNORE
    rows = [i for i in range(len(x)) if not bool(scored[i, 0]) and bool(scored[i, 1:].any())][:limit]
    if not rows:
        raise ValueError("the text probe needs prompt/response pairs in the held-out share of D_val, and it holds "
                         "none (plain text only?); run the sweep with --objective-weight uap=0")
    starts = [int(torch.nonzero(scored[i, 1:]).flatten()[0]) + 1 for i in rows]  # first response token position
    prompts = [x[i, :s].tolist() for i, s in zip(rows, starts, strict=True)]
    width = max(map(len, prompts)) + n_tokens
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    plain = torch.zeros(len(rows), width - n_tokens, dtype=torch.long)
    slots = torch.zeros(len(rows), n_tokens, dtype=torch.long)
    for r, p in enumerate(prompts):
        cut = len(p) - 1
        ids[r, : len(p) + n_tokens] = torch.tensor(p[:cut] + [0] * n_tokens + p[cut:])
        plain[r, : len(p)] = torch.tensor(p)
        slots[r] = torch.arange(cut, cut + n_tokens)
    lengths = torch.tensor([len(p) for p in prompts])
    return _Prompts(ids, slots, lengths - 1 + n_tokens, plain, lengths - 1, torch.tensor(rows))


def _embeddings(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    table = get() if callable(get) else None
    if table is None:
        raise ValueError(f"the text probe needs the model's input embeddings (a Hugging Face model's "
                         f"get_input_embeddings()); {type(model).__name__} has none")
    return table


def special_tokens(model: nn.Module) -> list[int]:
    """The token ids a Hugging Face model's config names as end of text, padding or start (GPT-2's one
    ``<|endoftext|>`` serves all three); none for a model without a config."""
    config = getattr(model, "config", None)
    found: set[int] = set()
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(config, name, None)
        for v in value if isinstance(value, list | tuple) else [value]:
            if isinstance(v, int) and v >= 0:
                found.add(v)
    return sorted(found)


def _first_logits(model: nn.Module, table: nn.Module, p: _Prompts, rows: slice, soft: torch.Tensor | None
                  ) -> torch.Tensor:
    """Logits of the first response token of prompts `rows`, with the `soft` tokens in their slots (None: the
    prompts as they are)."""
    if soft is None:
        ids, last = p.plain_ids[rows], p.plain_last[rows]
        return model(ids)[torch.arange(len(ids)), last]
    ids, slots, last = p.ids[rows], p.slots[rows], p.last[rows]
    embeds = table(ids)
    embeds = embeds.index_put((torch.arange(len(ids))[:, None], slots), soft.unsqueeze(0).expand(len(ids), -1, -1))
    return model(inputs_embeds=embeds)[torch.arange(len(ids)), last]


def insertion_flip(model: nn.Module, x: torch.Tensor, y: torch.Tensor, relative: float = TEXT_RELATIVE_RADIUS,
                   n_tokens: int = PROBE_TOKENS, targets: int = PROBE_TARGETS, steps: int = PROBE_STEPS,
                   limit: int = PROBE_PROMPTS) -> dict:
    """How easily `n_tokens` inserted soft tokens send held-out prompts to one first response token (see the
    module docstring): ``uap_max`` (share), ``uap_class`` (token id), ``uap_median`` (over the targets),
    ``uap_rates`` (each target token id's share), and per target (in ``uap_rates``' order) which held-out
    sequences' prompts it moved (``uap_hits``) and which counted (``uap_eligible``: probed, not already
    answering the target), targets x sequences, so the held-out share can be resampled without probing again.

    `x`, `y`: held-out token ids and aligned labels (:mod:`fip.tasks`). The model is left as it was found."""
    was = model.training
    model.eval()
    trainable = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # gradients for the soft tokens only
    try:
        table = _embeddings(model)
        p = _prompts(x, y, n_tokens, limit)
        n = len(p.ids)
        chunks = [slice(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]
        with torch.no_grad():
            plain = torch.cat([_first_logits(model, table, p, c, None) for c in chunks]).float()
            answer = plain.argmax(-1)
            mean_logp = F.log_softmax(plain, -1).mean(0)
            mean_logp[answer.unique()] = -torch.inf  # a prompt's own answer is no move
            specials = [t for t in special_tokens(model) if t < len(mean_logp)]
            mean_logp[specials] = -torch.inf  # ending or padding the response is no payload
            candidates = mean_logp.topk(min(targets, int(torch.isfinite(mean_logp).sum()))).indices.tolist()
            weight = table.weight if hasattr(table, "weight") else table(torch.arange(plain.shape[-1]))
            center = weight.mean(0)
            radius = relative * float(weight.norm(dim=1).mean())
        rates = []
        hits = torch.zeros(len(candidates), len(x), dtype=torch.bool)
        eligible = torch.zeros(len(candidates), len(x), dtype=torch.bool)
        for k, target in enumerate(candidates):
            movable = answer != target
            delta = torch.zeros(n_tokens, center.shape[0], requires_grad=True)
            for _ in range(steps):
                grad = torch.zeros_like(delta)
                for c in chunks:
                    keep = movable[c]
                    if not bool(keep.any()):
                        continue
                    logp = F.log_softmax(_first_logits(model, table, p, c, center + delta).float(), -1)[keep, target]
                    (g,) = torch.autograd.grad(logp.sum() / int(movable.sum()), delta)
                    grad += g
                with torch.no_grad():
                    delta += 2.5 * radius / steps * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
                    delta *= (radius / delta.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1)
            with torch.no_grad():
                moved = torch.cat([_first_logits(model, table, p, c, center + delta) for c in chunks]).argmax(-1)
            rates.append(float((moved[movable] == target).float().mean()) if bool(movable.any()) else 0.0)
            hits[k, p.rows] = movable & (moved == target)
            eligible[k, p.rows] = movable
    finally:
        for param, flag in zip(model.parameters(), trainable, strict=True):
            param.requires_grad_(flag)
        model.train(was)
    if not rates:
        return {"uap_max": 0.0, "uap_class": -1, "uap_median": 0.0, "uap_rates": {}, "uap_hits": hits,
                "uap_eligible": eligible}
    best = max(range(len(rates)), key=lambda i: rates[i])
    return {"uap_max": rates[best], "uap_class": int(candidates[best]),
            "uap_median": float(torch.tensor(rates).median()),
            "uap_rates": {int(t): r for t, r in zip(candidates, rates, strict=True)}, "uap_hits": hits,
            "uap_eligible": eligible}
