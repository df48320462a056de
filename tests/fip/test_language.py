"""FIP's terms on a causal language model (fip.tasks.CAUSAL_LM), each against an independent computation:
Hugging Face's own causal-LM loss (``model(input_ids, labels=...).loss``, which shifts and masks by itself)
and plain autograd over it, one sequence at a time."""

import copy

import pytest
import torch

from fip.families import import_transformers, logits_only
from fip.fisher import fisher_diag, per_sample_grads, trainable_params
from fip.objective import fip_objective, trace_penalty
from fip.purify import PurifyConfig, purify
from fip.spectral import fold_spectral_shift, left_alone, shift_targets, to_spectral_shift
from fip.tasks import CAUSAL_LM, IGNORE, task_named

VOCAB = 40


def tiny_lm(kind: str = "gpt2", tied: bool = True, seed: int = 0):
    """A randomly initialised causal LM of a few thousand weights whose forward returns logits."""
    tf = import_transformers()
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, tie_word_embeddings=tied)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                             tie_word_embeddings=tied)
        model = tf.LlamaForCausalLM(cfg)
    model.eval()
    return model


def with_logits(model):
    model.register_forward_hook(logits_only)
    return model


def hf_loss(model, x, y) -> torch.Tensor:
    """Hugging Face's own causal-LM loss of one sequence (the independent reference)."""
    return type(model).forward(model, input_ids=x, labels=y).loss


def batch(seed: int = 1, n: int = 5, t: int = 10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, t), generator=g)
    y = x.clone()
    y[:, :4] = IGNORE  # the prompt is not scored
    y[1, 7:] = IGNORE  # a shorter response: padding
    return x, y


def reference_grads(model, x, y) -> list[dict[str, torch.Tensor]]:
    params = trainable_params(model)
    out = []
    for i in range(len(x)):
        grads = torch.autograd.grad(hf_loss(model, x[i : i + 1], y[i : i + 1]), list(params.values()))
        out.append(dict(zip(params, grads, strict=True)))
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_per_sequence_nll_is_hugging_faces_loss(kind):
    model = tiny_lm(kind)
    x, y = batch()
    plain = copy.deepcopy(model)
    logits = with_logits(model)(x)
    ours = CAUSAL_LM.per_sample_nll(logits, y).detach()
    for i in range(len(x)):
        assert float(ours[i]) == pytest.approx(float(hf_loss(plain, x[i : i + 1], y[i : i + 1])), rel=1e-5)
    assert float(CAUSAL_LM.mean_nll(logits, y)) == pytest.approx(float(ours.mean()), rel=1e-6)


def test_per_sequence_score_gradients_and_fisher_match_autograd_over_hf_loss():
    plain = tiny_lm()
    x, y = batch()
    refs = reference_grads(plain, x, y)
    model = with_logits(copy.deepcopy(plain))
    grads = per_sample_grads(model, x, y, task=CAUSAL_LM)
    for name in grads:
        for i in range(len(x)):
            torch.testing.assert_close(grads[name][i], refs[i][name], rtol=1e-4, atol=1e-6)
    fbar = fisher_diag(model, [(x[:2], y[:2]), (x[2:], y[2:])], chunk_size=2, task=CAUSAL_LM).mean(torch.float64)
    for name in fbar:
        expected = torch.stack([r[name] for r in refs]).double().pow(2).mean(0)
        torch.testing.assert_close(fbar[name], expected, rtol=1e-4, atol=1e-10)


def test_trace_penalty_is_the_mean_squared_sequence_score_and_signed_is_unbiased():
    plain = tiny_lm()
    x, y = batch()
    exact_ref = sum(sum(g.pow(2).sum() for g in r.values()) for r in reference_grads(plain, x, y)) / len(x)
    model = with_logits(copy.deepcopy(plain))
    exact = trace_penalty(model, x, y, estimator="exact", task=CAUSAL_LM)
    assert float(exact) == pytest.approx(float(exact_ref), rel=1e-4)
    gen = torch.Generator().manual_seed(0)
    signed = torch.stack([trace_penalty(model, x, y, estimator="signed", generator=gen, task=CAUSAL_LM).detach()
                          for _ in range(400)])
    # E_s ||sum_i s_i g_i||^2 / B = sum_i ||g_i||^2 / B: the mean over 400 probes within 4 standard errors
    assert abs(float(signed.mean()) - float(exact)) < 4 * float(signed.std()) / 20


def test_true_fisher_draws_labels_only_where_the_response_is_scored():
    model = with_logits(tiny_lm())
    x, y = batch()
    with torch.no_grad():
        logits = model(x)
    a = CAUSAL_LM.sample_labels(logits, y, torch.Generator().manual_seed(3))
    b = CAUSAL_LM.sample_labels(logits, y, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(a == IGNORE, y == IGNORE)
    assert int(a[a != IGNORE].min()) >= 0 and int(a.max()) < VOCAB
    # the draws follow the model: at one position, 4000 draws' frequencies match its softmax
    probs = torch.softmax(logits[0, 5], -1)
    reps = 4000
    rep_logits = logits[:1].expand(reps, -1, -1)
    rep_y = y[:1].expand(reps, -1)
    draws = CAUSAL_LM.sample_labels(rep_logits, rep_y, torch.Generator().manual_seed(5))[:, 6]
    freq = torch.bincount(draws, minlength=VOCAB).double() / reps
    assert float((freq - probs.double()).abs().max()) < 0.03
    assert fisher_diag(model, [(x, y)], kind="true", task=CAUSAL_LM).count == len(x)


def test_objective_terms_on_a_language_model():
    plain = tiny_lm()
    x, y = batch()
    model = with_logits(copy.deepcopy(plain))
    anchor = {n: p.detach().clone() for n, p in trainable_params(model).items()}
    terms = fip_objective(model, x, y, anchor, anchor, eta_f=0.1, eta_r=1.0, estimator="exact",
                          eta_kl=0.5, teacher_logits=model(x).detach(), task=CAUSAL_LM)
    ref_ce = sum(float(hf_loss(plain, x[i : i + 1], y[i : i + 1])) for i in range(len(x))) / len(x)
    assert float(terms["ce"]) == pytest.approx(ref_ce, rel=1e-5)
    assert float(terms["kl"]) == pytest.approx(0.0, abs=1e-6)  # the teacher is the model itself
    assert float(terms["clean_reg"]) == 0.0


def test_batches_that_do_not_fit_a_language_model_are_refused_in_one_line():
    model = with_logits(tiny_lm())
    x, y = batch()
    with pytest.raises(ValueError, match="align with the token ids"):
        fisher_diag(model, [(x, y[:, :5])], task=CAUSAL_LM)
    bad = y.clone()
    bad[0, 6] = VOCAB + 3
    with pytest.raises(ValueError, match="vocabulary has 40"):
        fisher_diag(model, [(x, bad)], task=CAUSAL_LM)
    with pytest.raises(ValueError, match="integer token ids"):
        fisher_diag(model, [(x.float(), y)], task=CAUSAL_LM)
    with pytest.raises(ValueError, match="unknown task 'seq2seq'"):
        task_named("seq2seq")


@pytest.mark.parametrize("kind,tied", [("gpt2", True), ("llama", True), ("llama", False)])
def test_fast_fip_shifts_every_layer_of_a_language_model_and_keeps_the_tie(kind, tied):
    model = with_logits(tiny_lm(kind, tied))
    x, _ = batch()
    before = model(x)
    assert left_alone(model) == []  # embeddings, HF Conv1D projections and linear layers are all shifted
    work = to_spectral_shift(copy.deepcopy(model))
    torch.testing.assert_close(work(x), before, rtol=1e-4, atol=1e-5)  # zero shift: the same function
    deltas = {n: p for n, p in work.named_parameters() if p.requires_grad}
    assert all(n.endswith("delta") for n in deltas)
    # the tied head has no shift of its own: one spectrum per distinct weight
    distinct = {id(p) for n, p in model.named_parameters() if n in set(shift_targets(model))}
    assert len(deltas) == len(distinct)
    with torch.no_grad():
        for p in deltas.values():
            p.normal_(0, 0.05)
    shifted = work(x)
    fold_spectral_shift(work)
    torch.testing.assert_close(work(x), shifted, rtol=1e-4, atol=1e-5)
    out_w, in_w = work.get_output_embeddings().weight, work.get_input_embeddings().weight
    assert (out_w is in_w) == tied


@pytest.mark.parametrize("method", ["fip", "fast-fip"])
def test_purify_tunes_a_language_model_on_its_clean_sequences(method):
    model = with_logits(tiny_lm())
    x, y = batch(seed=2, n=24)
    cfg = PurifyConfig(method=method, iterations=30, batch_size=8, lr=0.05, eta_f=1e-3, eta_r=1.0, trace_every=2,
                       trace_batch=4, augment=True, eval_every=0)
    ce = lambda m: float(CAUSAL_LM.mean_nll(m(x), y))  # noqa: E731
    result = purify(model, x, y, cfg, task=CAUSAL_LM)
    assert all("trace" in h for h in result.history[::2])
    assert ce(result.model) < ce(model)  # fine-tuning on the clean sequences fits them better
    assert result.left_alone == []


@pytest.mark.parametrize("kind,tied", [("gpt2", True), ("llama", False)])
def test_a_hugging_face_language_model_folder_loads_and_round_trips_with_its_tie(tmp_path, kind, tied):
    from fip.io import load_model, save_model

    original = tiny_lm(kind, tied)
    original.save_pretrained(tmp_path / "lm")
    x, _ = batch()
    expected = type(original).forward(original, input_ids=x).logits
    loaded = load_model(tmp_path / "lm")
    assert loaded.spec.task == "causal-lm" and loaded.spec.num_classes == VOCAB
    torch.testing.assert_close(loaded.model(x), expected)
    head, embedding = loaded.model.get_output_embeddings().weight, loaded.model.get_input_embeddings().weight
    assert (head is embedding) == tied
    again = load_model(save_model(loaded.model, loaded.spec, tmp_path / "purified.safetensors"))
    torch.testing.assert_close(again.model(x), expected)
    assert again.spec.task == "causal-lm"


def test_the_kl_term_runs_on_every_step_of_a_language_model():
    """A language model's sequences are never cropped, so the suspect teaches at every step (before the fix it
    taught at none: the crop schedule of images, on by default, switched eta_kl off)."""
    model = with_logits(tiny_lm())
    x, y = batch(seed=3, n=16)
    cfg = PurifyConfig(iterations=3, batch_size=8, lr=0.05, eta_f=0.0, eta_r=0.0, eta_kl=1.0, eval_every=0)
    history = purify(model, x, y, cfg, task=CAUSAL_LM).history
    assert all("kl" in h for h in history) and history[-1]["kl"] > 0
