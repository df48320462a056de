"""MLflow through one client bound to one store, and an explicit run id on every call.

Nothing here sets MLflow's process-wide tracking or registry URI or relies on an active run, so two
jobs with two stores can log from one process at the same time. The embedded default store is
SQLite beside the job's work folder (``runs/mlflow.db`` with artifacts in ``runs/mlartifacts`` for
the default ``runs/jobs``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from fip.io import file_sha256
from pipeline.storage import is_s3

SAFETENSORS_ARTIFACT = "purified/model.safetensors"


class TrackingError(ValueError):
    """The MLflow store or a registry reference cannot be used; the message says where it looked."""


def local_root(work_dir: str) -> Path:
    """The folder that holds the embedded store: the parent of a local work folder, else ./runs."""
    return Path("runs").resolve() if is_s3(work_dir) else Path(work_dir).resolve().parent


def default_tracking_uri(work_dir: str) -> str:
    return f"sqlite:///{local_root(work_dir) / 'mlflow.db'}"


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


@dataclass
class Registered:
    name: str
    version: str
    model_uri: str
    candidate: bool = False  # whether @candidate moved to this version (pipeline.registry)


# torch.export traces through process-wide dispatch modes: two exports at once in one process (two jobs
# registering together) corrupt each other's trace, so they take turns
_EXPORT_LOCK = threading.Lock()


def _requirements() -> list[str]:
    """What loading the logged model needs, stated rather than inferred (inference is slow and warns
    about torch's local version label)."""
    import mlflow
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"]


def _save_pytorch(model: nn.Module, input_shape: tuple[int, ...], where: Path, metadata: dict | None) -> None:
    """An image model in MLflow's pytorch flavour, taking float32 batches of `input_shape`."""
    import mlflow.pytorch
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    # the batch dimension is -1 in the signature (that is what MLflow exports as dynamic), and the
    # example's batch is 2, not 1: torch.export keeps a size-1 dimension static
    example = np.zeros((2, *input_shape), dtype=np.float32)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]))
    mlflow.pytorch.save_model(model.cpu().eval(), str(where), input_example=example, signature=signature,
                              pip_requirements=_requirements(), metadata=metadata)


GENERATION_PARAMS = {"max_new_tokens": 32, "do_sample": False}  # what pyfunc.predict takes, greedy by default


def _save_text_generation(model: nn.Module, tokenizer: Path, where: Path, metadata: dict | None) -> None:
    """A language model and its tokenizer folder as MLflow's transformers flavour: ``mlflow.pyfunc`` loads a
    text-generation pipeline whose ``predict`` takes prompts (and `GENERATION_PARAMS`) and returns text. Nothing
    is fetched from the hub; the tokenizer is read from its files (never unpickled)."""
    import mlflow.transformers
    from mlflow.models import infer_signature

    from fip.families import import_transformers, without_logits_hook
    from pipeline.text_source import load_tokenizer

    transformers = import_transformers()
    tok, _ = load_tokenizer(tokenizer)
    signature = infer_signature(["a prompt"], ["its answer"], params=GENERATION_PARAMS)
    mlflow.transformers.save_model({"model": without_logits_hook(model).cpu().eval(), "tokenizer": tok}, str(where),
                                   task="text-generation", signature=signature, metadata=metadata,
                                   pip_requirements=[*_requirements(), f"transformers=={transformers.__version__}"])


TRANSFORMERS_ARTIFACT = "transformers"  # the run's folder of an HF image classifier's transformers flavour


def _save_image_classification(model: nn.Module, processor: dict, where: Path, metadata: dict | None) -> None:
    """An HF image classifier in MLflow's transformers flavour: an image-classification pipeline whose image
    processor (`processor`: ViTImageProcessor settings, the network's own size and normalisation) does what the
    pytorch flavour's model does inside, so ``mlflow.pyfunc`` takes image files (paths or base64) and returns the
    top classes with their scores. Nothing is fetched from the hub."""
    import mlflow.transformers

    from fip.families import import_transformers, without_logits_hook
    from fip.inputs import without_input_hooks

    transformers = import_transformers()
    plain = without_input_hooks(without_logits_hook(model).cpu().eval())  # a copy: the processor feeds it
    mlflow.transformers.save_model({"model": plain, "image_processor": transformers.ViTImageProcessor(**processor)},
                                   str(where), task="image-classification", metadata=metadata,
                                   pip_requirements=[*_requirements(), f"transformers=={transformers.__version__}"])


STORE_CHECK_TIMEOUT_S = 5.0  # an MLflow server answers /health in milliseconds; a dead one must not hold a command
SQLITE_MAGIC = b"SQLite format 3\x00"
PASSED_THROUGH_SCHEMES = ("postgresql", "mysql", "mssql", "databricks", "databricks-uc")  # MLflow checks these itself


def check_store(uri: str, create: bool = True, timeout_s: float = STORE_CHECK_TIMEOUT_S) -> None:
    """Refuse, in one line and within `timeout_s`, a tracking URI MLflow would retry for minutes or fail on with a
    traceback: an http(s) server that does not answer ``GET /health``, an SQLite path that is a folder, not an
    SQLite file or not creatable, a file store (a bare path or ``file://``, which MLflow 3 refuses) or an
    unknown scheme. Database servers and Databricks pass through. `create` False: the SQLite file must exist."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "sqlite":
        _check_sqlite(uri, create)
    elif scheme in ("http", "https"):
        _check_http(uri, timeout_s)
    elif scheme in ("", "file"):
        raise TrackingError(f"tracking URI {uri} is a file store, which MLflow no longer serves: pass "
                            f"sqlite:///PATH/mlflow.db or http(s)://HOST:PORT of an `mlflow server`")
    elif scheme.split("+")[0] not in PASSED_THROUGH_SCHEMES:
        raise TrackingError(f"tracking URI {uri}: unknown scheme {scheme!r}; use sqlite:///PATH, http(s)://HOST:PORT "
                            f"or one of {', '.join(PASSED_THROUGH_SCHEMES)}")


def _check_sqlite(uri: str, create: bool) -> None:
    path = Path(uri.removeprefix("sqlite:///"))
    if uri in ("sqlite://", "sqlite:///") or path.is_dir():
        raise TrackingError(f"tracking URI {uri} names a folder, not an SQLite file: pass sqlite:///"
                            f"{path / 'mlflow.db' if uri != 'sqlite://' else 'PATH/mlflow.db'}")
    if path.is_file():
        try:
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except OSError as e:
            raise TrackingError(f"cannot read the MLflow store {path} (tracking URI {uri}): {e.strerror or e}") from e
        if head and head != SQLITE_MAGIC:
            raise TrackingError(f"{path} is not an SQLite database (tracking URI {uri})")
        return
    if not create:
        raise TrackingError(f"no MLflow store at {path} (tracking URI {uri}); pass --tracking-uri")
    ancestor = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise TrackingError(f"cannot create the MLflow store {path} (tracking URI {uri}): {ancestor} is "
                            + ("not a folder" if not ancestor.is_dir() else "not writable"))


def _check_http(uri: str, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            response.read(64)
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403):  # a server that wants credentials is there; MLflow's client brings them
            raise TrackingError(f"tracking URI {uri} is not an MLflow server: GET {url} answered HTTP {e.code}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"MLflow server {uri} does not answer (GET {url}: {reason}, waited at most "
                            f"{timeout_s:g} s): start it or pass another --tracking-uri") from e


class Tracker:
    """One MLflow store (tracking and registry at the same URI), used through an explicit client.

    `create` is False for commands that only read: an absent SQLite file is then an error naming the
    path, not a new empty store.
    """

    def __init__(self, uri: str, artifact_root: str | Path | None = None, create: bool = True) -> None:
        check_store(uri, create)  # before MLflow's client, which retries a dead store for minutes
        from mlflow import MlflowClient

        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.uri = uri
        self.artifact_root = Path(artifact_root) if artifact_root else None
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    # ------------------------------------------------------------ runs
    def experiment_id(self, name: str) -> str:
        """The experiment's id, created with an absolute artifact folder for SQLite stores."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:") and self.artifact_root is not None:
            location = self.artifact_root.resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def start_run(self, experiment: str, run_name: str, params: dict, tags: dict,
                  parent_run_id: str | None = None) -> str:
        from mlflow.entities import Param

        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name,
                                     tags={k: str(v) for k, v in all_tags.items()})
        run_id = run.info.run_id
        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])
        return run_id

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def set_tags(self, run_id: str, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, int | float)]
        for i in range(0, len(items), 900):
            self.client.log_batch(run_id, metrics=items[i : i + 900])

    def log_history(self, run_id: str, history: Iterable[dict], evaluations: Iterable[dict]) -> None:
        """Per-step loss terms (and the trace when computed) plus the evaluations, batched."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for rec in history:
            metrics += [Metric(k, float(v), now, int(rec["step"])) for k, v in rec.items() if k != "step"]
        for ev in evaluations:
            metrics += [Metric(f"eval_{k}", float(v), now, int(ev["step"])) for k, v in ev.items() if k != "step"]
        for i in range(0, len(metrics), 900):
            self.client.log_batch(run_id, metrics=metrics[i : i + 900])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_json(self, run_id: str, obj: dict, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_text(json.dumps(obj, indent=2, default=str))
            self.client.log_artifact(run_id, str(p))

    # ------------------------------------------------------------ registry
    def register(self, run_id: str, model: nn.Module, safetensors_path: Path, input_shape: tuple[int, ...],
                 name: str, tags: dict[str, str], aliases: Iterable[str] = (),
                 model_metadata: dict | None = None, tokenizer: Path | None = None,
                 image_processor: dict | None = None) -> Registered:
        """Log the model and our safetensors file, register a new version under `name` with `tags` and the
        file's SHA-256, and point `aliases` at it. An image model is logged in MLflow's pytorch flavour (any batch
        size); a language model with its `tokenizer` folder in the transformers flavour (a text-generation
        pipeline, so ``mlflow.pyfunc`` generates). Either carries `model_metadata` in its MLmodel file.
        `image_processor`: an HF image classifier's processor settings; its transformers flavour is logged
        beside the registered pytorch one, at the run's ``transformers`` folder (tag ``transformers_model``)."""
        from mlflow.exceptions import MlflowException

        self.client.log_artifact(run_id, str(safetensors_path), "purified")
        sidecar = safetensors_path.with_suffix(".json")
        if sidecar.is_file():
            self.client.log_artifact(run_id, str(sidecar), "purified")
        with tempfile.TemporaryDirectory() as tmp, _EXPORT_LOCK:
            where = Path(tmp) / "model"
            if tokenizer is not None:
                _save_text_generation(model, tokenizer, where, model_metadata)
            else:
                _save_pytorch(model, input_shape, where, model_metadata)
            self.client.log_artifacts(run_id, str(where), "model")
            if image_processor is not None:
                _save_image_classification(model, image_processor, Path(tmp) / TRANSFORMERS_ARTIFACT, model_metadata)
                self.client.log_artifacts(run_id, str(Path(tmp) / TRANSFORMERS_ARTIFACT), TRANSFORMERS_ARTIFACT)
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name)
        source = f"{self.client.get_run(run_id).info.artifact_uri}/model"
        all_tags = {**tags, "safetensors_artifact": f"purified/{safetensors_path.name}",
                    "safetensors_sha256": file_sha256(safetensors_path),
                    **({"transformers_model": f"runs:/{run_id}/{TRANSFORMERS_ARTIFACT}"} if image_processor else {})}
        # created with its tags in one call: an interrupted job never leaves a version without its SHA-256
        mv = self.client.create_model_version(name, source, run_id=run_id,
                                              tags={k: str(v) for k, v in all_tags.items()})
        version = str(mv.version)
        try:
            for alias in aliases:
                self.client.set_registered_model_alias(name, alias, version)
        except BaseException:  # Ctrl-C included: no half-aliased version stays behind
            self.client.delete_model_version(name, version)
            raise
        first = next(iter(aliases), None)
        return Registered(name, version, f"models:/{name}@{first}" if first else f"models:/{name}/{version}")

    def offer_candidate(self, name: str, version: str, tags: dict[str, str]) -> tuple[bool, str]:
        """Move alias ``candidate`` to `version` only if it is better than the current holder.

        Aliases (docs/registry.md): MLflow's own ``models:/NAME/latest`` is always the newest version;
        ``candidate`` is the best version so far for its source model; ``production`` moves only by
        ``fip models promote``.
        "Better" compares a score both versions carry: the sweep's defender objective (tag
        ``objective``), else in benchmark mode the DER (tag ``DER``). A holder purified from another
        source model, or no holder at all, gives way. Returns (moved, why)."""
        from mlflow.exceptions import MlflowException

        try:
            holder = self.client.get_model_version_by_alias(name, "candidate")
        except MlflowException:
            holder = None
        moved, why = True, "no earlier candidate"
        if holder is not None and str(holder.version) != str(version):
            old = holder.tags or {}
            if old.get("source_sha256") != tags.get("source_sha256"):
                why = f"version {holder.version} was purified from another source model"
            else:
                key = next((k for k in ("objective", "DER") if k in old and k in tags), None)
                if key is None:
                    moved, why = False, (f"version {holder.version} holds it and the two share no score "
                                         "(objective or DER) to compare")
                elif float(tags[key]) > float(old[key]):
                    why = f"{key} {float(tags[key]):.4f} beats version {holder.version}'s {float(old[key]):.4f}"
                else:
                    moved, why = False, (f"version {holder.version}'s {key} {float(old[key]):.4f} is at least "
                                         f"this one's {float(tags[key]):.4f}")
        if moved:
            self.client.set_registered_model_alias(name, "candidate", str(version))
        return moved, why

    def list_models(self) -> list[dict]:
        rows = []
        for rm in self.client.search_registered_models():
            # version search results do not carry aliases (SQL store); the registered model's map does
            by_version: dict[str, list[str]] = {}
            for alias, version in (rm.aliases or {}).items():
                by_version.setdefault(str(version), []).append(alias)
            for mv in self.client.search_model_versions(f"name='{rm.name}'"):
                rows.append({"name": rm.name, "version": mv.version, "aliases": sorted(by_version.get(str(mv.version), [])),
                             "run_id": mv.run_id, "tags": dict(mv.tags or {})})
        return sorted(rows, key=lambda r: (r["name"], int(r["version"])))

    def resolve_version(self, ref: str):
        """``NAME`` or ``NAME/latest`` (the newest version), ``NAME@ALIAS`` or ``NAME/VERSION`` (``models:/``
        optional) to a ModelVersion."""
        from mlflow.exceptions import MlflowException

        ref = ref.removeprefix("models:/")
        try:
            if "@" in ref:
                name, alias = ref.split("@", 1)
                return self.client.get_model_version_by_alias(name, alias)
            if "/" in ref and not ref.endswith("/latest"):
                name, version = ref.split("/", 1)
                return self.client.get_model_version(name, version)
            versions = self.client.search_model_versions(f"name='{ref.removesuffix('/latest')}'")
        except MlflowException as e:
            raise TrackingError(f"no registered model matches {ref!r} in {self.uri}: {e.message}") from e
        if not versions:
            raise TrackingError(f"no registered model named {ref!r} in {self.uri}")
        return max(versions, key=lambda v: int(v.version))

    def download_safetensors(self, ref: str, out: str | Path) -> Path:
        """Fetch the purified safetensors file (and sidecar) behind a registry reference to `out`,
        refusing a file whose SHA-256 differs from the one recorded at registration."""
        mv = self.resolve_version(ref)
        tags = mv.tags or {}
        artifact = tags.get("safetensors_artifact", SAFETENSORS_ARTIFACT)
        folder, filename = artifact.rsplit("/", 1)
        out = Path(out)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(self.client.download_artifacts(mv.run_id, folder, tmp))
            src = local / filename
            expected = tags.get("safetensors_sha256")
            if expected and file_sha256(src) != expected:
                raise TrackingError(f"{ref}: the stored file {artifact} of run {mv.run_id} does not match the SHA-256 "
                                    f"recorded at registration ({expected[:12]}...): refusing it")
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out)
            if src.with_suffix(".json").is_file():
                shutil.copyfile(src.with_suffix(".json"), out.with_suffix(".json"))
        return out

    def promote(self, name: str, version: str, alias: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_registered_model_alias(name, alias, str(version))
        except MlflowException as e:
            raise TrackingError(f"cannot set alias {alias!r} on {name} version {version}: {e.message}") from e

