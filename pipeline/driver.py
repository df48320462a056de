"""The pipeline's public driver: one job config in, one result out.

:func:`run_job` is the call the CLI, a Ray Tune trial and a submitted Ray job all make. It runs in
clear steps: :func:`plan_job` (check the inputs fit together, resolve paths, before any worker
starts), then each stage of :data:`STAGES` through :func:`fit_stage` (a Ray Train ``TorchTrainer``),
then the analysis, then MLflow logging and registration, which the config can switch off
(``tracking.log_to_mlflow``, ``tracking.register_as``). Nothing here reads the environment or sets
process-wide state: storage and MLflow are explicit handles built from the config.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from fip.io import LoadedModel, check_finite_weights
from lab.backdoor import check_record_belongs
from pipeline.acceptance import judge_purified, rejection
from pipeline.analysis import plot_curves, spectral_analysis
from pipeline.artifacts import FISHER, HISTORY, METRICS, PURIFIED, PURIFIED_SIDECAR
from pipeline.config import JobConfig, Resources, RunSettings
from pipeline.progress import ProgressRelay
from pipeline.shards import ShardSource, open_shards
from pipeline.stages import StageContext, fisher_stage, purify_stage
from pipeline.storage import Storage, absolute_url, is_s3, join
from pipeline.tracking import Registered, Tracker, default_tracking_uri, local_root
from pipeline.transforms import load_model_for_data
from pipeline.validation import (
    JobError,
    check_batch_fits,
    check_clean_is_not_test,
    check_model_fits,
    check_shards,
)

StageFn = Callable[[dict], dict]
T = TypeVar("T")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Stage:
    """A named per-worker function; its metrics and files come back through its last checkpoint."""

    name: str
    fn: StageFn


# The job's stages, in order. A new stage is its function in pipeline/stages.py and one line here.
STAGES: tuple[Stage, ...] = (
    Stage("fisher", fisher_stage),
    Stage("purify", purify_stage),
)


class StageError(RuntimeError):
    """A stage failed in its workers; the message names the stage, the rank and the root cause in one line."""


def root_cause(error: BaseException) -> BaseException:
    """The user-code exception inside Ray's wrappers (RayTaskError, WorkerGroupError, ...)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)
        if failures:
            error = failures[min(failures)]
            continue
        inner = getattr(error, "cause", None) or getattr(error, "controller_failure", None) or error.__cause__
        if inner is None or not isinstance(inner, BaseException):
            break
        error = inner
    return error


def describe_cause(error: BaseException) -> str:
    """The root cause of a failure inside Ray's wrappers on one line: its type and its message's first line."""
    cause = root_cause(error)
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def stage_error(name: str, error: BaseException) -> StageError:
    failures = getattr(error, "worker_failures", None) or {}
    where = f" on rank {min(failures)}" if failures else ""
    return StageError(f"stage {name} failed{where}: {describe_cause(error)}")


@dataclass
class StageOutput:
    metrics: dict
    files: dict[str, bytes]


@dataclass
class JobPlan:
    """What :func:`plan_job` resolved: the normalised config, the stages' context and the local outputs."""

    config: JobConfig
    context: StageContext
    suspect: LoadedModel
    clean: ShardSource
    out_dir: Path
    storage_path: str
    warnings: list[str] = field(default_factory=list)  # one line each, shown before the job starts


@dataclass
class JobResult:
    metrics: dict
    run_id: str | None
    model_uri: str | None
    purified_path: Path
    fisher_url: str
    history: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)
    config: JobConfig | None = None


def plan_job(cfg: JobConfig) -> JobPlan:
    """Refuse mismatched inputs before Ray starts (model vs shards: classes, image shape; sizes) and
    resolve every path the workers will need, so they receive one self-contained config."""
    inputs, run = cfg.inputs, cfg.run
    cfg = cfg.replace(inputs={k: absolute_url(v) for k, v in vars(inputs).items()},
                      run={"work_dir": run.work_dir if is_s3(run.work_dir) else str(Path(run.work_dir).resolve()),
                           "run_name": run.run_name or f"{cfg.purify.method}-{time.strftime('%Y%m%d-%H%M%S')}"
                                                       f"-{uuid.uuid4().hex[:6]}"})
    store = Storage(cfg.storage)
    cache_dir = str(local_root(cfg.run.work_dir) / "cache")
    suspect = load_model_for_data(store.fetch(cfg.inputs.model, cache_dir))
    check_finite_weights(suspect.model, cfg.inputs.model)
    spec = suspect.spec
    sources = {"clean": open_shards(cfg.inputs.clean, store)}
    if cfg.inputs.test:
        sources["test"] = open_shards(cfg.inputs.test, store)
    for role, src in sources.items():
        check_model_fits(spec, src.manifest.num_classes, src.manifest.image_shape, f"{role} shards", cfg.inputs.model)
    if "test" in sources:
        check_clean_is_not_test(sources["clean"], sources["test"], cfg.inputs.clean, cfg.inputs.test)
    check_shards(sources, cfg.run.skip_corrupt)  # first samples, and whole small sets, before any worker starts
    if sources["clean"].total < cfg.resources.workers:
        raise JobError(f"{sources['clean'].total} clean samples cannot be split across {cfg.resources.workers} workers")
    record, tensors, warnings = None, {}, []
    if cfg.inputs.attack_record:
        record = json.loads(store.read_bytes(cfg.inputs.attack_record))
        warning = check_record_belongs(suspect.metadata, record, cfg.inputs.model, cfg.inputs.attack_record)
        warnings += [warning] if warning else []
        rec_classes = record.get("model_spec", {}).get("num_classes")
        if rec_classes not in (None, spec.num_classes):
            raise JobError(f"attack record {cfg.inputs.attack_record} is for {rec_classes} classes, "
                           f"the model has {spec.num_classes}")
        if record.get("trigger_path"):
            from safetensors.torch import load_file

            tensors = load_file(store.fetch(record["trigger_path"], cache_dir))
    # what the job asks of the data and the machine, after the inputs: a bad file is the first thing to fix
    check_batch_fits(cfg.purify.batch_size, sources["clean"].total, cfg.inputs.clean)
    check_local_cpus(cfg.resources)
    work = join(cfg.run.work_dir, cfg.run.run_name)
    out_dir = Path(work) if not is_s3(work) else local_root(cfg.run.work_dir) / "jobs" / cfg.run.run_name
    context = StageContext(cfg, cfg.run.run_name, join(work, FISHER), cache_dir, record, tensors)
    storage_path = cfg.run.storage_path or join(cfg.run.work_dir, "ray")
    return JobPlan(cfg, context, suspect, sources["clean"], out_dir, storage_path, warnings)


def ensure_ray(resources: Resources, dashboard: bool = False) -> None:
    """Connect to `resources.address`, or start a local Ray sized for the job when none is running; then
    refuse, in one line, a job that a local Ray cannot place (it has no autoscaler to wait for).

    `dashboard` starts a local Ray with its dashboard, whose State API Ray Train's placement-group cleaner
    needs: without it a Tune trial that ASHA stops leaves its workers' CPUs reserved, and later trials
    wait for them forever (docs/stack-notes.md). Sweeps ask for it; single jobs start faster without."""
    import ray

    if not ray.is_initialized():
        # workers' output and Ray's own logs stay in Ray's log folder (and dashboard); our stages relay their
        # progress to this terminal themselves (pipeline.progress)
        quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
        with _callers_sigterm_handler_kept():
            if resources.address:
                ray.init(address=resources.address, **quiet)
            else:
                _start_local_ray(resources, {**quiet, "include_dashboard": dashboard})
    if not resources.address:
        check_local_resources(resources)


# Local Ray start-ups on one machine take turns through this lock (see _start_local_ray)
LOCAL_RAY_START_LOCK = Path(tempfile.gettempdir()) / "fip-local-ray-start.lock"


class RayStartError(OSError):
    """A local Ray did not come up (twice); the message carries Ray's reason."""


def _start_local_ray(resources: Resources, options: dict) -> None:
    """Start a local Ray for this process.

    Start-ups take turns: two jobs started at once on a small machine each wait on their own raylet while
    the other's start-up takes the CPUs, and Ray gives up after 30 s ("The current node timed out during
    startup", docs/stack-notes.md). A start that fails anyway is retried once.
    The job's working_dir is an empty folder: without one, Ray puts the caller's current directory first
    on the workers' sys.path, and a `pipeline/` or `fip/` there would run instead of the installed package."""
    import ray

    cpus = max(os.cpu_count() or 1, int(resources.workers * resources.cpus_per_worker + 0.999))
    for attempt in (1, 2):
        with _start_lock(), tempfile.TemporaryDirectory(prefix="fip-ray-wd-") as empty:
            try:
                ray.init(num_cpus=cpus, object_store_memory=256 * 1024**2, runtime_env={"working_dir": empty},
                         **options)
                return
            except Exception as e:  # Ray raises a bare Exception for a start-up timeout
                ray.shutdown()
                if attempt == 2:
                    raise RayStartError(f"local Ray did not start (tried twice): {e}") from e
                logging.getLogger(__name__).warning("local Ray did not start (%s); trying once more", e)


@contextmanager
def _start_lock() -> Iterator[None]:
    """Hold the machine-wide start-up lock (an flock, released if this process dies); without access to
    the lock file, start unserialised rather than not at all."""
    try:
        fd = os.open(LOCAL_RAY_START_LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def _callers_sigterm_handler_kept() -> Iterator[None]:
    """``ray.init`` replaces the process's SIGTERM handler with ``sys.exit`` (Ray 2.60). A handler the caller
    installed is put back, so a stop reaches it (the CLI turns SIGTERM into an interrupt and the job marks its
    run KILLED); a process without one keeps Ray's."""
    on_main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if on_main else None
    try:
        yield
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


def check_local_cpus(resources: Resources, also: float = 0.0, what: str = "") -> None:
    """A local Ray (no `resources.address`) has this machine's CPUs and no autoscaler: refuse, before it starts,
    workers that ask for more (Ray would start them all and the job wait for ever). `also`: CPUs the caller
    needs beside the workers (a Tune trial's own), named by `what`."""
    if resources.address:
        return
    have = os.cpu_count() or 1
    need = resources.workers * resources.cpus_per_worker + also
    if need > have:
        extra = f" + {what} {also:g}" if also else ""
        raise JobError(f"workers {resources.workers} x cpus_per_worker {resources.cpus_per_worker:g}{extra} needs "
                       f"{need:g} CPUs but this machine has {have} for a local Ray: lower --workers or "
                       "--cpus-per-worker, or pass --address of a larger cluster")


def check_local_resources(resources: Resources) -> None:
    """Ray Train waits forever (retrying every 60 s) for GPUs a local Ray does not have: refuse that job."""
    import ray

    need = resources.gpus_per_worker * resources.workers
    have = float(ray.cluster_resources().get("GPU", 0.0))
    if need > have:
        raise JobError(f"gpus_per_worker {resources.gpus_per_worker:g} x {resources.workers} workers needs {need:g} "
                       f"GPUs but the local Ray has {have:g}: set --gpus-per-worker 0, or --address a cluster with GPUs")


def fit_stage(stage_fn: StageFn, context: StageContext, resources: Resources, run: RunSettings, name: str,
              storage_path: str, callbacks: list | None = None) -> StageOutput:
    """Run one stage on `resources.workers` Ray Train workers (`Resources.collective_backend`) and return the
    metrics and files of its last checkpoint; a dead worker is replaced up to `run.max_failures` times."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.failures import InputErrorsAreFinal  # input errors fail the same way again: not retried

    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker:
        per_worker["GPU"] = resources.gpus_per_worker
    trainer = TorchTrainer(
        stage_fn,
        train_loop_config={"context": context},
        torch_config=TorchConfig(backend=resources.collective_backend()),
        scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=bool(resources.gpus_per_worker),
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=[*(callbacks or []), InputErrorsAreFinal()],
                             failure_config=FailureConfig(max_failures=run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        result = _off_main_thread(trainer.fit)
    except Exception as e:
        from ray.train import TrainingFailedError

        if isinstance(e, TrainingFailedError):
            raise stage_error(name, e) from e
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"stage {name} finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        files = {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
    return StageOutput(json.loads(files.pop(METRICS)), files)


def _off_main_thread(fn: Callable[[], T]) -> T:
    """Run `fn` in a helper thread and wait for it on this one.

    Ray Train replaces the process's SIGINT handler when ``fit()`` runs on the main thread (and keeps
    it, exiting 0 on a third Ctrl-C). Off the main thread it leaves signals alone, so Ctrl-C raises
    KeyboardInterrupt here at once: the job is marked killed and the command exits non-zero."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the waiting thread
            box["error"] = e

    thread = threading.Thread(target=target, name="fip-stage", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _tags(plan: JobPlan) -> dict:
    import mlflow
    import ray
    import torch
    import webdataset

    cfg = plan.config
    return {"source_sha256": plan.suspect.sha256, "method": cfg.purify.method, "seed": cfg.purify.seed,
            "fisher_kind": cfg.purify.fisher_kind, "torch": torch.__version__, "ray": ray.__version__,
            "mlflow": mlflow.__version__, "webdataset": getattr(webdataset, "__version__", "?")}


def run_job(cfg: JobConfig, parent_run_id: str | None = None, progress: Progress = print,
            callbacks: list | None = None) -> JobResult:
    """Run the whole job; returns the metrics (before/after), the MLflow run and the registered model URI.

    `parent_run_id` nests the job's MLflow run under a sweep's; `callbacks` go to each stage's Ray
    Train run (a Tune trial forwards intermediate reports with them).
    """
    t0 = time.perf_counter()
    plan = plan_job(cfg)
    cfg, ctx = plan.config, plan.context
    for warning in plan.warnings:
        progress(f"[fip] {warning}")
    progress(f"[fip] job {ctx.run_name}: {cfg.purify.method} on {cfg.resources.workers} worker(s), "
             f"{plan.clean.total} clean samples, model {cfg.inputs.model}")
    tracker = run_id = None
    if cfg.tracking.log_to_mlflow:
        root = local_root(cfg.run.work_dir)
        tracker = Tracker(cfg.tracking.tracking_uri or default_tracking_uri(cfg.run.work_dir), root / "mlartifacts")
        run_id = tracker.start_run(cfg.tracking.experiment, ctx.run_name, cfg.to_dict(), _tags(plan), parent_run_id)
    status = "FAILED"  # anything that escapes, SystemExit included
    try:
        result = _execute(plan, tracker, run_id, progress, callbacks, t0)
        status = "FINISHED"
    except KeyboardInterrupt as e:  # Ctrl-C, or a stop signal the caller turned into one (fipcli.main)
        status = "KILLED"
        if tracker is not None:
            e.add_note(f"MLflow run {run_id} marked KILLED")
        raise
    finally:
        if tracker is not None:
            tracker.finish(run_id, status)
    return result


def _execute(plan: JobPlan, tracker: Tracker | None, run_id: str | None, progress: Progress,
             callbacks: list | None, t0: float) -> JobResult:
    cfg, ctx = plan.config, plan.context
    ensure_ray(cfg.resources)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    if tracker is not None and ctx.attack_record:
        tracker.log_json(run_id, ctx.attack_record, "attack_record.json")
    metrics: dict = {}
    for i, stage in enumerate(STAGES, 1):
        progress(f"[fip] stage {i}/{len(STAGES)}: {stage.name}")
        relay = ProgressRelay(progress, stage.name)
        try:
            out = fit_stage(stage.fn, dataclasses.replace(ctx, relay=relay.queue), cfg.resources, cfg.run,
                            f"{ctx.run_name}-{stage.name}", plan.storage_path, callbacks)
        finally:
            relay.close()
        metrics.update(out.metrics)
        for name, data in out.files.items():
            (plan.out_dir / name).write_bytes(data)
        if tracker is not None:
            tracker.log_metrics(run_id, out.metrics)
            for name in out.files:
                if name != PURIFIED_SIDECAR:  # the sidecar goes with the model at registration
                    tracker.log_artifact(run_id, plan.out_dir / name)
    logs = json.loads((plan.out_dir / HISTORY).read_text())
    start_eval = [{"step": 0, **{k.removesuffix("_before"): v for k, v in metrics.items() if k.endswith("_before")}}]
    evaluations = (start_eval if len(start_eval[0]) > 1 else []) + logs["evaluations"]
    curves = plot_curves(logs["history"], evaluations, plan.out_dir / "curves.png")
    purified_path = plan.out_dir / PURIFIED
    loaded = load_model_for_data(purified_path)
    purified = loaded.model
    verdict = judge_purified(plan.suspect, loaded, plan.clean, cfg.acceptance, logs["history"], cfg.run.skip_corrupt)
    metrics.update(verdict.metrics)
    if tracker is not None:
        tracker.log_metrics(run_id, verdict.metrics)
        tracker.set_tags(run_id, verdict.tags())
    if not verdict.passed:
        if tracker is not None:
            tracker.log_history(run_id, logs["history"], evaluations)
            tracker.log_artifact(run_id, curves)
        raise rejection(verdict)
    progress(f"[fip] purified model accepted: {verdict.reason}")
    if cfg.analysis.esd_samples and cfg.analysis.esd_steps:
        progress(f"[fip] analysis: Hessian spectral density of both models on {cfg.analysis.esd_samples} samples")
    esd = spectral_analysis(plan.suspect.model, purified, plan.clean, cfg.analysis, cfg.purify.seed,
                            plan.out_dir / "esd.png")
    metrics.update(esd)
    metrics["seconds"] = time.perf_counter() - t0
    model_uri = None
    if tracker is not None:
        tracker.log_history(run_id, logs["history"], evaluations)
        tracker.log_artifact(run_id, curves)
        if esd:
            tracker.log_artifact(run_id, plan.out_dir / "esd.png")
        tracker.log_metrics(run_id, {**esd, "seconds": metrics["seconds"]})
        if cfg.tracking.register_as:
            reg = register(tracker, run_id, plan, purified, purified_path, metrics, progress)
            model_uri, metrics["model_version"] = reg.model_uri, reg.version
    return JobResult(metrics, run_id, model_uri, purified_path, ctx.fisher_url, logs["history"], logs["evaluations"],
                     cfg)


def metric_tags(metrics: dict) -> dict[str, str]:
    """The registry tags of a model measured in benchmark mode (ACC, ASR, RA and, with the suspect's
    figures, DER) from a job's metrics; the ones not measured are left out. One spelling for every
    registered version, whether a job or a sweep registers it."""
    from lab.metrics import defense_effectiveness_rating

    tags = {tag: f"{metrics[key]:.4f}" for key, tag in (("acc_after", "ACC"), ("asr_after", "ASR"), ("ra_after", "RA"))
            if metrics.get(key) is not None}
    if all(metrics.get(k) is not None for k in ("acc_before", "asr_before", "acc_after", "asr_after")):
        tags["DER"] = (f"{defense_effectiveness_rating(metrics['acc_before'], metrics['asr_before'], metrics['acc_after'], metrics['asr_after']):.4f}")
    return tags


def register(tracker: Tracker, run_id: str, plan: JobPlan, purified, purified_path: Path, metrics: dict,
             progress: Progress = print) -> Registered:
    """A new registry version of the purified model (MLflow's ``NAME/latest``), tagged with its source and, in
    benchmark mode, its metrics; ``candidate`` moves to it only if it beats the holder
    (:meth:`pipeline.tracking.Tracker.offer_candidate`)."""
    spec = plan.suspect.spec
    tags = {"source_sha256": plan.suspect.sha256, "method": plan.config.purify.method, **metric_tags(metrics)}
    name = plan.config.tracking.register_as
    progress(f"[fip] registering the purified model as {name}")
    reg = tracker.register(run_id, purified, purified_path, (spec.in_channels, spec.image_size, spec.image_size),
                           name, tags)
    moved, why = tracker.offer_candidate(name, reg.version, tags)
    progress(f"[fip] registered {name} version {reg.version}; @candidate "
             + (f"moved to it ({why})" if moved else f"stays ({why})"))
    return Registered(reg.name, reg.version, f"models:/{name}@candidate" if moved else f"models:/{name}/{reg.version}")
