"""Models from the ecosystems through every command, with one set of figures: a torchvision resnet18 ``.pth``,
a timm safetensors state dict and a Hugging Face folder, each on 8 x 8 gray digits that the network resizes and
widens itself. ``fip purify``'s ``acc_after``, ``fip evaluate`` of the registered model, ``fip models get``'s
file and the registered model's predictions through ``mlflow.pyfunc`` (and the HF model's transformers flavour on
image files) all agree; ``fip tune``'s held-out ACC for the
trial it registers is what ``fip evaluate`` measures for that model on the held-out shards."""

import json

import mlflow
import pytest
import torch
from family_models import digits_user_models

from fipcli.main import main
from lab.datasets import clean_split, load_dataset, without
from pipeline.shard_writer import write_shards
from pipeline.suspect import load_purified

pytestmark = [pytest.mark.slow]

JOB = ("--iterations", "10", "--batch-size", "32", "--workers", "1", "--augment", "false", "--esd-samples", "0")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    split = clean_split(train, 0.1, 0, "digits")
    write_shards(train.subset(split.indices), str(root / "dval"), maxcount=100, indices=split.indices)
    write_shards(test, str(root / "test"), maxcount=200)
    models = digits_user_models(root, without(train, split)[0])
    return root, models, ["--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("family", ["torchvision", "timm", "hf"])
def test_purify_evaluate_get_and_pyfunc_agree(ray_session, setup, family, capsys, tmp_path):
    root, models, uri = setup
    model = models[family]
    capsys.readouterr()
    assert main(["purify", "--model", str(model.path), *model.flags, "--clean", str(root / "dval"),
                 "--test", str(root / "test"), *JOB, "--lr", "0.001", "--work-dir", str(root / "jobs"), *uri,
                 "--register-as", family]) == 0
    job = _last_json(capsys)
    assert job["model_uri"] == f"models:/{family}@candidate"
    assert job["acc_before"] > 0.2  # trained: far from chance, so agreement is not agreement of noise
    assert main(["evaluate", "--model", f"models:/{family}@candidate", "--test", str(root / "test"), *uri]) == 0
    assert _last_json(capsys)["acc"] == job["acc_after"]
    got = tmp_path / "got.safetensors"
    assert main(["models", *uri, "get", f"{family}@candidate", "-o", str(got)]) == 0
    assert main(["evaluate", "--model", str(got), "--test", str(root / "test")]) == 0  # the file alone: no flags
    assert _last_json(capsys)["acc"] == job["acc_after"]

    mlflow.set_tracking_uri(uri[1])
    mlflow.set_registry_uri(uri[1])
    pyfunc = mlflow.pyfunc.load_model(f"models:/{family}@candidate")
    assert pyfunc.metadata.get_input_schema().inputs[0].shape == (-1, 1, 8, 8)  # the data as the user has it
    assert "[0, 1]" in pyfunc.metadata.metadata["input"]
    ours = load_purified(got).model
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(torch.as_tensor(pyfunc.predict(x.numpy())), ours(x), atol=1e-4)
    if family == "hf":
        _transformers_flavour_agrees(uri[1], ours, tmp_path)


def _transformers_flavour_agrees(store: str, ours, tmp_path) -> None:
    """The HF classifier's transformers flavour, logged beside the registered one, takes image files as a user
    has them and gives the top class and score that the purified model gives on the same pixels."""
    from mlflow import MlflowClient
    from PIL import Image

    version = MlflowClient(store, registry_uri=store).get_model_version_by_alias("hf", "candidate")
    pipe = mlflow.pyfunc.load_model(version.tags["transformers_model"])
    images = load_dataset("digits", "test").x[:4]
    paths = []
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy(), "L").save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    top = pipe.predict(paths)[0]  # the best class of each image: {"label": ..., "score": ...}
    with torch.no_grad():
        score, label = ours(images.float() / 255).softmax(-1).max(-1)
    labels = ours.config.id2label
    assert [t["label"] for t in top] == [labels[int(i)] for i in label]
    assert torch.allclose(torch.tensor([t["score"] for t in top]), score, atol=1e-5)


def test_tune_registers_the_trial_its_table_shows(ray_session, setup, capsys):
    root, models, uri = setup
    model = models["timm"]
    capsys.readouterr()
    assert main(["tune", "--model", str(model.path), *model.flags, "--clean", str(root / "dval"),
                 "--test", str(root / "test"), *JOB, "--space", "lr=loguniform:0.0005:0.002", "--num-samples", "2",
                 "--max-concurrent", "1", "--scheduler", "none", "--report-every", "5", "--no-refit",
                 "--name", "timm-sweep", "--work-dir", str(root / "jobs"), *uri, "--register-sweep-as", "timm-tuned"]) == 0
    summary = _last_json(capsys)
    table = json.loads((root / "jobs" / "timm-sweep" / "sweep-table.json").read_text())
    row = next(t for t in table["trials"] if t["trial_id"] == summary["winner"])
    # the table's held-out ACC is the registered model's accuracy on the held-out part of D_val
    assert main(["evaluate", "--model", "models:/timm-tuned@candidate", "--test",
                 str(root / "jobs" / "timm-sweep" / "dval-holdout"), *uri]) == 0
    assert _last_json(capsys)["acc"] == pytest.approx(row["holdout_acc"], abs=1e-12)
