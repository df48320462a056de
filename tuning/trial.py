"""What runs inside one Ray Tune trial of a sweep (:mod:`tuning.sweep` is the driver's side).

A trial is one pipeline job (:func:`pipeline.driver.run_job`) on the sweep's share of D_val with the
settings Tune sampled, no registration, no test shards and no attack record. While it runs,
:class:`ObjectiveReport` scores each intermediate purify checkpoint on the held-out share so that ASHA
can stop a weak trial early; at its end the purified model is scored once more (the only figures the
choice reads) and, in benchmark mode, measured on the test set (figures the choice never reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import CheckpointOutput, Measured
from pipeline.config import JobConfig
from pipeline.storage import Storage
from pipeline.tracking import Tracker, default_tracking_uri, local_root
from tuning.objective import Holdout, ObjectiveWeights, evaluate_objective, evaluate_probed
from tuning.stability import sample_record


@dataclass
class TrialContext:
    """What every trial receives (through Tune's object store): the base config and the sweep's fixed parts."""

    base: dict
    sweep: str
    train_url: str
    jobs_dir: str
    holdout: Holdout
    weights: ObjectiveWeights
    report_every: int
    parent_run_id: str | None
    test: str | None = None
    attack_record: str | None = None
    score_checkpoints: bool = False  # a scheduler reads the intermediate reports: score each (the probe included)


def one_store(base: JobConfig) -> JobConfig:
    """`base` with its MLflow store spelled out: the sweep, every trial and the refit then write to that one
    store. Left implicit, each job would derive it from its own work folder (a trial's is inside the sweep's),
    and the sweep's parent run and its trials' runs would land in two SQLite files."""
    return base.replace(tracking={"tracking_uri": base.tracking.tracking_uri or default_tracking_uri(base.run.work_dir)})


def sweep_tracker(base: JobConfig) -> Tracker:
    """The sweep's one MLflow store (:func:`one_store`), as the sweep and each trial open it."""
    return Tracker(one_store(base).tracking.tracking_uri, local_root(base.run.work_dir) / "mlartifacts")


def load_suspect(base: JobConfig, cache_dir: str | Path):
    """The suspect as every caller runs it (:func:`pipeline.suspect.load_suspect`, with the job's model settings)."""
    from pipeline.suspect import load_suspect as load

    return load(Storage(base.storage).fetch(base.inputs.model, cache_dir), base.model)


def plain(params: dict) -> dict:
    """Sampled settings as plain Python values (Tune hands out numpy scalars; the job config is strict)."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in params.items()}


def _report_callback(ctx: TrialContext, purify: dict):
    """Ray Tune's Train callback, adding the held-out objective to each report that carries a purify checkpoint
    when a scheduler reads it (``ctx.score_checkpoints``); without one, such a report carries its step and a NaN
    objective (Tune wants the metric in every result), and the probe runs once per trial, at its end.

    It runs where Ray Train's controller runs, apart from the trial: it loads the suspect there once, at the
    first checkpoint, and starts each report's model from it."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from fip.purify import MODEL_STATE, PurifyConfig, finalize_model, prepare_model

    suspect_row = {"step": 0, "objective": 0.0, "holdout_acc": ctx.holdout.suspect["acc"], "agreement": 1.0,
                   "kl_to_suspect": 0.0, "trace_ratio": 1.0}
    pcfg = PurifyConfig(**purify)

    class ObjectiveReport(TuneReportCallback):
        suspect = None  # loaded at the first purify checkpoint, then kept for the trial's every report

        def objective(self, state: dict) -> dict:
            """The objective of an intermediate checkpoint (the purifier's state at that step)."""
            if self.suspect is None:
                self.suspect = load_suspect(JobConfig.from_dict(ctx.base), Path(ctx.jobs_dir) / "cache").model
            work = prepare_model(self.suspect, pcfg)
            work.load_state_dict(state[MODEL_STATE])
            return evaluate_objective(finalize_model(work, pcfg), ctx.holdout, ctx.weights)

        def after_report(self, run_context, metrics, checkpoint):
            metrics = [dict(m) for m in metrics]
            saved = None
            if checkpoint is not None:
                with checkpoint.as_directory() as d:
                    saved = CheckpointOutput.read(d)
            # Tune wants the metric in every result: a report without a purify state (the Fisher stage's) is the suspect's
            if saved is None:
                metrics[0].update(suspect_row)
            else:
                metrics[0].update(self.objective(saved.state) if ctx.score_checkpoints else {"objective": math.nan})
            super().after_report(run_context, metrics, checkpoint)

    return ObjectiveReport()


def run_trial(params: dict, ctx: TrialContext) -> None:
    """One Tune trial: a pipeline job on dval-train with these purify settings, scored on dval-holdout."""
    from ray import tune

    from pipeline.acceptance import PurificationRejected
    from pipeline.driver import run_job
    from pipeline.suspect import load_purified

    trial_id = tune.get_context().get_trial_id()
    params = plain(params)
    base = JobConfig.from_dict(ctx.base)
    purify = {**base.purify.to_dict(), **params}
    cfg = base.replace(
        purify=params,
        inputs={"clean": ctx.train_url, "test": None, "attack_record": None},
        run={"work_dir": ctx.jobs_dir, "run_name": f"{ctx.sweep}-{trial_id}", "checkpoint_every": ctx.report_every},
        tracking={"register_as": None},
    )
    try:
        result = run_job(cfg, parent_run_id=ctx.parent_run_id, callbacks=[_report_callback(ctx, purify)])
    except PurificationRejected as e:  # the acceptance check refused the model: a trial that ends, and cannot win
        tune.report({"objective": -math.inf, "rejected": str(e), "step": cfg.purify.iterations})
        return
    purified = load_purified(result.purified_path).model
    metrics, found = evaluate_probed(purified, ctx.holdout, ctx.weights)  # the choice reads only these
    samples = sample_record(purified, ctx.holdout, found).encode()  # how much the choice rests on (tuning.stability)
    if ctx.test and ctx.attack_record:
        metrics.update(_benchmark_metrics(ctx, base, purified))
    if result.run_id and cfg.tracking.log_to_mlflow:
        tracker = sweep_tracker(base)
        tracker.log_metrics(result.run_id, metrics)
        tracker.set_tags(result.run_id, {"sweep": ctx.sweep, "trial_id": trial_id})
    tune.report({**metrics, **samples, "step": cfg.purify.iterations, "purified": str(result.purified_path),
                 "child_run_id": result.run_id or "", "seconds": result.metrics.get("seconds", math.nan)})


def _benchmark_metrics(ctx: TrialContext, base: JobConfig, purified) -> dict:
    """ACC/ASR/RA/DER on the test shards (benchmark mode): reported, never used to choose."""
    from fip.tasks import task_named
    from lab.metrics import defense_effectiveness_rating
    from pipeline.evaluation import evaluate_shards
    from pipeline.plan import load_attack_record
    from pipeline.shards import open_shards

    store = Storage(base.storage)
    cache_dir = Path(ctx.jobs_dir) / "cache"
    attack = load_attack_record(ctx.attack_record, store, cache_dir).attack(store, cache_dir)
    test = open_shards(ctx.test, store)
    suspect = load_suspect(base, cache_dir)
    task = task_named(suspect.spec.task)
    after = evaluate_shards(purified, test, attack, task=task)
    before = evaluate_shards(suspect.model, test, attack, task=task)
    der = defense_effectiveness_rating(before["acc"], before["asr"], after["acc"], after["asr"])
    return {**{k: after[k] for k in ("acc", "asr", "ra", "false_trigger") if k in after}, "der": der,
            **Measured(before={"acc": before["acc"], "asr": before["asr"]}).flat()}
