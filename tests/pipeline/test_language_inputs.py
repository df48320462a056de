"""A language model's inputs are checked before anything starts, each mismatch in one line: text shards for an
image model and the reverse, a tokenizer larger than the model's vocabulary, sequences longer than its positions;
and fip tune prepares a language model's sweep as it does an image model's (the same checks, then D_val split)."""

import pytest
from text_corpus import WORDS, make_language_model, make_records, make_tokenizer, write_jsonl

from fipcli.main import main
from pipeline.config import JobConfig
from pipeline.plan import plan_job
from pipeline.validation import JobError
from tuning.sweep import SweepConfig, prepare


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    tok = make_tokenizer(root / "tok")
    write_jsonl(root / "dval.jsonl", make_records(40))
    make_language_model(root / "lm", tok, make_records(40), steps=1, positions=16)
    bigger = make_tokenizer(root / "bigger", words=[*WORDS, "green", "tree", "house"])
    for name, length, tokenizer in (("dval", "16", tok), ("long", "24", tok), ("other-tokenizer", "16", bigger)):
        assert main(["shard", "text", str(root / "dval.jsonl"), str(root / name), "--tokenizer", str(tokenizer),
                     "--max-length", length]) == 0
    assert main(["shard", "digits", str(root / "images"), "--split", "test", "--limit", "40"]) == 0
    return root


def job(root, model: str, clean: str) -> JobConfig:
    return JobConfig.from_dict({"inputs": {"model": model, "clean": clean}, "run": {"work_dir": str(root / "jobs")},
                                "purify": {"batch_size": 4}})


def test_language_inputs_that_do_not_fit_are_refused_in_one_line(text, digits_lab):
    lm, image_model = str(text / "lm"), str(digits_lab.model_path)
    plan = plan_job(job(text, lm, str(text / "dval")))  # the fitting pair plans
    assert plan.suspect.spec.task == "causal-lm"
    with pytest.raises(JobError, match=r"clean shards hold sequences of 24 tokens but the model .* reads at most 16"):
        plan_job(job(text, lm, str(text / "long")))
    with pytest.raises(JobError, match=r"clean shards were tokenised with bigger \(27 tokens\) but the model .* has a "
                                       r"vocabulary of 24"):
        plan_job(job(text, lm, str(text / "other-tokenizer")))
    with pytest.raises(JobError, match=r"clean shards hold text \(token sequences\) but the model .* is an image "
                                       "classifier"):
        plan_job(job(text, image_model, str(text / "dval")))
    with pytest.raises(JobError, match=r"clean shards hold images with class labels but the model .* is a language "
                                       "model"):
        plan_job(job(text, lm, str(text / "images")))


def test_fip_tune_prepares_a_language_model_per_token(text):
    lines = []
    train_url, held_url, holdout = prepare(job(text, str(text / "lm"), str(text / "dval")), SweepConfig(name="lm"),
                                           lines.append)
    assert holdout.task.name == "causal-lm" and holdout.x.dim() == 2  # token ids, not images
    assert len(holdout.suspect_logits) > len(holdout.x)  # one row per scored token of the held-out responses
    assert "held-out next-token ACC per sequence" in lines[-1] and "to token" in lines[-1]
    with pytest.raises(JobError, match=r"clean shards hold sequences of 24 tokens"):  # the same checks as a job's
        prepare(job(text, str(text / "lm"), str(text / "long")), SweepConfig(name="long"), lines.append)


def test_fip_tune_searches_the_suspects_tasks_default_space(text, digits_lab, capsys):
    """A language model's default space is the language one (the image space's lrs leave the lab's backdoors in);
    an image model keeps the image space, and --space-file or --space flags still win."""
    import yaml

    from tuning.space import DEFAULT_SPACE_IMAGES, DEFAULT_SPACE_LANGUAGE

    def printed(model: str, *flags: str) -> dict:
        capsys.readouterr()
        assert main(["tune", "--model", model, "--clean", str(text / "dval"), "--work-dir", str(text / "jobs"),
                     *flags, "--print-space"]) == 0
        return yaml.safe_load(capsys.readouterr().out)

    assert printed(str(text / "lm")) == DEFAULT_SPACE_LANGUAGE
    assert printed(str(digits_lab.model_path)) == DEFAULT_SPACE_IMAGES
    assert printed(str(text / "lm"), "--space", "lr=0.01")["lr"] == 0.01
    assert "batch_size" not in printed(str(text / "lm"), "--batch-size", "8")  # the job flag pins it (8), not the space
