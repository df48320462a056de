"""A purification job end to end: validate -> Fisher stage -> FIP stage -> MLflow run + registry.

Both stages run as Ray Train ``TorchTrainer`` jobs (gloo on CPU, NCCL on GPU) on the local Ray,
started for the job when none is running, or on the cluster at ``address``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fip.io import load_model
from fip.purify import PurifyConfig
from pipeline import storage
from pipeline.shards import open_shards
from pipeline.stages import StageConfig, fetch, fisher_stage, purify_stage


@dataclass
class JobConfig:
    """One `fip purify` job. `purify` holds the method's knobs (logged to MLflow as params)."""

    model: str
    clean: str
    test: str | None = None
    attack_record: str | None = None
    purify: PurifyConfig = field(default_factory=PurifyConfig)
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    loader_workers: int = 0
    address: str | None = None
    work_dir: str = "runs/jobs"
    storage_path: str | None = None  # Ray Train checkpoints; default <work_dir>/ray
    run_name: str | None = None
    checkpoint_every: int = 100
    max_failures: int = 2
    eval_samples: int | None = 2000
    skip_corrupt: bool = False
    log_every: int = 10
    tracking_uri: str | None = None
    experiment: str = "fip"
    register_as: str | None = "fip-purified"
    esd_samples: int = 64  # spectral density before/after: clean images and Lanczos steps (0: skip)
    esd_steps: int = 20
    s3_endpoint: str | None = None
    fail_at_step: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class JobError(ValueError):
    """The job was refused before any worker started (inputs do not fit together)."""


@dataclass
class JobResult:
    metrics: dict
    run_id: str | None
    model_uri: str | None
    purified_path: Path
    fisher_url: str
    history: list
    evaluations: list


def validate(cfg: JobConfig) -> tuple:
    """Refuse mismatched inputs before Ray starts: model vs shards (classes, image shape), batch split."""
    if cfg.workers < 1:
        raise JobError(f"workers must be >= 1, got {cfg.workers}")
    if cfg.purify.batch_size % cfg.workers:
        raise JobError(f"global batch {cfg.purify.batch_size} must be divisible by {cfg.workers} workers")
    if cfg.s3_endpoint:
        os.environ["FIP_S3_ENDPOINT_URL"] = cfg.s3_endpoint
    loaded = load_model(fetch(cfg.model, _cache_dir(cfg)))
    spec = loaded.spec
    expected = [spec.in_channels, spec.image_size, spec.image_size]
    sources = {"clean": open_shards(cfg.clean)}
    if cfg.test:
        sources["test"] = open_shards(cfg.test)
    for role, src in sources.items():
        m = src.manifest
        if m.num_classes != spec.num_classes:
            raise JobError(f"{role} shards have {m.num_classes} classes but the model {cfg.model} has {spec.num_classes}")
        if list(m.image_shape) != expected:
            raise JobError(f"{role} shards hold {tuple(m.image_shape)} images but the model expects {tuple(expected)}")
    if sources["clean"].total < cfg.workers:
        raise JobError(f"{sources['clean'].total} clean samples cannot be split across {cfg.workers} workers")
    record = None
    if cfg.attack_record:
        record = json.loads(storage.read_bytes(cfg.attack_record))
        rec_spec = record.get("model_spec", {})
        if rec_spec.get("num_classes") not in (None, spec.num_classes):
            raise JobError(f"attack record {cfg.attack_record} is for {rec_spec.get('num_classes')} classes, model has {spec.num_classes}")
    return loaded, sources, record


def _cache_dir(cfg: JobConfig) -> str:
    return str(Path(cfg.work_dir).resolve() / "cache") if not storage.is_s3(cfg.work_dir) else "/tmp/fip-cache"


def _abs(url: str | None) -> str | None:
    if url is None or storage.is_s3(url) or "://" in url:
        return url
    return str(Path(url).resolve())


def ensure_ray(cfg: JobConfig) -> None:
    """Connect to `address`, or start a local Ray sized for the job when none is running."""
    import ray

    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "FIP_", "MLFLOW_"))}
    runtime_env = {"env_vars": env} if env else None
    if cfg.address:
        ray.init(address=cfg.address, runtime_env=runtime_env, log_to_driver=True)
    else:
        cpus = max(os.cpu_count() or 1, int(cfg.workers * cfg.cpus_per_worker + 0.999))
        ray.init(num_cpus=cpus, object_store_memory=256 * 1024**2, include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=True)


def _fit(stage, stage_cfg: StageConfig, cfg: JobConfig, name: str, storage_path: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = TorchTrainer(
        stage,
        train_loop_config=stage_cfg.to_dict(),
        torch_config=TorchConfig(backend="nccl" if cfg.gpus_per_worker else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=bool(cfg.gpus_per_worker),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    return trainer.fit()


def _checkpoint_files(result) -> dict[str, bytes]:
    if result.checkpoint is None:
        raise RuntimeError(f"stage {result.path} finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


def run_job(cfg: JobConfig, progress=print) -> JobResult:
    """Run the whole job; returns metrics (before/after), the MLflow run and the registered model URI."""
    import mlflow

    from pipeline import tracking

    t0 = time.perf_counter()
    loaded, sources, record = validate(cfg)
    run_name = cfg.run_name or f"{cfg.purify.method}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    work = storage.join(cfg.work_dir if storage.is_s3(cfg.work_dir) else str(Path(cfg.work_dir).resolve()), run_name)
    fisher_url = storage.join(work, "fisher.safetensors")
    storage_path = cfg.storage_path or (storage.join(cfg.work_dir, "ray") if storage.is_s3(cfg.work_dir)
                                        else str(Path(cfg.work_dir).resolve() / "ray"))
    attack_tensors = None
    if record and record.get("trigger_path"):
        from safetensors.torch import load_file

        attack_tensors = load_file(fetch(record["trigger_path"], _cache_dir(cfg)))
    stage_cfg = StageConfig(
        model_url=_abs(cfg.model), clean=_abs(cfg.clean), test=_abs(cfg.test), fisher_url=fisher_url,
        purify=cfg.purify.to_dict(), attack_record=record, attack_tensors=attack_tensors,
        threads_per_worker=cfg.threads_per_worker, loader_workers=cfg.loader_workers,
        checkpoint_every=cfg.checkpoint_every, eval_every=cfg.purify.eval_every, eval_samples=cfg.eval_samples,
        skip_corrupt=cfg.skip_corrupt, log_every=cfg.log_every, fail_at_step=cfg.fail_at_step,
        s3_endpoint=cfg.s3_endpoint or os.environ.get("FIP_S3_ENDPOINT_URL"), cache_dir=_cache_dir(cfg),
    )
    tracking.configure(cfg.tracking_uri, Path(cfg.work_dir).parent / "mlartifacts" if not storage.is_s3(cfg.work_dir) else "runs/mlartifacts")
    exp_id = tracking.ensure_experiment(cfg.experiment)
    progress(f"[fip] job {run_name}: {cfg.purify.method} on {cfg.workers} worker(s), "
             f"{sources['clean'].total} clean samples, model {cfg.model}")
    ensure_ray(cfg)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as run:
        mlflow.log_params(tracking.flatten({"job": {k: v for k, v in cfg.to_dict().items() if k != "purify"},
                                            "purify": cfg.purify.to_dict()}))
        mlflow.set_tags({"source_sha256": loaded.sha256, "method": cfg.purify.method, "seed": cfg.purify.seed,
                         "fisher_kind": cfg.purify.fisher_kind, **_versions()})
        if record:
            tracking.write_json_artifact(record, "attack_record.json")

        progress("[fip] stage 1/2: Fisher estimation")
        r1 = _fit(fisher_stage, stage_cfg, cfg, f"{run_name}-fisher", storage_path)
        m1 = json.loads(_checkpoint_files(r1)["metrics.json"])
        mlflow.log_metrics({k: float(v) for k, v in m1.items()})
        local_fisher = fetch(fisher_url, _cache_dir(cfg))
        mlflow.log_artifact(str(local_fisher))

        progress("[fip] stage 2/2: FIP fine-tuning")
        r2 = _fit(purify_stage, stage_cfg, cfg, f"{run_name}-purify", storage_path)
        files = _checkpoint_files(r2)
        m2 = json.loads(files["metrics.json"])
        logs = json.loads(files["history.json"])
        out_dir = Path(cfg.work_dir).resolve() / run_name if not storage.is_s3(cfg.work_dir) else Path("runs/jobs") / run_name
        out_dir.mkdir(parents=True, exist_ok=True)
        purified_path = out_dir / "purified.safetensors"
        purified_path.write_bytes(files["purified.safetensors"])
        purified_path.with_suffix(".json").write_bytes(files["purified.json"])
        mlflow.log_metrics({k: float(v) for k, v in m2.items()})
        tracking.log_history(logs["history"], [{"step": 0, **{k[:-7]: v for k, v in m1.items() if k.endswith("_before")}}]
                             + logs["evaluations"])
        (out_dir / "history.json").write_text(json.dumps(logs))
        mlflow.log_artifact(str(out_dir / "history.json"))
        curves = tracking.plot_curves(logs["history"],
                                      [{"step": 0, **{k[:-7]: v for k, v in m1.items() if k.endswith("_before")}}] + logs["evaluations"],
                                      out_dir / "curves.png")
        mlflow.log_artifact(str(curves))
        purified = load_model(purified_path).model
        esd = _spectral_plots(loaded.model, purified, sources["clean"], cfg, out_dir)
        if esd:
            mlflow.log_metrics(esd)
            mlflow.log_artifact(str(out_dir / "esd.png"))
        seconds = time.perf_counter() - t0
        mlflow.log_metric("seconds", seconds)
        metrics = {**m1, **m2, **esd, "seconds": seconds}
        model_uri = None
        if cfg.register_as:
            tags = {"source_sha256": loaded.sha256, "method": cfg.purify.method,
                    **{k: f"{v:.4f}" for k, v in metrics.items() if k in ("acc_after", "asr_after", "ra_after")}}
            if "acc_after" in metrics:
                tags["ACC"] = f"{metrics['acc_after']:.4f}"
            if "asr_after" in metrics:
                tags["ASR"] = f"{metrics['asr_after']:.4f}"
            spec = loaded.spec
            reg = tracking.register_purified(purified, purified_path, (spec.in_channels, spec.image_size, spec.image_size),
                                             cfg.register_as, tags)
            model_uri = reg.model_uri
            metrics["model_version"] = reg.version
        return JobResult(metrics, run.info.run_id, model_uri, purified_path, fisher_url, logs["history"], logs["evaluations"])


def _spectral_plots(suspect, purified, clean_source, cfg: JobConfig, out_dir: Path) -> dict:
    """Hessian eigen-spectral density of the suspect and purified models on a few clean images."""
    if not cfg.esd_samples or not cfg.esd_steps:
        return {}
    from fip.smoothness import HessianOperator, plot_spectral_density, spectral_density
    from pipeline.shards import read_all

    x, y, _ = read_all(clean_source, limit=cfg.esd_samples)
    batch = [(x.float() / 255.0, y)]
    dens, out = {}, {}
    for label, model in (("suspect", suspect), ("purified", purified)):
        esd = spectral_density(HessianOperator(model, batch), runs=1, steps=cfg.esd_steps, seed=cfg.purify.seed)
        dens[label] = esd
        out[f"lambda_max_{'before' if label == 'suspect' else 'after'}"] = float(esd.nodes.max())
    plot_spectral_density(dens, out_dir / "esd.png", title="Hessian eigenvalue density (SLQ)")
    return out


def _versions() -> dict:
    import mlflow
    import ray
    import torch
    import webdataset

    return {"torch": torch.__version__, "ray": ray.__version__, "mlflow": mlflow.__version__,
            "webdataset": getattr(webdataset, "__version__", "?")}
