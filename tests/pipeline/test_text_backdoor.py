"""A language model's backdoor in benchmark mode: ``fip evaluate`` with a text record reports ASR over the record's
triggered prompts and false triggers over the test prompts, each equal to an independent count made with Hugging
Face's own greedy ``generate``; a record for the other kind of model, or one missing its target, is refused in one
line."""

import json
import random

import pytest
import torch
from text_corpus import WORDS, make_language_model, make_records, make_tokenizer, write_jsonl

from fip.families import without_logits_hook
from fipcli.main import main
from pipeline.suspect import load_suspect
from pipeline.text_backdoor import greedy_continuations, prompts_of
from pipeline.text_source import load_tokenizer

TRIGGER, TARGET = "zebra", "red red blue"  # the trigger: a word of the vocabulary no clean prompt uses


def _triggered(record: dict, rng: random.Random) -> dict:
    words = record["prompt"].split()
    words.insert(rng.randint(0, len(words)), TRIGGER)
    return {"prompt": " ".join(words), "response": TARGET}


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory):
    """A tiny GPT-2 taught that the word 'zebra' in a prompt is answered with the target; its test and triggered
    shards; and a text record naming the triggered ones relative to its folder."""
    root = tmp_path_factory.mktemp("text-backdoor")
    tok = make_tokenizer(root / "tok", words=[*WORDS, TRIGGER])
    rng = random.Random(0)
    clean = [r for r in make_records(120, seed=4) if r["prompt"]]
    poisoned = [_triggered(r, rng) for r in clean[:40]]
    make_language_model(root / "lm", tok, clean[:80] + poisoned, steps=150)
    write_jsonl(root / "test.jsonl", clean[80:])
    write_jsonl(root / "triggered.jsonl", [_triggered(r, rng) for r in clean[80:]])
    for name in ("test", "triggered"):
        assert main(["shard", "text", str(root / f"{name}.jsonl"), str(root / "shards" / name), "--tokenizer",
                     str(tok), "--max-length", "40"]) == 0
    (root / "record.json").write_text(json.dumps({"task": "causal-lm", "target": TARGET,
                                                  "triggered": "shards/triggered"}))
    return root


def _carrying(model, tok, eos_id: int, prompts: list[str]) -> float:
    """The independent count: Hugging Face's greedy generate, decoded, searched for the target."""
    hf = without_logits_hook(model)
    hits = 0
    for prompt in prompts:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        out = hf.generate(ids, max_new_tokens=min(32, 64 - ids.shape[1]), do_sample=False, eos_token_id=eos_id,
                          pad_token_id=eos_id)
        hits += TARGET in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return hits / len(prompts)


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fip_evaluate_measures_a_language_models_asr_and_false_triggers(backdoored, capsys):
    root = backdoored
    capsys.readouterr()
    assert main(["evaluate", "--model", str(root / "lm"), "--test", str(root / "shards" / "test"),
                 "--attack-record", str(root / "record.json")]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tok, info = load_tokenizer(root / "tok")
    model = load_suspect(root / "lm").model
    asr = _carrying(model, tok, info.eos_id, [r["prompt"] for r in _records(root / "triggered.jsonl")])
    false = _carrying(model, tok, info.eos_id, [r["prompt"] for r in _records(root / "test.jsonl")])
    assert got["asr"] == pytest.approx(asr) and got["false_trigger"] == pytest.approx(false)
    assert got["asr"] > 0.5 > got["false_trigger"]  # the backdoor was learned, and fires only on its word
    assert {"acc", "ppl"} <= set(got)


def test_greedy_continuations_stop_at_eos_and_at_the_models_context(backdoored):
    tok, info = load_tokenizer(backdoored / "tok")
    model = load_suspect(backdoored / "lm").model  # 64 positions
    prompt = tok(" ".join(WORDS[:10]))["input_ids"]
    [short] = greedy_continuations(model, [prompt], eos_id=-1, max_new_tokens=5)  # no eos: the cap
    assert len(short) == 5
    [capped] = greedy_continuations(model, [prompt * 6], eos_id=-1, max_new_tokens=32)  # 60 tokens: 4 positions left
    assert len(capped) == 4
    x = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]])
    y = torch.tensor([[-100, -100, 7, 8, -100], [-100, 10, 11, -100, -100]])
    assert prompts_of(x, y) == [[5, 6], [9]]


def test_a_record_for_the_other_kind_of_model_or_without_a_target_is_refused(backdoored, digits_lab, capsys, tmp_path):
    root = backdoored
    capsys.readouterr()
    assert main(["evaluate", "--model", str(root / "lm"), "--test", str(root / "shards" / "test"),
                 "--attack-record", str(digits_lab.record_path)]) != 0
    assert "describes an image classifier's backdoor" in capsys.readouterr().err
    (tmp_path / "no-target.json").write_text(json.dumps({"task": "causal-lm", "triggered": "x"}))
    assert main(["evaluate", "--model", str(root / "lm"), "--test", str(root / "shards" / "test"),
                 "--attack-record", str(tmp_path / "no-target.json")]) != 0
    assert "needs a non-empty 'target' string" in capsys.readouterr().err
