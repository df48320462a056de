"""A causal language model through the pipeline, as a user runs it: ``fip shard text`` (D_val and test sets with
their tokenizer), ``fip purify`` (Ray Train Fisher + FIP over the text shards, MLflow, the registry),
``fip evaluate`` of the registered model and of the file ``fip models get`` writes, and generation through
``mlflow.pyfunc`` (MLflow's transformers flavour), which answers as the purified model does greedily."""

import json

import mlflow
import pytest
import torch
from text_corpus import make_language_model, make_records, make_tokenizer, write_jsonl

from fip.families import without_logits_hook
from fipcli.main import main
from pipeline.suspect import load_purified
from pipeline.text_source import load_tokenizer

pytestmark = [pytest.mark.slow]

JOB = ("--iterations", "6", "--batch-size", "8", "--workers", "1", "--lr", "0.01", "--esd-samples", "4",
       "--esd-steps", "3", "--eta-f", "0.001")


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_language_model_is_purified_registered_and_generates(ray_session, tmp_path, capsys):
    tok = make_tokenizer(tmp_path / "tok")
    records = make_records(120, seed=1)
    write_jsonl(tmp_path / "dval.jsonl", records[:80])
    write_jsonl(tmp_path / "test.jsonl", records[80:])
    model = make_language_model(tmp_path / "suspect", tok, records[:80])
    uri = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    # benchmark mode: a text record and its triggered prompts (this model has no backdoor: its ASR is whatever
    # share of answers happens to say the target, measured before and after)
    write_jsonl(tmp_path / "triggered.jsonl", [{"prompt": "sky " + r["prompt"], "response": "red blue"}
                                               for r in records[80:]])
    (tmp_path / "record.json").write_text(json.dumps({"task": "causal-lm", "target": "red blue",
                                                      "triggered": "shards/triggered"}))
    for part in ("dval", "test", "triggered"):
        assert main(["shard", "text", str(tmp_path / f"{part}.jsonl"), str(tmp_path / "shards" / part),
                     "--tokenizer", str(tok), "--max-length", "32"]) == 0
    capsys.readouterr()
    assert main(["purify", "--model", str(model), "--clean", str(tmp_path / "shards" / "dval"), "--test",
                 str(tmp_path / "shards" / "test"), "--attack-record", str(tmp_path / "record.json"), *JOB,
                 "--work-dir", str(tmp_path / "jobs"), *uri, "--register-as", "lm"]) == 0
    job = _last_json(capsys)
    assert all(0 <= job[f"{k}_{when}"] <= 1 for k in ("asr", "false_trigger") for when in ("before", "after"))
    assert job["model_uri"] == "models:/lm@candidate"
    assert job["dval_acc_suspect"] > 0.3  # fitted to D_val's answers: far from chance (1/24)
    assert 0 < job["acc_before"] < 1 and job["ppl_before"] > 1
    assert job["lambda_max_before"] > 0 and "lambda_max_after" in job  # the Hessian of the per-sequence NLL

    assert main(["evaluate", "--model", "models:/lm@candidate", "--test", str(tmp_path / "shards" / "test"), *uri]) == 0
    measured = _last_json(capsys)
    assert measured["acc"] == job["acc_after"] and measured["ppl"] == pytest.approx(job["ppl_after"], rel=1e-6)
    got = tmp_path / "got.safetensors"
    assert main(["models", *uri, "get", "lm@candidate", "-o", str(got)]) == 0
    assert main(["evaluate", "--model", str(got), "--test", str(tmp_path / "shards" / "test")]) == 0
    assert _last_json(capsys)["acc"] == job["acc_after"]

    # the registry's model generates, greedily, what the purified file's model generates
    mlflow.set_tracking_uri(uri[1])
    mlflow.set_registry_uri(uri[1])
    generator = mlflow.pyfunc.load_model("models:/lm@candidate")
    prompt = records[0]["prompt"]
    text = generator.predict([prompt], params={"max_new_tokens": 4, "do_sample": False})[0]
    tokenizer, info = load_tokenizer(tok)
    ours = without_logits_hook(load_purified(got).model)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = ours.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=info.pad_id)
    assert text == tokenizer.decode(out[0], skip_special_tokens=True)


def test_a_language_model_sweep_scores_tokens_probes_insertions_and_registers(ray_session, tmp_path, capsys):
    tok = make_tokenizer(tmp_path / "tok")
    records = make_records(120, seed=2)
    write_jsonl(tmp_path / "dval.jsonl", records[:90])
    model = make_language_model(tmp_path / "suspect", tok, records[:90])
    uri = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    # benchmark mode: the trials are also measured on a test set and a text attack record (reported, never chosen on)
    write_jsonl(tmp_path / "test.jsonl", records[90:])
    write_jsonl(tmp_path / "triggered.jsonl", [{"prompt": "sky " + r["prompt"], "response": "red blue"}
                                               for r in records[90:]])
    (tmp_path / "record.json").write_text(json.dumps({"task": "causal-lm", "target": "red blue",
                                                      "triggered": "triggered"}))
    for part in ("dval", "test", "triggered"):
        assert main(["shard", "text", str(tmp_path / f"{part}.jsonl"), str(tmp_path / part), "--tokenizer", str(tok),
                     "--max-length", "32"]) == 0
    capsys.readouterr()
    assert main(["tune", "--model", str(model), "--clean", str(tmp_path / "dval"), *JOB,
                 "--test", str(tmp_path / "test"), "--attack-record", str(tmp_path / "record.json"),
                 "--space", "lr=loguniform:0.005:0.02", "--num-samples", "2", "--max-concurrent", "1",
                 "--scheduler", "none", "--report-every", "3", "--no-refit", "--name", "lm-sweep",
                 "--work-dir", str(tmp_path / "jobs"), *uri, "--register-sweep-as", "lm-tuned"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["finished"] == 2 and summary["model_uri"]
    assert "held-out next-token ACC per sequence" in out and "to token" in out  # the suspect's line, probed by insertion
    sweep = tmp_path / "jobs" / "lm-sweep"
    table = json.loads((sweep / "sweep-table.json").read_text())
    row = next(t for t in table["trials"] if t["trial_id"] == summary["winner"])
    assert 0 <= row["uap_max"] <= 1 and row["uap_class"] >= 0  # a token id of the vocabulary
    for t in table["trials"]:  # benchmark mode: every finished trial measured on the test set and the record
        assert all(0 <= t[k] <= 1 for k in ("acc", "asr", "false_trigger", "der")), t
    assert "false_trigger" in (sweep / "sweep-table.md").read_text()
    # the held-out split is text shards with their tokenizer; the table's held-out ACC is the registered model's
    # next-token accuracy per sequence on them, as fip evaluate measures it
    assert (sweep / "dval-holdout" / "tokenizer" / "tokenizer.json").is_file()
    client = mlflow.MlflowClient(tracking_uri=uri[1], registry_uri=uri[1])  # not a registry an earlier test set
    (version,) = client.search_model_versions("name = 'lm-tuned'")  # @candidate, or a version if the probe flags it
    assert main(["evaluate", "--model", f"models:/lm-tuned/{version.version}", "--test", str(sweep / "dval-holdout"),
                 *uri]) == 0
    # per sequence, as the sweep scores it (fip evaluate's `acc` counts every scored token)
    assert _last_json(capsys)["acc_per_sequence"] == pytest.approx(row["holdout_acc"], abs=1e-6)
    assert "prompts to token" in version.tags["evidence.verdict"]
    assert 0 < float(version.tags["evidence.choice_kept"]) <= 1  # resampled held-out sequences (tuning.stability)
