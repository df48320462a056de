"""A model that records an input normalisation is scored on normalised inputs wherever it is loaded.

The twin of the tests' digits suspect has the normalisation folded out of its patch embedding and recorded in
its metadata instead: with the normalisation applied it computes exactly what the suspect computes, without it
something else. So each place that loads a model to run it must give the twin the suspect's predictions: `fip
evaluate`, the sweep's held-out scoring and the model registered in MLflow; `fip smoothness` must analyse it on
normalised inputs.
"""

import json
from pathlib import Path

import mlflow
import pytest
import torch

from fip.inputs import NORMALIZATION_KEY
from fip.io import load_model, save_model
from fipcli.main import main
from pipeline.suspect import load_suspect
from pipeline.tracking import Tracker

MEAN, STD = 0.3, 0.2


@pytest.fixture(scope="module")
def twin(digits_lab, tmp_path_factory) -> Path:
    """The suspect with ``(x - MEAN) / STD`` expected at its input: W' = W * STD, b' = b + MEAN * sum(W)."""
    loaded = load_model(digits_lab.model_path)
    model = loaded.model
    with torch.no_grad():
        w = model.patch_embed.weight.clone()
        model.patch_embed.weight.mul_(STD)
        model.patch_embed.bias.add_(MEAN * w.sum(dim=(1, 2, 3)))
    path = tmp_path_factory.mktemp("twin") / "twin.safetensors"
    return save_model(model, loaded.spec, path, {NORMALIZATION_KEY: {"mean": [MEAN], "std": [STD]}})


def test_the_twin_is_the_suspect_only_with_its_normalisation(digits_lab, twin):
    x = torch.rand(16, 1, 8, 8)
    suspect = load_model(digits_lab.model_path).model
    assert torch.allclose(load_suspect(twin).model(x), suspect(x), atol=1e-5)
    assert not torch.allclose(load_model(twin).model(x), suspect(x), atol=1e-2)  # bare: a different function


def _evaluate(model: Path, record: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--test", "digits", "--attack-record", str(record)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_fip_evaluate_gives_the_twin_the_suspects_figures(digits_lab, twin, capsys):
    got, want = _evaluate(twin, digits_lab.record_path, capsys), _evaluate(digits_lab.model_path, digits_lab.record_path,
                                                                          capsys)
    assert {k: got[k] for k in ("acc", "asr", "ra")} == {k: want[k] for k in ("acc", "asr", "ra")}
    assert got["acc"] == pytest.approx(digits_lab.record["acc"], abs=1e-9)


def test_fip_smoothness_analyses_the_twin_on_normalised_inputs(twin, capsys):
    """Curvature is taken in parameter space, where the twin's rescaled first layer differs from the suspect's:
    the reference is the twin itself with its normalisation, on the batch the command draws (seed 0)."""
    from fip.smoothness import smoothness_report
    from lab.datasets import load_dataset

    capsys.readouterr()
    assert main(["smoothness", "--model", str(twin), "--dataset", "digits", "--samples", "16", "--iters", "3",
                 "--max-probes", "4"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data = load_dataset("digits", "train")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:16]
    batch = (data.floats()[idx], data.y[idx])
    reports = {name: smoothness_report(m, [batch], max_iter=3, max_probes=4).lambda_max
               for name, m in (("normalised", load_suspect(twin).model), ("bare", load_model(twin).model))}
    assert got["lambda_max"] == pytest.approx(reports["normalised"], rel=1e-6)
    assert reports["bare"] != pytest.approx(reports["normalised"], rel=1e-2)


def test_the_sweep_scores_the_twin_as_the_suspect(digits_lab, twin, tmp_path):
    from lab.datasets import CleanSplit, load_dataset
    from pipeline.config import JobConfig
    from pipeline.shard_writer import write_shards
    from tuning.sweep import SweepConfig, prepare

    split = CleanSplit.load(digits_lab.dval_path)
    clean = str(tmp_path / "dval")
    write_shards(load_dataset("digits", "train").subset(split.indices), clean, maxcount=60, indices=split.indices)
    held = {}
    for name, model in (("twin", twin), ("suspect", digits_lab.model_path)):
        base = JobConfig.from_dict({"inputs": {"model": str(model), "clean": clean},
                                    "run": {"work_dir": str(tmp_path / name / "jobs")}})
        held[name] = prepare(base, SweepConfig(name="s"), progress=lambda _: None)[2]
    assert held["twin"].suspect["acc"] == held["suspect"].suspect["acc"]
    assert torch.allclose(held["twin"].suspect_logits, held["suspect"].suspect_logits, atol=1e-4)


def test_the_registered_twin_takes_images_in_0_1(digits_lab, twin, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, tmp_path / "mlartifacts")
    run_id = tracker.start_run("fip", "twin", {}, {})
    reg = tracker.register(run_id, load_suspect(twin).model, twin, (1, 8, 8), "twin", {}, aliases=["candidate"])
    tracker.finish(run_id)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(reg.model_uri)
    x = torch.rand(8, 1, 8, 8)
    want = load_model(digits_lab.model_path).model(x)
    assert torch.allclose(torch.as_tensor(pyfunc.predict(x.numpy())), want, atol=1e-4)
