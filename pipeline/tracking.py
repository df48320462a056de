"""MLflow: one run per purification, the purified model in the registry, and retrieval by alias.

Embedded default: a SQLite store ``runs/mlflow.db`` and artifacts under ``runs/mlartifacts`` in the
working directory; any tracking URI via ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

SAFETENSORS_ARTIFACT = "purified/model.safetensors"
DEFAULT_MODEL_NAME = "fip-purified"


def default_tracking_uri(root: str | Path = "runs") -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def configure(tracking_uri: str | None = None, artifact_root: str | Path = "runs/mlartifacts") -> str:
    """Point MLflow at `tracking_uri` (or the embedded default); returns the URI used."""
    import mlflow

    uri = tracking_uri or default_tracking_uri(Path(artifact_root).parent)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(name: str, artifact_root: str | Path = "runs/mlartifacts") -> str:
    """The experiment id, creating it with an absolute artifact location for SQLite stores."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        location = Path(artifact_root).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def log_history(history: Iterable[dict], evaluations: Iterable[dict]) -> None:
    """Per-step loss terms (and trace when computed) plus evaluation metrics, batched."""
    import time

    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    now = int(time.time() * 1000)
    metrics = []
    for rec in history:
        step = int(rec["step"])
        metrics += [Metric(k, float(v), now, step) for k, v in rec.items() if k != "step"]
    for ev in evaluations:
        metrics += [Metric(f"eval_{k}", float(v), now, int(ev["step"])) for k, v in ev.items() if k != "step"]
    for i in range(0, len(metrics), 900):
        client.log_batch(run_id, metrics=metrics[i : i + 900])


def plot_curves(history: list[dict], evaluations: list[dict], path: Path) -> Path:
    """Loss terms per step, and ACC/ASR at each evaluation, to one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [h["step"] for h in history]
    for key in ("ce", "total"):
        a.plot(steps, [h[key] for h in history], label=key, lw=0.8)
    tr = [(h["step"], h["trace"]) for h in history if "trace" in h]
    if tr:
        a2 = a.twinx()
        a2.plot(*zip(*tr, strict=True), color="tab:red", lw=0.8, label="Tr(F)")
        a2.set_ylabel("Tr(F)")
    a.set_xlabel("step")
    a.set_title("FIP loss terms")
    a.legend(loc="upper left")
    for key in ("acc", "asr", "ra"):
        pts = [(e["step"], 100 * e[key]) for e in evaluations if key in e]
        if pts:
            b.plot(*zip(*pts, strict=True), marker="o", label=key.upper())
    b.set_xlabel("step")
    b.set_ylabel("%")
    b.set_ylim(-2, 102)
    b.set_title("ACC / ASR during purification")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class Registered:
    name: str
    version: str
    model_uri: str


def register_purified(
    model: nn.Module,
    safetensors_path: Path,
    input_shape: tuple[int, ...],
    name: str,
    tags: dict[str, str],
    alias: str = "candidate",
) -> Registered:
    """Log the model (MLflow pytorch flavour, pt2 with an input example) plus our safetensors file,
    register a new version under `name` with `tags`, and point `alias` at it."""
    import mlflow

    mlflow.log_artifact(str(safetensors_path), artifact_path="purified")
    sidecar = safetensors_path.with_suffix(".json")
    if sidecar.is_file():
        mlflow.log_artifact(str(sidecar), artifact_path="purified")
    example = np.zeros((1, *input_shape), dtype=np.float32)
    model = model.cpu().eval()
    info = mlflow.pytorch.log_model(model, name="model", input_example=example, registered_model_name=name,
                                    await_registration_for=60)
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for k, v in {**tags, "safetensors_artifact": f"purified/{safetensors_path.name}"}.items():
        client.set_model_version_tag(name, version, k, str(v))
    client.set_registered_model_alias(name, alias, version)
    return Registered(name, version, f"models:/{name}@{alias}")


# ---------------------------------------------------------------- retrieval
def list_models() -> list[dict]:
    import mlflow

    client = mlflow.MlflowClient()
    rows = []
    for rm in client.search_registered_models():
        # version search results do not carry aliases (SQL store); the registered model's map does
        by_version: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            rows.append({"name": rm.name, "version": mv.version, "aliases": sorted(by_version.get(str(mv.version), [])),
                         "run_id": mv.run_id, "tags": dict(mv.tags or {})})
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


def resolve_version(ref: str):
    """``NAME`` (latest version), ``NAME@ALIAS`` or ``NAME/VERSION`` to an MLflow ModelVersion."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        if "/" in ref:
            name, version = ref.split("/", 1)
            return client.get_model_version(name, version)
        versions = client.search_model_versions(f"name='{ref}'")
    except MlflowException as e:
        raise ValueError(f"no registered model matches {ref!r}: {e.message}") from e
    if not versions:
        raise ValueError(f"no registered model named {ref!r}")
    return max(versions, key=lambda v: int(v.version))


def download_safetensors(ref: str, out: str | Path) -> Path:
    """Fetch the purified safetensors file (and sidecar) behind a registry reference to `out`."""
    import shutil

    import mlflow

    mv = resolve_version(ref)
    artifact = (mv.tags or {}).get("safetensors_artifact", SAFETENSORS_ARTIFACT)
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=artifact.rsplit("/", 1)[0], dst_path=tmp))
        src = local / artifact.rsplit("/", 1)[1]
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out)
        if src.with_suffix(".json").is_file():
            shutil.copyfile(src.with_suffix(".json"), out.with_suffix(".json"))
    return out


def promote(name: str, version: str, alias: str) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version))
    except MlflowException as e:
        raise ValueError(f"cannot set alias {alias!r} on {name} version {version}: {e.message}") from e


def write_json_artifact(obj: dict, name: str) -> None:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / name
        p.write_text(json.dumps(obj, indent=2, default=str))
        mlflow.log_artifact(str(p))


def model_hash(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
