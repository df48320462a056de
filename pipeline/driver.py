"""The pipeline's public driver: one job config in, one result out.

:func:`run_job` is the call the CLI, a Ray Tune trial and a submitted Ray job all make. It runs in
clear steps: :func:`pipeline.plan.plan_job` (check the inputs fit together, resolve paths, before any
worker starts), then each stage of :data:`STAGES` through :func:`pipeline.ray_runtime.fit_stage` (a Ray
Train ``TorchTrainer``), then the acceptance check and the analysis, then MLflow logging and registration
(:mod:`pipeline.registry`), which the config can switch off (``tracking.log_to_mlflow``,
``tracking.register_as``). Nothing here reads the environment or sets process-wide state: storage and
MLflow are explicit handles built from the config.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fip.tasks import task_named
from pipeline.acceptance import judge_purified, rejection
from pipeline.analysis import plot_curves, spectral_analysis
from pipeline.artifacts import HISTORY, PURIFIED, PURIFIED_SIDECAR, FisherOutput, Measured, PurifyOutput
from pipeline.config import JobConfig
from pipeline.plan import JobPlan, plan_job
from pipeline.progress import ProgressRelay
from pipeline.ray_runtime import StageFn, ensure_ray, fit_stage
from pipeline.registry import register_purified, registry_tags, tokenizer_for
from pipeline.stages import fisher_stage, purify_stage
from pipeline.storage import Storage
from pipeline.suspect import load_purified
from pipeline.tracking import Tracker, default_tracking_uri, local_root

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Stage:
    """A named per-worker function; its output and files come back through its last checkpoint."""

    name: str
    fn: StageFn


# The job's stages, in order. A new stage is its function in pipeline/stages.py and one line here.
STAGES: tuple[Stage, ...] = (
    Stage("fisher", fisher_stage),
    Stage("purify", purify_stage),
)


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
    measured: Measured = field(default_factory=Measured)  # the test figures before and after (benchmark mode)


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
    measured = Measured()  # the suspect's test figures from the Fisher stage, the purified model's from purify
    relay = ProgressRelay(progress)  # one queue for all the stages
    try:
        for i, stage in enumerate(STAGES, 1):
            progress(f"[fip] stage {i}/{len(STAGES)}: {stage.name}")
            relay.start(stage.name)
            out, files = fit_stage(stage.fn, dataclasses.replace(ctx, relay=relay.queue), cfg.resources, cfg.run,
                                   f"{ctx.run_name}-{stage.name}", plan.storage_path, callbacks)
            relay.stop()
            if isinstance(out, FisherOutput | PurifyOutput):
                measured = measured | out.measured
            metrics.update(out.metrics())
            for name, data in files.items():
                (plan.out_dir / name).write_bytes(data)
            if tracker is not None:
                tracker.log_metrics(run_id, out.metrics())
                for name in files:
                    if name != PURIFIED_SIDECAR:  # the sidecar goes with the model at registration
                        tracker.log_artifact(run_id, plan.out_dir / name)
    except KeyboardInterrupt:
        # A stop signal to the process group reaches a local Ray's own services too: a call into Ray now can
        # hang for a minute or end the process, so the relay lets go without one and the run is marked first
        relay.abandon()
        raise
    finally:
        relay.close()
    logs = json.loads((plan.out_dir / HISTORY).read_text())
    evaluations = ([{"step": 0, **measured.before}] if measured.before else []) + logs["evaluations"]
    curves = plot_curves(logs["history"], evaluations, plan.out_dir / "curves.png")
    purified_path = plan.out_dir / PURIFIED
    loaded = load_purified(purified_path)
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
                            plan.out_dir / "esd.png", task_named(plan.suspect.spec.task)).flat()
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
            tags = registry_tags(plan.suspect.sha256, cfg.purify.method, measured)
            tokenizer = tokenizer_for(loaded, plan.clean, Storage(cfg.storage), plan.out_dir)
            reg = register_purified(tracker, run_id, loaded, purified_path, cfg.tracking.register_as, tags, progress,
                                    tokenizer=tokenizer)
            model_uri, metrics["model_version"] = reg.model_uri, reg.version
    return JobResult(metrics, run_id, model_uri, purified_path, ctx.fisher_url, logs["history"], logs["evaluations"],
                     cfg, measured)
