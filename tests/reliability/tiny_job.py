"""A tiny purification as a user runs it (`fip purify` in its own process), for the process-side cases:
interruption, concurrent runs, secrets, storage faults. Inputs are an untrained ViT and scikit-learn digits
as local shards; what a run left in MLflow is read back with :func:`mlflow_state`.

These cases start Ray: run them under the shared lock (`flock /tmp/fip-ray.lock .venv/bin/pytest ...`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# one worker, a few steps, the Fisher over D_val once: a job of ~30-60 s on 2 loaded cores
TINY = ["--workers", "1", "--iterations", "8", "--batch-size", "16", "--eta-f", "0.002", "--lr", "0.01",
        "--trace-every", "4", "--trace-batch", "8", "--eval-every", "0", "--checkpoint-every", "4",
        "--seed", "3", "--esd-samples", "0"]


@dataclass(frozen=True)
class TinyInputs:
    model: str
    clean: str
    test: str


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory) -> TinyInputs:
    """A small untrained ViT for 1x8x8 digits (these cases are about the process, not the backdoor), 140
    digits as D_val shards and 100 as test shards: built in a second."""
    import torch

    from fip.io import save_model
    from fip.models import ModelSpec, build_model
    from lab.datasets import load_dataset
    from pipeline.shard_writer import write_shards

    root = tmp_path_factory.mktemp("tiny-inputs")
    spec = ModelSpec("vit-small", num_classes=10, in_channels=1, image_size=8, width=0.25)
    torch.manual_seed(0)
    model = save_model(build_model(spec), spec, root / "suspect.safetensors")
    write_shards(load_dataset("digits", "train").subset(range(140)), str(root / "dval"), maxcount=70)
    write_shards(load_dataset("digits", "test").subset(range(100)), str(root / "test"), maxcount=100)
    return TinyInputs(str(model), str(root / "dval"), str(root / "test"))


def purify_argv(inputs: TinyInputs, work: Path, *extra: str, test: bool = True) -> list[str]:
    """`fip purify` flags for the tiny job writing under `work` (its own MLflow store there)."""
    return ["purify", "--model", inputs.model, "--clean", inputs.clean, *(["--test", inputs.test] if test else []), "--work-dir", str(work / "jobs"),
            "--tracking-uri", tracking_uri(work), *TINY, *extra]


def tracking_uri(work: Path) -> str:
    return f"sqlite:///{work / 'mlflow.db'}"


def quiet_env(**extra: str) -> dict[str, str]:
    """The environment a case's `fip` process runs with: the user's, minus a tracking URI of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, **extra}


@dataclass
class MlflowState:
    """What the runs left in one MLflow store: run statuses, model-version and logged-model statuses."""

    runs: list[str]
    versions: list[str]
    logged_models: list[str]

    def problems(self, run_status: tuple[str, ...]) -> list[str]:
        """What a stopped job must not leave: a run in another status than `run_status`, anything PENDING."""
        found = [f"run {s}" for s in self.runs if s not in run_status]
        found += [f"model version {s}" for s in self.versions if s != "READY"]
        found += [f"logged model {s}" for s in self.logged_models if s != "READY"]
        return found


def mlflow_state(work: Path) -> MlflowState:
    from mlflow import MlflowClient

    if not (work / "mlflow.db").is_file():
        return MlflowState([], [], [])
    client = MlflowClient(tracking_uri(work), registry_uri=tracking_uri(work))
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = [r.info.status for r in client.search_runs(experiments)] if experiments else []
    versions = [str(v.status) for v in client.search_model_versions()]
    logged = []
    if experiments:
        logged = [str(m.status) for m in client.search_logged_models(experiments)]
    return MlflowState(runs, versions, logged)
