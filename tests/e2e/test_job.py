"""The pipeline end to end on real parts: Ray Train (2 workers, gloo), shards on S3 (moto server),
an MLflow SQLite store and registry, a backdoored model from the lab."""

import json
from pathlib import Path

import pytest
import torch

from fip.fisher import FisherDiag, fisher_diag
from fip.io import load_model
from fip.purify import Purifier, PurifyConfig, finalize_model, prepare_model
from lab.datasets import CleanSplit, load_dataset
from pipeline.job import JobConfig, JobError, run_job, validate
from pipeline.shards import open_shards, read_all, write_shards
from pipeline.stages import StageConfig, _step_batches, evaluate_shards

pytestmark = pytest.mark.slow

PURIFY = dict(eval_every=6, eta_f=0.002, eta_r=1.0, lr=0.01, iterations=12, batch_size=16, trace_every=2,
              trace_estimator="exact", trace_batch=16, seed=3)


@pytest.fixture(scope="module")
def shards(digits_lab, s3_endpoint, tmp_path_factory):
    split = CleanSplit.load(digits_lab.dval_path)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    clean = "s3://fip-test/e2e/dval"
    write_shards(train.subset(split.indices), clean, maxcount=30, indices=split.indices)  # uneven: 30,...,20
    test_dir = tmp_path_factory.mktemp("test-shards") / "test"
    write_shards(test, str(test_dir), maxcount=100)
    return clean, str(test_dir)


def _job(digits_lab, shards, tmp, **kw) -> JobConfig:
    clean, test = shards
    settings = dict(model=str(digits_lab.model_path), clean=clean, test=test, attack_record=str(digits_lab.record_path),
                    purify=PurifyConfig(**PURIFY), workers=2, work_dir=str(tmp / "jobs"),
                    tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", checkpoint_every=4,
                    esd_samples=16, esd_steps=4)
    return JobConfig(**{**settings, **kw})


@pytest.fixture(scope="module")
def job(ray_session, digits_lab, shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    cfg = _job(digits_lab, shards, tmp)
    return cfg, run_job(cfg), tmp


def test_job_reports_before_and_after(job, digits_lab):
    cfg, result, _ = job
    m = result.metrics
    assert m["fisher_count"] == len(CleanSplit.load(digits_lab.dval_path).indices)
    assert m["acc_before"] == pytest.approx(digits_lab.record["acc"], abs=1e-6)
    assert m["asr_before"] == pytest.approx(digits_lab.record["asr"], abs=1e-6)
    assert {"acc_after", "asr_after", "ra_after", "lambda_max_before", "lambda_max_after"} <= set(m)
    assert len(result.history) == 12 and [h["step"] for h in result.history] == list(range(12))
    assert [e["step"] for e in result.evaluations] == [6, 12]
    assert result.model_uri == "models:/fip-purified@candidate"
    # the reported metrics are those of the saved model, not of a mix of the ranks' copies
    stage = StageConfig(model_url=cfg.model, clean=cfg.clean, test=cfg.test, fisher_url="", purify=cfg.purify.to_dict(),
                        attack_record=json.loads(Path(cfg.attack_record).read_text()), eval_samples=None)
    own = evaluate_shards(load_model(result.purified_path).model, stage)
    assert own == {"acc": m["acc_after"], "asr": m["asr_after"], "ra": m["ra_after"]}


def test_fisher_from_two_workers_equals_one_process(job):
    cfg, result, _ = job
    two = FisherDiag.load(result.fisher_url)
    x, y, _ = read_all(open_shards(cfg.clean))
    work = prepare_model(load_model(cfg.model).model, cfg.purify)
    one = fisher_diag(work, [(x.float() / 255, y)])
    assert two.count == one.count
    num = sum(float((two.sums[n] - one.sums[n]).pow(2).sum()) for n in one.sums) ** 0.5
    den = sum(float(one.sums[n].pow(2).sum()) for n in one.sums) ** 0.5
    assert num / den < 1e-5


def test_fip_on_two_workers_matches_one_process_with_the_same_global_batch(job):
    cfg, result, _ = job
    pcfg = cfg.purify
    work = prepare_model(load_model(cfg.model).model, pcfg)
    purifier = Purifier(work, FisherDiag.load(result.fisher_url).mean(), pcfg)
    stage = StageConfig(model_url=cfg.model, clean=cfg.clean, test=None, fisher_url="", purify=pcfg.to_dict())
    ranks = [_step_batches(stage, pcfg, r, 2, 0) for r in range(2)]
    for _ in range(pcfg.iterations):
        (_, x0, y0), (_, x1, y1) = next(ranks[0]), next(ranks[1])
        purifier.step(torch.cat([x0, x1]), torch.cat([y0, y1]))
    single = finalize_model(work, pcfg).state_dict()
    distributed = load_model(result.purified_path).model.state_dict()
    for name, ref in single.items():
        assert torch.allclose(distributed[name], ref, rtol=1e-4, atol=1e-6), name
    assert any(not torch.equal(v, load_model(cfg.model).model.state_dict()[k]) for k, v in single.items())


def test_killed_worker_resumes_to_the_same_result(job, digits_lab, shards, tmp_path):
    cfg, result, _ = job
    again = _job(digits_lab, shards, tmp_path, fail_at_step=6, register_as=None, esd_samples=0, max_failures=1)
    resumed = run_job(again)
    a = load_model(result.purified_path).model.state_dict()
    b = load_model(resumed.purified_path).model.state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-6, atol=1e-7), name
    assert [h["step"] for h in resumed.history] == list(range(12))


def test_mlflow_run_artifacts_and_registry_cli(job, tmp_path, capsys):
    import mlflow

    from fipcli.main import main

    cfg, result, _ = job
    # other jobs in this module point MLflow's global registry elsewhere; look in this job's store
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    client = mlflow.MlflowClient(cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["purify.eta_f"] == str(PURIFY["eta_f"]) and run.data.params["job.workers"] == "2"
    assert run.data.tags["method"] == "fip" and len(run.data.tags["source_sha256"]) == 64
    assert len(client.get_metric_history(result.run_id, "ce")) == 12
    assert [m.step for m in client.get_metric_history(result.run_id, "eval_asr")] == [0, 6, 12]
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"fisher.safetensors", "history.json", "curves.png", "esd.png", "attack_record.json", "purified"} <= names
    mv = client.get_model_version_by_alias("fip-purified", "candidate")
    assert mv.tags["method"] == "fip" and float(mv.tags["ASR"]) == pytest.approx(result.metrics["asr_after"], abs=1e-4)

    uri = ["--tracking-uri", cfg.tracking_uri]
    assert main(["models", *uri, "list"]) == 0
    assert "fip-purified  v1  aliases=candidate" in capsys.readouterr().out
    out = tmp_path / "got.safetensors"
    assert main(["models", *uri, "get", "fip-purified@candidate", "-o", str(out)]) == 0
    assert out.read_bytes() == Path(result.purified_path).read_bytes()
    assert main(["models", *uri, "promote", "fip-purified", "1", "production"]) == 0
    assert "production" in client.get_model_version("fip-purified", "1").aliases
    assert main(["models", *uri, "get", "fip-purified@nope", "-o", str(out)]) == 2
    # the MLflow pytorch flavour loads too (a torch.export program)
    loaded = mlflow.pytorch.load_model("models:/fip-purified@candidate")
    x = torch.zeros(1, 1, 8, 8)
    assert torch.allclose(loaded(x), load_model(result.purified_path).model(x), atol=1e-5)


def test_mismatched_model_is_refused_before_workers_start(digits_lab, shards, tmp_path):
    from fip.io import save_model
    from fip.models import ModelSpec, build_model

    spec = ModelSpec("vit-small", num_classes=5, in_channels=1, image_size=8, width=0.25)
    wrong = save_model(build_model(spec), spec, tmp_path / "five.safetensors")
    cfg = _job(digits_lab, shards, tmp_path)
    cfg.model = str(wrong)
    with pytest.raises(JobError, match="clean shards have 10 classes but the model .* has 5"):
        validate(cfg)
    spec = ModelSpec("vit-small", num_classes=10, in_channels=3, image_size=8, width=0.25)
    cfg.model = str(save_model(build_model(spec), spec, tmp_path / "rgb.safetensors"))
    with pytest.raises(JobError, match=r"hold \(1, 8, 8\) images but the model expects \(3, 8, 8\)"):
        validate(cfg)
    cfg.model = str(digits_lab.model_path)
    cfg.workers = 3
    with pytest.raises(JobError, match="global batch 16 must be divisible by 3 workers"):
        validate(cfg)
