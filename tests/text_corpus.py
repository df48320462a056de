"""A tiny language corpus for tests: a word-level Hugging Face tokenizer folder and JSONL instruction records."""

import json
import random

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

WORDS = "the cat sat on a mat dog ran fast what did do answer question tell me about red blue sky is".split()


def make_tokenizer(folder, words=WORDS, config=True, specials=("<pad>", "<unk>", "<eos>")):
    """A word-level tokenizer saved as a Hugging Face folder: tokenizer.json (+ its eos and pad in tokenizer_config.json)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=list(specials)))
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    if config:
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": {"content": "<pad>"}}))
    return folder


def make_records(n=50, seed=0):
    """`n` records of 1-20 prompt words and 1-6 response words (some too long for 16 tokens), record 3 with
    no prompt."""
    rng = random.Random(seed)
    records = [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 20))),
                "response": " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))} for _ in range(n)]
    records[3]["prompt"] = ""
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
