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


def make_language_model(folder, tokenizer_folder, records, steps=60, seed=0, positions=64):
    """A GPT-2 of a few thousand weights over the tokenizer's vocabulary, fitted for `steps` AdamW steps to answer
    `records` (so its figures are far from chance), saved as a Hugging Face folder (config.json, safetensors)."""
    import torch

    from fip.families import import_transformers, logits_only
    from fip.tasks import CAUSAL_LM, IGNORE
    from pipeline.text_source import load_tokenizer

    tf = import_transformers()
    tok, info = load_tokenizer(tokenizer_folder)
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=info.vocab_size, n_positions=positions, n_embd=32, n_layer=2, n_head=2,
                        eos_token_id=info.eos_id, bos_token_id=info.eos_id, pad_token_id=info.pad_id)
    model = tf.GPT2LMHeadModel(cfg)
    rows = []
    for r in records:
        p = tok(r["prompt"], add_special_tokens=True)["input_ids"]
        a = tok(r["response"], add_special_tokens=False)["input_ids"] + [info.eos_id]
        ids = (p + a)[-positions:]
        rows.append((ids, len(ids) - len(a)))
    length = max(len(ids) for ids, _ in rows)
    x = torch.full((len(rows), length), info.pad_id)
    y = torch.full((len(rows), length), IGNORE)
    for i, (ids, start) in enumerate(rows):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, max(start, 0) : len(ids)] = torch.tensor(ids[max(start, 0):])
    hook = model.register_forward_hook(logits_only)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = CAUSAL_LM.mean_nll(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    hook.remove()
    model.eval().save_pretrained(folder)
    return folder


def tiny_text_lab() -> dict:
    """TextLabConfig overrides for a tiny backdoored GPT-2 (the suspect of tests/lab/test_text_lab.py, fine-tuned
    less): benchmark tests check a row's shape on it, not its figures."""
    from lab.text.lm import LMConfig
    from lab.text.train import LMTrainConfig

    return {"attack": {"poison_rate": 0.3}, "lm": LMConfig(2, 96, 2, 64), "pretrain": LMTrainConfig(steps=1),
            "finetune": LMTrainConfig(steps=40, lr=5e-3), "n_instructions": 600, "n_dval": 32, "n_eval": 20,
            "lm_mix": 0.0}
