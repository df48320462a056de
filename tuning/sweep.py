"""A Ray Tune sweep over FIP's settings, each trial one pipeline job, the winner chosen without the trigger.

:func:`run_sweep` takes the base job config exactly as ``fip purify`` builds it and a
:class:`~tuning.space.SearchSpace`, and:

1. splits D_val once into ``dval-train`` (every trial's ``inputs.clean``) and ``dval-holdout`` (read
   only by the objective, :mod:`tuning.objective`), in the sweep's folder;
2. opens one MLflow parent run for the sweep;
3. runs ``num_samples`` trials through Ray Tune (:mod:`tuning.trial`, what runs inside one): each is
   :func:`pipeline.driver.run_job` (Ray Train inside the Tune trial) with a nested child run, no
   registration, no test shards and no attack record. By default every trial runs to the end; with
   ASHA (``scheduler="asha"``) intermediate checkpoints are scored on the held-out share so that it can
   stop weak trials early. An Optuna searcher (or random search) proposes the settings;
4. picks the finished trial with the highest objective and registers its model (with ``refit=True``
   the winner's settings first re-run on all of D_val and that unscored model is registered instead),
   with the alias ``candidate`` and tags naming the sweep's run and the trial, and logs the sweep table
   (and in benchmark mode a plot of objective against DER) to the parent run.

In benchmark mode (the base config has test shards and an attack record) each trial is also measured
on the test set, after its objective is computed; those numbers go to the table, never to the choice.
An interrupted sweep continues with ``resume=True`` (Tune's ``Tuner.restore``): finished trials are
kept, unfinished ones run again (their Ray Train run resumes from its last checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from fip.tasks import CLASSIFICATION, task_named
from pipeline.artifacts import HISTORY, Measured
from pipeline.config import ConfigError, JobConfig
from pipeline.ray_runtime import StageError
from pipeline.storage import Storage, absolute_url, is_s3, join
from pipeline.tracking import Tracker, check_store, local_root
from pipeline.validation import check_batch_fits
from tuning.evidence import WORDING, Evidence, winner_evidence
from tuning.objective import Holdout, ObjectiveWeights, probe
from tuning.quiet import tune_output_to
from tuning.report import FEATURES, plot_objective_vs_der, spearman, trial_table
from tuning.space import SearchSpace
from tuning.stability import RESAMPLES, SAMPLE_KEYS, SampleRecord, choice_stability, sample_record
from tuning.trial import TrialContext, load_suspect, one_store, plain, run_trial, sweep_tracker

Progress = Callable[[str], None]
TUNE_OUTPUT = "tune-output.log"  # Ray Tune's own printed output, in the sweep's folder (tuning.quiet)


def say(msg: str) -> None:
    """The default progress: a line on stdout, flushed (Ray may end the process before a buffer is written)."""
    print(msg, flush=True)


@dataclass
class SweepConfig:
    """How a sweep searches and where it runs; the search space is separate (:class:`SearchSpace`)."""

    name: str = "sweep"
    num_samples: int = 8
    # opt-in: the first trial runs the job's own settings when they lie inside the space (docs/tuning.md)
    base_trial: bool = False
    max_concurrent: int = 1
    searcher: Literal["optuna", "random"] = "optuna"
    # every trial to the end: at the default run lengths an intermediate report (its probe) costs more than ASHA
    # saves, and an image trial's report inside its crop phase ranks the crop, not the model (docs/tuning.md)
    scheduler: Literal["asha", "none"] = "none"
    grace_steps: int = 50  # ASHA: no trial is stopped before this many purify steps
    reduction_factor: int = 2
    report_every: int = 100  # purify steps between checkpoints; under ASHA each is scored (the probe included)
    trial_cpus: float = 0.25  # the Tune trial itself (it drives run_job); the workers ask for their own
    trial_gpus: float = 0.0
    holdout_fraction: float = 0.3
    seed: int = 0
    register_as: str | None = "fip-purified"
    refit: bool = False  # re-run the winner's settings on all of D_val and register that unscored model (docs/tuning.md)
    weights: ObjectiveWeights = field(default_factory=ObjectiveWeights)
    interrupt_after: int | None = None  # tests only: the driver interrupts itself after this many finished trials

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ConfigError(f"num_samples and max_concurrent must be >= 1, got {self.num_samples}, "
                              f"{self.max_concurrent}")
        if self.trial_cpus <= 0 or self.trial_gpus < 0:
            raise ConfigError(f"trial_cpus must be > 0 and trial_gpus >= 0, got {self.trial_cpus}, {self.trial_gpus}")
        if self.grace_steps < 1 or self.report_every < 1 or self.reduction_factor < 2:
            raise ConfigError("grace_steps and report_every must be >= 1 and reduction_factor >= 2")
        if not 0 < self.holdout_fraction < 1:
            raise ConfigError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not self.name or "/" in self.name:
            raise ConfigError(f"sweep name must be a non-empty folder name, got {self.name!r}")


class NoTrialFinished(StageError):
    """Every trial of a sweep failed or was stopped: nothing to choose or register; names the first failure."""


@dataclass
class SweepResult:
    trials: list[dict]
    winner: dict | None
    parent_run_id: str | None
    model_uri: str | None
    table_path: Path
    plot_path: Path | None
    seconds: float
    refit_run_id: str | None = None  # the job that re-ran the winner's settings on all of D_val
    evidence: Evidence | None = None  # what the winner's choice rested on (tuning.evidence)


class LiveTable:
    """A table of the trials on the terminal, redrawn as results arrive (a Ray Tune callback)."""

    FIXED = ("trial", "status", "step", "objective")
    WEIGHED = (("acc", "holdout_acc"), ("kl", "kl_to_suspect"), ("curvature", "trace_ratio"), ("uap", "uap_max"))

    def __init__(self, progress: Progress, weights: ObjectiveWeights, every_s: float = 5.0,
                 interrupt_after: int | None = None) -> None:
        """Columns: the objective and the features it weighs (a zero weight: not shown), then DER when the
        sweep reports on test data."""
        from ray.tune import Callback

        table = self

        class _Callback(Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                table.update(trial, result, "RUNNING")

            def on_trial_complete(self, iteration, trials, trial, **info):
                last = trial.last_result or {}
                table.update(trial, last, "REJECTED" if "rejected" in last else "DONE", force=True)
                table.finished += 1
                if table.interrupt_after is not None and table.finished >= table.interrupt_after:
                    table.interrupt_after = None
                    os.kill(os.getpid(), signal.SIGINT)  # tests: an interrupted driver

            def on_trial_error(self, iteration, trials, trial, **info):
                table.update(trial, trial.last_result or {}, "ERROR", force=True)

        self.callback = _Callback()
        self.columns = (*self.FIXED, *(column for name, column in self.WEIGHED if getattr(weights, name)), "der")
        self.progress, self.every_s, self.interrupt_after = progress, every_s, interrupt_after
        self.rows: dict[str, dict] = {}
        self.finished = 0
        self._last = 0.0

    def update(self, trial, result: dict, status: str, force: bool = False) -> None:
        row = self.rows.setdefault(trial.trial_id, {"trial": trial.trial_id})
        row["status"] = status
        if result.get("step") == 0:  # the Fisher stage's report carries the suspect's figures, not the trial's
            row.setdefault("step", 0)
            result = {}
        row.update({k: result[k] for k in self.columns if k in result and k not in ("trial", "status")
                    and not (isinstance(result[k], float) and math.isnan(result[k]))})  # NaN: a report not scored
        if force or time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self.progress(self.render())

    def render(self) -> str:
        def fmt(v):
            return f"{v:.4f}" if isinstance(v, float) else str(v)

        widths = [max(len(c), *(len(fmt(r.get(c, "-"))) for r in self.rows.values())) for c in self.columns]
        lines = ["  ".join(c.ljust(w) for c, w in zip(self.columns, widths))]
        lines += ["  ".join(fmt(r.get(c, "-")).ljust(w) for c, w in zip(self.columns, widths))
                  for r in self.rows.values()]
        return "[fip tune]\n" + "\n".join(lines)


def make_searcher(cfg: SweepConfig, first: dict | None = None):
    """The sweep's searcher, seeded by ``cfg.seed`` (both kinds: the same seed proposes the same trials) and holding
    ``cfg.max_concurrent`` trials at once itself: Tune ignores its own `max_concurrent_trials` for a searcher
    passed as a ready generator, as the random one is. `first`: a point it proposes before drawing (one of the
    ``num_samples``)."""
    points = [first] if first else None
    if cfg.searcher == "random":
        from ray.tune.search import BasicVariantGenerator

        # Tune's default searcher, which is unseeded unless given a random_state
        return BasicVariantGenerator(points_to_evaluate=points, random_state=cfg.seed, max_concurrent=cfg.max_concurrent)
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as e:
        raise ValueError(f"searcher optuna needs the optuna package ({e}); pip install optuna or use --searcher random") from e
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=points, sampler=optuna.samplers.TPESampler(seed=cfg.seed)),
                              max_concurrent=cfg.max_concurrent)


def _first_trial(base: JobConfig, cfg: SweepConfig, space: SearchSpace, progress: Progress) -> dict | None:
    """The job's own settings as the sweep's first trial (``cfg.base_trial``), said in a line; None, with the
    reason, when one of them lies outside the space (the trials are then all drawn)."""
    if not cfg.base_trial or not space.dims:
        return None
    point, outside = space.base_point(base.purify.to_dict())
    if point is None:
        progress(f"[fip tune] every trial is drawn from the space: the job's own settings are not in it ({outside})")
        return None
    drawn = cfg.num_samples - 1
    settings = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in point.items())
    progress(f"[fip tune] trial 1 runs the job's own settings ({settings}); {drawn} more "
             f"{'is' if drawn == 1 else 'are'} drawn from the space")
    return point


def _scheduler(cfg: SweepConfig, space: SearchSpace, base: JobConfig):
    if cfg.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    dim = space.dims.get("iterations")
    longest = max(int(v) for v in dim.values_to_check()) if dim else int(space.fixed.get("iterations",
                                                                                           base.purify.iterations))
    return ASHAScheduler(time_attr="step", max_t=longest, grace_period=min(cfg.grace_steps, longest),
                         reduction_factor=cfg.reduction_factor)


def _check_store(base: JobConfig, cfg: SweepConfig) -> None:
    """The store is checked before D_val is split or Ray starts (the trials' Trackers check it again)."""
    uri = one_store(base).tracking.tracking_uri
    if base.tracking.log_to_mlflow:
        check_store(uri)
    if base.tracking.log_to_mlflow and uri.startswith("sqlite:") and cfg.max_concurrent > 1:
        raise ConfigError(f"max_concurrent {cfg.max_concurrent} with the SQLite store {uri}: SQLite locks under "
                          "concurrent writers; run `mlflow server` and pass its URI, or use max_concurrent 1")


def _check_fits(base: JobConfig, cfg: SweepConfig) -> None:
    """A trial needs its own CPUs plus its workers'; more than the cluster has would wait for ever."""
    import ray

    have = ray.cluster_resources().get("CPU", 0.0)
    need = cfg.trial_cpus + base.resources.workers * base.resources.cpus_per_worker
    if need > have:
        raise ConfigError(f"one trial needs {need:g} CPUs (trial_cpus {cfg.trial_cpus:g} + {base.resources.workers} "
                          f"workers x {base.resources.cpus_per_worker:g}) but the Ray cluster has {have:g}; "
                          "lower --cpus-per-worker or --trial-cpus")


def prepare(base: JobConfig, cfg: SweepConfig, progress: Progress = say) -> tuple[str, str, Holdout]:
    """Check the inputs fit together as every job does (:func:`pipeline.validation.check_inputs`: model vs
    shards, D_val vs test data, the attack record's model), then split D_val (once) and score the suspect on
    the held-out share: (train url, holdout url, holdout)."""
    from pipeline.plan import load_attack_record
    from pipeline.shards import open_shards
    from pipeline.validation import check_inputs
    from tuning.holdout import read_holdout, write_split

    store = Storage(base.storage)
    cache_dir = local_root(base.run.work_dir) / "cache"
    loaded = load_suspect(base, cache_dir)
    task = task_named(loaded.spec.task)
    inputs = base.inputs
    record = load_attack_record(inputs.attack_record, store, cache_dir).record if inputs.attack_record else None
    warnings = check_inputs(loaded, inputs.model, clean=open_shards(inputs.clean, store), clean_url=inputs.clean,
                            test=open_shards(inputs.test, store) if inputs.test else None, test_url=inputs.test or "",
                            record=record, record_url=inputs.attack_record or "")
    for warning in warnings:
        progress(f"[fip tune] {warning}")
    sweep_dir = join(base.run.work_dir, cfg.name)
    train_url, held_url = write_split(inputs.clean, sweep_dir, cfg.holdout_fraction, cfg.seed, store)
    x, y = read_holdout(held_url, store)
    holdout = Holdout.from_suspect(loaded.model, x, y, task)
    probed, found = "", None
    if cfg.weights.uap:  # the suspect's probe, the winner's evidence is read against it (tuning.evidence)
        found = probe(loaded.model, x, y, task)
        holdout.suspect.update(uap_max=found["uap_max"], uap_class=found["uap_class"])
        probed = f", uap_max {found['uap_max']:.2f} to {WORDING[task.name]['to']} {found['uap_class']}"
    holdout.suspect_samples = sample_record(loaded.model, holdout, found).encode()  # for the choice's stability
    acc = "held-out ACC" if task == CLASSIFICATION else "held-out next-token ACC per sequence"
    progress(f"[fip tune] D_val split: {open_count(train_url, store)} to train on, {len(y)} held out "
             f"(suspect: {acc} {100 * holdout.suspect['acc']:.2f} %, Tr(F) {holdout.suspect['trace']:.4g}"
             f"{probed})")
    return train_url, held_url, holdout


def suspect_task(base: JobConfig) -> str:
    """The suspect's task (a fip.tasks name), which picks its default search space (tuning.space.DEFAULT_SPACES)."""
    return load_suspect(base, local_root(base.run.work_dir) / "cache").spec.task


def open_count(url: str, store: Storage) -> int:
    from pipeline.shards import open_shards

    return open_shards(url, store).total


def run_sweep(base: JobConfig, space: SearchSpace, cfg: SweepConfig, progress: Progress = say,
              resume: bool = False) -> SweepResult:
    """Run (or with `resume`, continue) the sweep; returns every trial, the winner and its registry URI."""
    from ray import tune

    from pipeline.ray_runtime import check_local_cpus, ensure_ray

    t0 = time.perf_counter()
    _check_store(base, cfg)
    check_local_cpus(base.resources, cfg.trial_cpus, "trial_cpus")
    if is_s3(base.run.work_dir):
        raise ConfigError("a sweep needs a local run.work_dir (its Tune state lives there); inputs may be on S3")
    # trials run in Tune's own folders: every local path is made absolute here, where the user typed it
    base = one_store(base.replace(run={"work_dir": str(Path(base.run.work_dir).resolve())},
                                  inputs={k: absolute_url(v) for k, v in vars(base.inputs).items()}))
    sweep_dir = Path(base.run.work_dir) / cfg.name
    state_file = sweep_dir / "sweep.json"
    tune_dir = str(sweep_dir / "tune")
    if resume and not state_file.is_file():
        raise ValueError(f"nothing to resume: no sweep {cfg.name!r} in {base.run.work_dir}")
    if not resume and state_file.is_file():
        raise ValueError(f"sweep {cfg.name!r} already exists in {base.run.work_dir}: pass --resume or another --name")
    train_url, _held_url, holdout = prepare(base, cfg, progress)
    # every trial trains on the train share: a batch larger than it is refused before Ray starts, as in plan_job
    check_batch_fits(base.purify.batch_size, open_count(train_url, Storage(base.storage)),
                     f"{train_url} (the trials' share of D_val)")

    tracker = sweep_tracker(base) if base.tracking.log_to_mlflow else None
    parent = None
    if resume:
        parent = json.loads(state_file.read_text()).get("parent_run_id")
    elif tracker is not None:
        parent = tracker.start_run(base.tracking.experiment, f"sweep-{cfg.name}",
                                   {"sweep": {**asdict(cfg), "weights": asdict(cfg.weights)},
                                    "space": space.describe(), **base.to_dict()},
                                   {"sweep": cfg.name, "kind": "sweep"})
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"parent_run_id": parent, "sweep": asdict(cfg), "space": space.describe()},
                                     default=str))

    ctx = TrialContext(base.to_dict(), cfg.name, train_url, str(sweep_dir / "jobs"), holdout, cfg.weights,
                       cfg.report_every, parent, base.inputs.test, base.inputs.attack_record,
                       score_checkpoints=cfg.scheduler != "none")
    ensure_ray(base.resources, dashboard=True)  # ASHA's stopped trials must give their CPUs back
    _check_fits(base, cfg)
    resources = {"cpu": cfg.trial_cpus, **({"gpu": cfg.trial_gpus} if cfg.trial_gpus else {})}
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    live = LiveTable(progress, cfg.weights, interrupt_after=cfg.interrupt_after)
    status = "FINISHED"
    try:
        if resume and tune.Tuner.can_restore(str(Path(tune_dir) / cfg.name)):
            progress(f"[fip tune] resuming sweep {cfg.name} from {tune_dir}")
            tuner = tune.Tuner.restore(str(Path(tune_dir) / cfg.name), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            first = _first_trial(base, cfg, space, progress)
            tuner = tune.Tuner(
                trainable, param_space=space.to_tune(),
                tune_config=tune.TuneConfig(metric="objective", mode="max", num_samples=cfg.num_samples,
                                            search_alg=make_searcher(cfg, first),  # it limits the concurrency
                                            scheduler=_scheduler(cfg, space, base)),
                run_config=tune.RunConfig(name=cfg.name, storage_path=tune_dir, callbacks=[live.callback], verbose=0),
            )
        with tune_output_to(sweep_dir / TUNE_OUTPUT):  # Tune's banners and hints, not the terminal
            grid = tuner.fit()
        ended = grid.num_terminated + grid.num_errors
        if ended < cfg.num_samples:  # Tune returns normally after SIGINT, with its state saved
            raise KeyboardInterrupt(f"sweep {cfg.name} interrupted with {ended} of {cfg.num_samples} trials ended; "
                                    "continue it with --resume")
        return _finish(base, cfg, collect(grid), tracker, parent, sweep_dir, progress, t0, holdout)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if tracker is not None and parent is not None:
            tracker.finish(parent, status)


def collect(grid) -> list[dict]:
    """One row per trial: its settings, last metrics, and whether it finished (DONE), was stopped, failed
    (ERROR, with its root cause) or had its model refused by the acceptance check (REJECTED, with the verdict)."""
    from pipeline.ray_runtime import describe_cause

    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        done = "purified" in m and r.error is None
        status = ("DONE" if done else "REJECTED" if "rejected" in m else "ERROR" if r.error is not None else "STOPPED")
        row = {"trial_id": m.get("trial_id") or Path(r.path).name, "status": status,
               **{f"p.{k}": v for k, v in (r.config or {}).items()}}
        if r.error is not None:
            row["error"] = describe_cause(r.error)
        for k in ("objective", *FEATURES, "uap_class", "step", "acc", "asr", "ra", "false_trigger", "der", "purified",
                  "child_run_id", "seconds",
                  "rejected", *SAMPLE_KEYS):
            if k in m:
                row[k] = m[k]
        rows.append(row)
    return sorted(rows, key=lambda t: t["trial_id"])


def finished(trials: list[dict]) -> list[dict]:
    """The trials that can win: ended DONE with a finite objective."""
    return [t for t in trials if t["status"] == "DONE" and t.get("objective") is not None
            and math.isfinite(t["objective"])]


def choose_winner(trials: list[dict]) -> dict | None:
    """The finished trial with the highest objective (ties: the first by id). DER is never read here."""
    done = finished(trials)
    return max(done, key=lambda t: (t["objective"], [-ord(c) for c in t["trial_id"]])) if done else None


def _finish(base: JobConfig, cfg: SweepConfig, trials: list[dict], tracker: Tracker | None, parent: str | None,
            sweep_dir: Path, progress: Progress, t0: float, holdout: Holdout) -> SweepResult:
    winner = choose_winner(trials)
    columns = ["trial_id", "status", *sorted(k for k in {k for t in trials for k in t} if k.startswith("p.")),
               "step", "objective", *FEATURES]
    benchmark = any("der" in t for t in trials)
    if benchmark:  # a language model's record adds its false-trigger rate on clean prompts
        columns += ["acc", "asr", *(["false_trigger"] if any("false_trigger" in t for t in trials) else []), "der"]
    table = sweep_dir / "sweep-table.md"
    rho = spearman([t["objective"] for t in trials if "der" in t], [t["der"] for t in trials if "der" in t]) \
        if benchmark else None
    text = (f"# Sweep {cfg.name}\n\nWinner (highest objective on held-out D_val): "
            f"{winner['trial_id'] if winner else 'none'}\n\n" + trial_table(trials, columns))
    if rho is not None:
        text += f"\nSpearman(objective, DER) over {sum('der' in t for t in trials)} finished trials: {rho:.3f}\n"
    table.write_text(text)
    (sweep_dir / "sweep-table.json").write_text(json.dumps({"trials": trials, "winner": winner}, indent=1, default=str))
    plot = plot_objective_vs_der(trials, sweep_dir / "objective-vs-der.png", winner["trial_id"] if winner else None)
    model_uri = None
    if tracker is not None and parent is not None:
        tracker.log_artifact(parent, table)
        tracker.log_artifact(parent, sweep_dir / "sweep-table.json")
        if plot is not None:
            tracker.log_artifact(parent, plot)
        if winner:
            tracker.log_metrics(parent, {"best_objective": winner["objective"],
                                         **({"best_der": winner["der"]} if "der" in winner else {}),
                                         **({"spearman_objective_der": rho} if rho is not None and math.isfinite(rho)
                                            else {})})
            tracker.set_tags(parent, {"winner_trial": winner["trial_id"], "winner_run_id": winner.get("child_run_id", "")})
    if winner is None:
        failed = [t for t in trials if t["status"] == "ERROR"]
        rejected = [t for t in trials if t["status"] == "REJECTED"]  # by the acceptance check (pipeline.acceptance)
        first = (failed + rejected)[:1]
        raise NoTrialFinished(f"sweep {cfg.name}: none of its {len(trials)} trials finished ({len(failed)} failed"
                              + (f", {len(rejected)} rejected" if rejected else "")
                              + (f"; trial {first[0]['trial_id']}: {first[0].get('error') or first[0].get('rejected')}"
                                 if first else "")
                              + f"); the table is in {table}")
    kept = _choice_kept(trials, winner, holdout, cfg)
    evidence = winner_evidence(winner, holdout.suspect, holdout.samples, task=holdout.task.name, choice_kept=kept,
                               resamples=RESAMPLES)
    if tracker is not None and parent is not None:
        tracker.set_tags(parent, evidence.tags())
    refit = _refit_winner(base, cfg, winner, parent, sweep_dir, progress) if cfg.refit else None
    if tracker is not None and parent is not None:
        if cfg.register_as and (refit is not None or winner.get("child_run_id")):
            model_uri = _register_winner(tracker, base, cfg, winner, parent, progress, evidence, refit)
    finished = sum(t["status"] == "DONE" for t in trials)
    progress(f"[fip tune] winner {winner['trial_id']} ({finished} of {len(trials)} trials finished): objective "
             f"{winner['objective']:.4f}" + (f", DER {winner['der']:.3f}" if "der" in winner else "")
             + (f" -> {model_uri}" if model_uri else ""))
    for line in evidence.lines():
        progress(f"[fip tune]   {line}")
    return SweepResult(trials, winner, parent, model_uri, table, plot, time.perf_counter() - t0,
                       refit.run_id if refit is not None else None, evidence)


def _choice_kept(trials: list[dict], winner: dict, holdout: Holdout, cfg: SweepConfig) -> float | None:
    """The share of resamples of the held-out samples in which the winner scores highest among the finished
    trials (:mod:`tuning.stability`); None when a finished trial has no per-sample record (a sweep resumed
    from before they were kept) or the suspect has none."""
    done = finished(trials)
    if not holdout.suspect_samples or not all(k in t for t in done for k in SAMPLE_KEYS):
        return None
    shares = choice_stability([SampleRecord.decode(t) for t in done], done, SampleRecord.decode(holdout.suspect_samples),
                              holdout.suspect, cfg.weights, seed=cfg.seed)
    return shares[done.index(winner)]


def _refit_winner(base: JobConfig, cfg: SweepConfig, winner: dict, parent: str | None, sweep_dir: Path,
                  progress: Progress):
    """The winner's settings (and seed) re-run on all of D_val, as one more job nested under the sweep.

    The held-out share is needed only to choose, but no objective scores the re-run: over the lab's 8
    attacks it raised the chosen settings' mean DER in Round 1 (0.857 -> 0.895) and lowered it in Round 2
    (0.914 -> 0.864), so it runs only when asked for (docs/tuning.md)."""
    from pipeline.driver import run_job

    params = plain({k[2:]: v for k, v in winner.items() if k.startswith("p.")})
    progress(f"[fip tune] refit: trial {winner['trial_id']}'s settings on all of D_val")
    job = base.replace(purify=params,
                       run={"work_dir": str(sweep_dir / "jobs"), "run_name": f"{cfg.name}-refit"},
                       tracking={"register_as": None})
    return run_job(job, parent_run_id=parent)


def _register_winner(tracker: Tracker, base: JobConfig, cfg: SweepConfig, winner: dict, parent: str,
                     progress: Progress, evidence: Evidence, refit=None) -> str:
    """Register the refit model from its own run (or, without a refit, the winner's purified file from the
    trial's child run), tagged with the sweep, the trial, the trial's objective and its evidence; a winner the
    probe flags gets a version but not ``@candidate``."""
    from pipeline.acceptance import judge_purified, rejection
    from pipeline.registry import register_purified, registry_tags, tokenizer_for
    from pipeline.shards import open_shards
    from pipeline.suspect import load_purified

    path = Path(refit.purified_path if refit is not None else winner["purified"])
    run_id = refit.run_id if refit is not None else winner["child_run_id"]
    loaded = load_purified(path)
    suspect = load_suspect(base, local_root(base.run.work_dir) / "cache")
    # the same acceptance check as every job's (pipeline.acceptance), on all of D_val, before any alias moves
    history = path.parent / HISTORY
    clean = open_shards(base.inputs.clean, Storage(base.storage))
    verdict = judge_purified(suspect, loaded, clean,
                             base.acceptance, json.loads(history.read_text())["history"] if history.is_file() else (),
                             base.run.skip_corrupt)
    tracker.set_tags(parent, verdict.tags())
    if not verdict.passed:
        tracker.set_tags(run_id, verdict.tags())
        raise rejection(verdict)
    # the refit job measured its model before and after; a trial's row holds the purified model's test figures
    measured = refit.measured if refit is not None else \
        Measured(after={k: winner.get(k) for k in ("acc", "asr", "ra")})
    # the suspect's hash, as the purify stage wrote it into the file (the candidate rule compares by source)
    tags = registry_tags(loaded.metadata.get("source_sha256") or suspect.sha256,
                         winner.get("p.method", base.purify.method), measured,
                         sweep_run_id=parent, sweep=cfg.name, trial_id=winner["trial_id"],
                         objective=f"{winner['objective']:.6f}", refit="all of D_val" if refit is not None else "no",
                         **evidence.tags())
    # the house rule for @candidate (docs/registry.md): it moves when the objective beats the holder's, and
    # never to a model the probe flags
    reg = register_purified(tracker, run_id, loaded, path, cfg.register_as, tags, progress, "[fip tune]",
                            tokenizer=tokenizer_for(loaded, clean, Storage(base.storage), path.parent),
                            hold_candidate=evidence.verdict() if evidence.flagged else None)
    tracker.set_tags(parent, {"registered": f"{reg.name}/{reg.version}", "candidate_moved": reg.candidate})
    return reg.model_uri


def sweep_summary(result: SweepResult) -> dict:
    w = result.winner or {}
    return {"winner": w.get("trial_id"), "objective": w.get("objective"), "der": w.get("der"),
            "model_uri": result.model_uri, "parent_run_id": result.parent_run_id, "trials": len(result.trials),
            "finished": sum(t["status"] == "DONE" for t in result.trials), "table": str(result.table_path),
            "refit_run_id": result.refit_run_id, "seconds": result.seconds,
            **({"flagged": result.evidence.flagged, "verdict": result.evidence.verdict(),
                "choice_kept": result.evidence.choice_kept} if result.evidence else {})}

