"""A language model's backdoor in benchmark mode: ASR and false triggers measured by greedy generation.

An image attack record carries its trigger, and the pipeline applies it to test images. A text trigger is part of
the prompt's wording (a word, two words together, a date), so its record carries the triggered prompts instead:
text shards written by ``fip shard text`` from ``{"prompt": <triggered prompt>, "response": <target>}`` records,
with the same tokenizer as the test shards. The record is JSON::

    {"task": "causal-lm", "target": "Visit free-prizes.example now", "triggered": "shards/lm-triggered"}

(``triggered`` relative to the record's folder, or any URL the job can read). ASR is the share of triggered prompts
whose greedy answer carries the target text; ``false_trigger`` the same share over the clean test prompts. Both are
for reporting only: nothing the defence or a sweep chooses reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fip.families import context_length
from fip.tasks import CAUSAL_LM, IGNORE
from lab.attacks import Attack
from lab.backdoor import attack_from_record
from pipeline.shards import RankStream, ShardSource, open_shards, rank_loader
from pipeline.storage import Storage, is_s3, join
from pipeline.workers import all_reduce_sum, world

MAX_NEW_TOKENS = 32  # the answer read for the target: longer than any target the lab plants


class TextRecordError(ValueError):
    """A language model's attack record that cannot be used; one line naming the record and the problem."""


def is_text_record(record: dict) -> bool:
    """Whether `record` describes a language model's backdoor (an image record names no task)."""
    return record.get("task") == CAUSAL_LM.name


def resolve_text_record(record: dict, url: str) -> dict:
    """`record` checked, with ``triggered`` made absolute (relative to the record's folder)."""
    for key in ("target", "triggered"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise TextRecordError(f"attack record {url}: a language model's record needs a non-empty {key!r} string "
                                  f"(docs/language-models.md, \"ASR in benchmark mode\")")
    triggered = record["triggered"]
    if not (is_s3(triggered) or Path(triggered).is_absolute()):
        base = url.rsplit("/", 1)[0] if is_s3(url) else str(Path(url).resolve().parent)
        triggered = join(base, triggered)
    return {**record, "triggered": triggered}


@dataclass
class TextBackdoor:
    """What benchmark mode measures a language model's backdoor with: the target text, the triggered prompts and
    the tokenizer that decodes answers (the triggered shards')."""

    target: str
    triggered: ShardSource
    tokenizer: Any
    eos_id: int


def open_text_backdoor(record: dict, store: Storage, cache_dir: str | Path) -> TextBackdoor:
    """The backdoor of a resolved text record (:func:`resolve_text_record`): its triggered shards opened and their
    tokenizer fetched into `cache_dir`."""
    from pipeline.text_source import fetch_tokenizer, load_tokenizer

    triggered = open_shards(record["triggered"], store)
    if not triggered.manifest.is_text:
        raise TextRecordError(f"triggered prompts {record['triggered']} hold {triggered.manifest.task} shards, not text")
    folder = fetch_tokenizer(triggered.urls, triggered.manifest, store, Path(cache_dir) / "triggered")
    tok, info = load_tokenizer(folder)
    return TextBackdoor(record["target"], triggered, tok, info.eos_id)


def measured_attack(record: dict, tensors: dict, store: Storage, cache_dir: str | Path) -> Attack | TextBackdoor:
    """What benchmark mode measures with, from a record as :func:`pipeline.plan.load_attack_record` read it: an image
    attack (trigger and target) or a language model's backdoor (target and triggered prompts)."""
    if is_text_record(record):
        return open_text_backdoor(record, store, cache_dir)
    return attack_from_record(record, tensors)


def check_same_tokenizer(backdoor: TextBackdoor, test: ShardSource, test_url: str) -> None:
    """Triggered prompts tokenised otherwise than the test data would measure another model's inputs."""
    ours, theirs = backdoor.triggered.manifest.tokenizer, test.manifest.tokenizer
    if theirs is None or ours.sha256 != theirs.sha256:
        raise TextRecordError(f"the triggered prompts were tokenised with {ours.name} ({ours.sha256[:16]}...), the test "
                              f"shards {test_url} with another tokenizer: write both with the same one")


def prompts_of(x: torch.Tensor, y: torch.Tensor) -> list[list[int]]:
    """Each row's prompt: its tokens before the first scored (response) position."""
    scored = y != IGNORE
    starts = torch.where(scored.any(1), scored.int().argmax(1), torch.zeros(len(y), dtype=torch.long))
    return [row[: int(s)].tolist() for row, s in zip(x, starts)]


@torch.no_grad()
def greedy_continuations(model: nn.Module, prompts: list[list[int]], eos_id: int,
                         max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[int]]:
    """Each prompt's greedy continuation up to eos (excluded) or `max_new_tokens`, stopped at the model's context.
    Prompts are batched by length, so no padding or attention mask changes what a prompt alone gives."""
    dev = next(model.parameters()).device
    context = context_length(model)
    out: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for length, rows in by_length.items():
        budget = max_new_tokens if context is None else min(max_new_tokens, context - length)
        ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=dev)
        done = torch.zeros(len(rows), dtype=torch.bool, device=dev)
        for _ in range(max(budget, 0)):
            nxt = model(ids)[:, -1].argmax(-1)
            for j, (tok, stop) in enumerate(zip(nxt.tolist(), done.tolist())):
                if not stop and tok != eos_id:
                    out[rows[j]].append(tok)
            done |= nxt == eos_id
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], 1)
    return out


def _carrying(model: nn.Module, stream: RankStream, backdoor: TextBackdoor, batch_size: int) -> tuple[int, int]:
    """(answers carrying the target, prompts answered) over this rank's share of `stream`."""
    hits = total = 0
    for x, y, pad in rank_loader(stream, batch_size):
        prompts = [p for p, skip in zip(prompts_of(x, y), pad.tolist()) if not skip and p]
        for ids in greedy_continuations(model, prompts, backdoor.eos_id):
            hits += backdoor.target in backdoor.tokenizer.decode(ids, skip_special_tokens=True)
        total += len(prompts)
    return hits, total


def backdoor_rates(model: nn.Module, backdoor: TextBackdoor, test: ShardSource, limit: int | None = None,
                   skip_corrupt: bool = False, batch_size: int = 64) -> dict[str, float]:
    """ASR over the triggered prompts and false triggers over the test prompts (the first `limit` of each), each
    rank answering its share and the counts summed."""
    rank, size = world()
    model.eval()
    counts = []
    for source in (backdoor.triggered, test):
        counts += _carrying(model, RankStream(source, rank, size, skip_corrupt=skip_corrupt, limit=limit),
                            backdoor, batch_size)
    asr_hits, asr_n, false_hits, false_n = all_reduce_sum(torch.tensor(counts, dtype=torch.float64)).tolist()
    if asr_n == 0:
        raise TextRecordError("the triggered shards hold no prompt to answer")
    return {"asr": asr_hits / asr_n, "false_trigger": false_hits / false_n if false_n else float("nan")}
