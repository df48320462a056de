"""The README's commands, run as written: the README cannot drift from what works.

Every ``fip`` command in the README's bash blocks is listed in :data:`RECIPES`, in README order, with
how the test runs it small: the same words, with the files it names replaced by small ones the test
makes, and flags appended only to make the work tiny (fewer iterations, samples or trials; a later
flag wins in argparse). S3 is moto's server on loopback under the README's own bucket names; MLflow is
the default store the commands find themselves (``runs/mlflow.db`` under the working folder). A README
command without a recipe fails the first test, so a new command comes with its test.
"""

from __future__ import annotations

import json
import re
import shlex
import tarfile
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from text_corpus import make_records, make_tokenizer, write_jsonl

from fipcli.main import build_parser, main

README = Path(__file__).resolve().parents[2] / "README.md"


@dataclass(frozen=True)
class Recipe:
    """How the walkthrough runs one README command: `tiny` flags appended; None `why` = run it, else only parse."""

    tiny: tuple[str, ...] = ()
    skip_run: str | None = None  # why it is only parsed here (and where it runs for real)
    replace: dict[str, str] = field(default_factory=dict)  # README placeholder -> a key of the walkthrough's files


RECIPES: dict[str, Recipe] = {
    "fip attack --attack blend --dataset fashion-mnist --out runs/lab":
        Recipe(("--train-limit", "600", "--epochs", "1")),
    # 200 of D_val's 600: the purify's Fisher pass and the sweep's held-out objective (and its probe) read fewer
    "fip shard fashion-mnist runs/shards/dval --split train --indices runs/lab/dval-fashion-mnist-f0.01-s0.json":
        Recipe(("--limit", "200")),
    "fip shard fashion-mnist s3://my-bucket/fmnist/test --split test --s3-endpoint http://minio:9000":
        Recipe(("--limit", "500")),
    "fip shard imagenet-folder s3://my-bucket/imagenet/dval --root /data/imagenet/train --dval-fraction 0.01 "
    "--rest s3://my-bucket/imagenet/train --workers 8":
        Recipe(("--workers", "2"), replace={"/data/imagenet/train": "image_folder"}),
    "fip shard text data/instructions.jsonl runs/shards/lm-dval --tokenizer models/my-lm --max-length 512 "
    "--dval-fraction 0.05":
        Recipe(replace={"data/instructions.jsonl": "jsonl", "models/my-lm": "tokenizer"}),
    "fip shard index 's3://their-bucket/imagenet-val-{000000..000063}.tar' --out runs/imagenet-val.manifest.json":
        Recipe(),
    "fip purify --model runs/lab/blend-....safetensors --clean runs/shards/dval --test s3://my-bucket/fmnist/test "
    "--attack-record runs/lab/blend-....record.json --workers 2 --preset paper-300 --s3-endpoint http://minio:9000":
        Recipe(("--iterations", "4", "--batch-size", "16", "--esd-samples", "0"),
               replace={"runs/lab/blend-....safetensors": "suspect", "runs/lab/blend-....record.json": "record"}),
    "fip models list": Recipe(),
    "fip models get fip-purified@candidate -o purified.safetensors": Recipe(),
    # the README promotes version 3 of a store with history; this fresh store has version 1
    "fip models promote fip-purified 3 production": Recipe(replace={"fip-purified 3": "fip-purified 1"}),
    "fip models inspect purified.safetensors": Recipe(),
    "fip purify --model resnet18.pth --arch torchvision:resnet18 --num-classes 10 --image-size 32 "
    "--data-shape 1,28,28 --clean runs/shards/dval --workers 2 --preset paper-300":
        Recipe(skip_run="runs as tests/e2e/test_family_models.py runs it, on digits (a .pth, a timm and an HF model)"),
    "fip evaluate --model my-hf-classifier/ --test s3://my-bucket/fmnist/test --s3-endpoint http://minio:9000":
        Recipe(skip_run="runs as tests/e2e/test_family_models.py runs it, on digits (a .pth, a timm and an HF model)"),
    "fip purify --model models/my-lm --clean runs/shards/lm-dval --test runs/shards/lm-test --workers 2 "
    "--preset paper-300":
        Recipe(skip_run="runs as tests/e2e/test_language_model.py runs it, on a tiny GPT-2 and its text shards"),
    "fip tune --model models/my-lm --clean runs/shards/lm-dval --workers 1 --name my-lm-sweep":
        Recipe(skip_run="runs as tests/e2e/test_language_model.py's sweep runs it, on a tiny GPT-2 and its text shards"),
    "fip evaluate --model models/my-lm --test runs/shards/lm-test --attack-record runs/lm-bench/attack-record.json":
        Recipe(skip_run="runs as tests/pipeline/test_text_backdoor.py runs it, on a tiny backdoored GPT-2"),
    "fip smoothness --model purified.safetensors --plot esd.png":
        Recipe(("--samples", "16", "--iters", "3", "--max-probes", "4", "--density-steps", "4")),
    "fip tune --preset paper-300 --model suspect.safetensors --clean runs/shards/dval --workers 1 "
    "--cpus-per-worker 0.5 --num-samples 12 --name my-sweep":
        Recipe(("--num-samples", "2", "--space", "iterations=4", "--report-every", "2",
                "--batch-size", "16", "--esd-samples", "0", "--holdout-fraction", "0.15"),
               replace={"suspect.safetensors": "suspect"}),
    "fip submit purify --model /abs/suspect.safetensors --clean /abs/shards/dval --iterations 300 --follow":
        Recipe(skip_run="needs a Ray cluster with its jobs API: tests/e2e/test_submit.py (make test-heavy)"),
    "fip jobs list":
        Recipe(skip_run="needs a Ray cluster with its jobs API: tests/e2e/test_submit.py (make test-heavy)"),
}


def readme_commands() -> list[str]:
    """The ``fip`` commands of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["fip"]:
                commands.append(shlex.join(words))  # as typed, but for spacing and comments
    return commands


def test_every_readme_command_has_a_recipe_and_parses():
    commands = readme_commands()
    assert commands, "no fip command found in the README's bash blocks"
    missing = [c for c in commands if c not in RECIPES]
    assert not missing, f"README commands with no test here (add them to RECIPES): {missing}"
    stale = [c for c in RECIPES if c not in commands]
    assert not stale, f"RECIPES for commands the README no longer has: {stale}"
    parser = build_parser()
    for command in commands:
        parser.parse_args(shlex.split(command)[1:])  # argparse exits (SystemExit) on a flag that does not exist


def test_readme_python_blocks_compile_and_their_imports_exist():
    """The README's Python snippets: valid code whose imports name things that exist (their run is the job the
    walkthrough below runs through the CLI)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for block in blocks:
        compile(block, "README.md", "exec")
        exec("\n".join(line for line in block.splitlines() if line.startswith(("from ", "import "))), {})


# ---------------------------------------------------------------- the walkthrough
def _image_folder(root: Path) -> Path:
    """A tiny ImageNet-style folder: 3 classes x 8 JPEG files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("n01", "n02", "n03"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{c}_{i}.JPEG")
    return root


def _their_shards(s3, bucket: str, count: int) -> None:
    """`count` one-sample WebDataset shards as another tool writes them (PNG image + cls)."""
    from PIL import Image

    for i in range(count):
        png, buf = BytesIO(), BytesIO()
        Image.fromarray(np.full((8, 8, 3), i % 256, dtype=np.uint8)).save(png, format="PNG")
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in ((f"s{i:06d}.png", png.getvalue()), (f"s{i:06d}.cls", str(i % 4).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, BytesIO(data))
        s3.put_object(Bucket=bucket, Key=f"imagenet-val-{i:06d}.tar", Body=buf.getvalue())


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_readme_walkthrough_runs_as_written(ray_session, s3_endpoint, tmp_path, monkeypatch, capsys):
    import boto3
    import mlflow

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for bucket in ("my-bucket", "their-bucket"):
        s3.create_bucket(Bucket=bucket)
    _their_shards(s3, "their-bucket", 64)
    files = {"image_folder": str(_image_folder(tmp_path / "imagenet" / "train")),
             "jsonl": str(write_jsonl(tmp_path / "instructions.jsonl", make_records())),
             "tokenizer": str(make_tokenizer(tmp_path / "my-lm"))}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # where boto3 looks when a command has no --s3-endpoint
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for command in readme_commands():
        recipe = RECIPES[command]
        if recipe.skip_run:
            continue
        if "suspect" in recipe.replace.values():
            suspect = next(Path("runs/lab").glob("blend-*.safetensors"))
            files.update(suspect=str(suspect), record=str(suspect).removesuffix(".safetensors") + ".record.json")
        text = command.replace("http://minio:9000", s3_endpoint)
        for placeholder, key in recipe.replace.items():
            text = text.replace(placeholder, files.get(key, key))
        argv = [*shlex.split(text)[1:], *recipe.tiny]
        capsys.readouterr()
        rc = main(argv)
        out, err = capsys.readouterr()
        assert rc == 0, f"`{command}` (run as fip {shlex.join(argv)}) exited {rc}: {err[-2000:]}"

    # what the commands left where the README says they leave it
    assert Path("purified.safetensors").is_file() and Path("esd.png").is_file()
    assert json.loads(Path("runs/imagenet-val.manifest.json").read_text())
    assert json.loads(Path("runs/shards/lm-dval/manifest.json").read_text())["task"] == "causal-lm"
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert not list(Path("runs/jobs").rglob("mlflow.db")), "a job or sweep wrote a second MLflow store"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    assert "production" in client.get_model_version("fip-purified", "1").aliases
    # the sweep: its parent run, a child per trial in the same store, and its winner registered
    exp = client.get_experiment_by_name("fip")
    parent = client.search_runs([exp.experiment_id], "tags.sweep = 'my-sweep' and tags.kind = 'sweep'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    registered = parent[0].data.tags["registered"]
    name, version = registered.split("/")
    assert client.get_model_version(name, version).run_id == parent[0].data.tags["winner_run_id"]
