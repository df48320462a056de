"""The language model's side of the sweep without Ray: D_val's text split, per-sequence accuracy and per-token agreement, and the
insertion probe against a model whose answer moves linearly with an inserted embedding."""

import pytest
import torch
from sum_lm import TARGET, SumLM
from sum_lm import prompts as _prompts
from text_corpus import make_records, make_tokenizer, write_jsonl
from torch import nn

from fip.tasks import CAUSAL_LM, IGNORE
from pipeline.shard_writer import write_source
from pipeline.shards import open_shards, read_all
from pipeline.text_source import jsonl_source, store_tokenizer
from tuning.holdout import read_holdout, split_sequences, write_split
from tuning.objective import Holdout, measure
from tuning.text_probe import insertion_flip, special_tokens


def test_insertion_reaches_the_planted_token_only_within_its_radius(one_thread):
    model, (x, y) = SumLM(), _prompts()
    with torch.no_grad():
        answers = model(x)[:, -2].argmax(-1)
        margin = (model(x)[:, -2].max(-1).values - model(x)[:, -2, TARGET]).min()
    assert TARGET not in answers.tolist() and margin > 1  # no prompt answers 11 as it is
    mean_norm = float(model.emb.weight.detach().norm(dim=1).mean())
    # two soft tokens of norm r along dimension 3 add 2 * 10 * r to token 11's logit: far past the margin here
    strong = insertion_flip(model, x, y, relative=2.0)
    assert strong["uap_max"] == 1.0 and strong["uap_class"] == TARGET
    weak_r = 0.2 * float(margin) / (2 * 10 * mean_norm)  # at most a fifth of the smallest margin: out of reach
    assert insertion_flip(model, x, y, relative=weak_r)["uap_max"] == 0.0


def test_special_tokens_are_never_targets(one_thread):
    """Token 11 is the only one an insertion reaches; once the config names it the end of text (as GPT-2's
    config names its one special token eos, pad and bos), the probe no longer offers it as a payload."""
    from types import SimpleNamespace

    model, (x, y) = SumLM(), _prompts()
    assert insertion_flip(model, x, y, relative=2.0)["uap_class"] == TARGET
    model.config = SimpleNamespace(eos_token_id=TARGET, pad_token_id=TARGET, bos_token_id=None)
    assert special_tokens(model) == [TARGET]
    found = insertion_flip(model, x, y, relative=2.0)
    assert found["uap_class"] != TARGET and TARGET not in found["uap_rates"]
    model.config = SimpleNamespace(eos_token_id=[TARGET, 10], pad_token_id=-1)  # a list, and an unset id
    assert special_tokens(model) == [10, TARGET]


def test_probe_leaves_the_model_as_it_found_it(one_thread):
    model, (x, y) = SumLM(), _prompts()
    model.train()
    model.head.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    insertion_flip(model, x, y, relative=1.0)
    assert model.training and not model.head.weight.requires_grad and model.emb.weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.emb.weight.grad is None


def test_a_model_without_input_embeddings_is_named():
    x, y = _prompts()
    with pytest.raises(ValueError, match="needs the model's input embeddings"):
        insertion_flip(nn.Sequential(nn.Embedding(12, 4), nn.Linear(4, 12)), x, y)


def test_accuracy_is_per_sequence_and_agreement_per_scored_token(one_thread):
    model, (x, y) = SumLM(), _prompts()
    y[:4, -6:] = x[:4, -6:]  # a few longer responses: they weigh as much as the one-token answers, no more
    holdout = Holdout.from_suspect(model, x, y, CAUSAL_LM)
    with torch.no_grad():
        logits = model(x)
    per_sequence = []
    for i in range(len(x)):  # independently: each sequence's share of correct next tokens, then the mean
        keep = y[i, 1:] != IGNORE
        per_sequence.append(float((logits[i, :-1].argmax(-1) == y[i, 1:])[keep].float().mean()))
    tokens = (logits[:, :-1].argmax(-1) == y[:, 1:])[y[:, 1:] != IGNORE].float().mean()
    assert len(holdout.suspect_logits) == int((y[:, 1:] != IGNORE).sum()) and holdout.samples == len(x)
    assert holdout.suspect["acc"] == pytest.approx(sum(per_sequence) / len(x))
    assert abs(holdout.suspect["acc"] - float(tokens)) > 0.01  # the two weightings differ on this set
    same = measure(model, holdout)
    assert same["holdout_acc"] == pytest.approx(holdout.suspect["acc"])
    assert same["agreement"] == 1.0 and same["kl_to_suspect"] == pytest.approx(0.0, abs=1e-7)


def test_sample_accuracy_of_images_is_plain_accuracy():
    from fip.tasks import CLASSIFICATION
    from tuning.objective import sample_accuracy

    g = torch.Generator().manual_seed(2)
    pred, labels = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 3, (50,), generator=g)
    assert sample_accuracy(pred, labels, CLASSIFICATION.owners(labels)) == pytest.approx(
        float((pred == labels).float().mean()))
    # sequences 0 and 2 (sequence 1 has no scored token): 1/1 and 1/3 correct -> mean 2/3, not 2/4 per token
    assert sample_accuracy(torch.tensor([1, 0, 0, 1]), torch.tensor([1, 1, 1, 1]), torch.tensor([0, 2, 2, 2])) == \
        pytest.approx(2 / 3)


@pytest.mark.parametrize("every", [1, 3], ids=["whole-file", "kept-subset"])
def test_text_split_is_disjoint_seeded_and_keeps_the_tokenizer(tmp_path, every):
    """`every` 3: D_val is every third record of a larger file (as `fip shard text --dval-fraction` keeps a
    subset), so its stored indices run past its size (before the fix the split refused them)."""
    tok = make_tokenizer(tmp_path / "tok")
    write_jsonl(tmp_path / "d.jsonl", make_records(40 * every, seed=3))
    dval = str(tmp_path / "dval")
    write_source(jsonl_source(tmp_path / "d.jsonl", tok, max_length=32), dval,
                 indices=range(0, 40 * every, every) if every > 1 else None)
    store_tokenizer(tok, dval, open_shards(dval).store)
    train_url, held_url = write_split(dval, str(tmp_path / "sweep"), 0.25, seed=4)
    x, y, idx = read_all(open_shards(dval))
    tx, ty = read_holdout(train_url)
    hx, hy = read_holdout(held_url)
    _, held_rows = split_sequences(len(idx), 0.25, 4)
    assert len(hx) == 10 and len(tx) == 30
    assert torch.equal(hx, x[held_rows]) and torch.equal(hy, y[held_rows])  # the stored samples, unchanged
    assert torch.equal(read_all(open_shards(held_url))[2], idx[held_rows])  # with their own indices
    assert (tmp_path / "sweep" / "dval-holdout" / "tokenizer" / "tokenizer.json").is_file()
    assert open_shards(held_url).manifest.tokenizer == open_shards(dval).manifest.tokenizer
    assert not set(split_sequences(40, 0.25, 4)[1]) == set(split_sequences(40, 0.25, 5)[1])


def test_plain_text_has_no_prompt_to_probe(one_thread):
    model, (x, y) = SumLM(), _prompts()
    text = x.clone()  # plain text: every token scored from the first
    assert insertion_flip(model, torch.cat([x, text]), torch.cat([y, text]), relative=2.0)["uap_max"] == 1.0
    with pytest.raises(ValueError, match="needs prompt/response pairs"):
        insertion_flip(model, text, text.clone())


def test_a_holdout_scores_the_same_after_travelling_to_a_trial(one_thread):
    """Tune hands the holdout to trials pickled: the unpickled task is another instance of the same task."""
    import pickle

    from fip.tasks import CLASSIFICATION

    torch.manual_seed(0)
    images = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    for model, holdout in ((images, Holdout.from_suspect(images, torch.rand(9, 1, 2, 2), torch.arange(9) % 3)),
                           (SumLM(), Holdout.from_suspect(SumLM(), *_prompts(), CAUSAL_LM))):
        travelled = pickle.loads(pickle.dumps(holdout))
        assert travelled.task == holdout.task and (travelled.task == CLASSIFICATION) == (holdout.task == CLASSIFICATION)
        assert measure(model, travelled) == measure(model, holdout)
