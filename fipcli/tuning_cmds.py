"""`fip tune`: a Ray Tune sweep of FIP settings, the winner chosen on held-out D_val and registered."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    from fipcli.config_flags import add_config_flags
    from fipcli.pipeline_cmds import _sections
    from pipeline.config import preset_names

    p = sub.add_parser(
        "tune", help="sweep FIP's settings with Ray Tune; the winner (best objective on held-out D_val) is registered",
        description="The base job is configured exactly as for `fip purify` (--preset < --config < flags); the search "
                    "space comes from --space-file and/or --space flags (default: the suspect's task's, tuning.space.DEFAULT_SPACES). "
                    "Each trial is one pipeline job (Ray Train inside the Tune trial) with a nested MLflow run. "
                    "Test shards and an attack record, when given, are measured per trial for the table only. "
                    "With --max-concurrent > 1 use an MLflow server (--tracking-uri http://...), not SQLite.",
    )
    p.add_argument("--preset", default=None, choices=preset_names())
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML with job config sections")
    g = p.add_argument_group("sweep")
    # every default below is tuning.sweep.SweepConfig's (None here: the flag was not given)
    g.add_argument("--name", default=None, help="the sweep's folder under run.work_dir, and its Tune experiment")
    g.add_argument("--space-file", default=None, metavar="YAML", help="search space (see tuning/space.py)")
    g.add_argument("--space", action="append", default=[], metavar="NAME=KIND:A:B",
                   help="one setting's distribution on top of the space: eta_f=loguniform:1e-5:1e-3, "
                        "method=choice:fip,fast-fip, lr=0.01 (fixed); repeatable")
    g.add_argument("--num-samples", type=int, default=None, help="trials (default 8)")
    g.add_argument("--base-trial", action=argparse.BooleanOptionalAction, default=None,
                   help="run the job's own settings (preset, config, flags) as the first trial when they lie inside "
                        "the space (default: off, every trial is drawn)")
    g.add_argument("--max-concurrent", type=int, default=None, help="trials at once")
    g.add_argument("--searcher", default=None, choices=["optuna", "random"])
    g.add_argument("--scheduler", default=None, choices=["asha", "none"],
                   help="none (default): every trial runs to the end; asha: stop trials early on the objective of "
                        "their intermediate checkpoints (pays on long runs only: docs/tuning.md)")
    g.add_argument("--grace-steps", type=int, default=None, help="ASHA: purify steps before a trial may be stopped")
    g.add_argument("--report-every", type=int, default=None,
                   help="purify steps between a trial's checkpoints; under ASHA each is scored, the probe included")
    g.add_argument("--trial-cpus", type=float, default=None, help="CPUs of the trial itself (workers ask for their own)")
    g.add_argument("--trial-gpus", type=float, default=None)
    g.add_argument("--objective-weight", action="append", default=[], metavar="NAME=VALUE",
                   help="change one weight of the defender's objective (tuning.objective.ObjectiveWeights; "
                        "e.g. uap=0 drops the universal-perturbation probe: docs/tuning.md)")
    g.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="re-run the winner's settings on all of D_val and register that model, which no objective "
                        "has scored (default: off; docs/tuning.md, Round 2)")
    g.add_argument("--holdout-fraction", type=float, default=None, help="share of D_val held out for the objective")
    g.add_argument("--sweep-seed", type=int, default=None, help="seeds the D_val split and the searcher")
    g.add_argument("--register-sweep-as", default=None,
                   help="registry name for the winner (default fip-purified; 'none': skip)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted sweep --name (Tuner.restore)")
    g.add_argument("--print-space", action="store_true", help="print the resolved search space as YAML and exit")
    add_config_flags(p, _sections())
    p.add_argument("--debug", action="store_true")
    p.set_defaults(handler=run_tune)


def sweep_from_args(args, task: str = "classification"):
    """The search space (the `task`'s default or a file < the job's purify flags < --space flags), the sweep's
    settings, and a line for each searched setting a job flag pinned."""
    from fipcli.config_flags import config_overrides
    from fipcli.pipeline_cmds import _sections
    from tuning.objective import ObjectiveWeights
    from tuning.space import SearchSpace
    from tuning.sweep import SweepConfig

    space = SearchSpace.from_yaml(args.space_file) if args.space_file else SearchSpace.default(task)
    space, pinned = space.under_flags(config_overrides(args, _sections()).get("purify", {}))
    if args.space:
        space = space.with_flags(args.space)
    given = {"name": args.name, "num_samples": args.num_samples, "max_concurrent": args.max_concurrent,
             "searcher": args.searcher, "scheduler": args.scheduler, "grace_steps": args.grace_steps,
             "report_every": args.report_every, "trial_cpus": args.trial_cpus, "trial_gpus": args.trial_gpus,
             "holdout_fraction": args.holdout_fraction, "seed": args.sweep_seed, "refit": args.refit,
             "base_trial": args.base_trial}
    if args.register_sweep_as is not None:
        given["register_as"] = None if args.register_sweep_as.strip().lower() in ("none", "") else args.register_sweep_as
    cfg = SweepConfig(**{k: v for k, v in given.items() if v is not None},
                      weights=ObjectiveWeights().with_flags(args.objective_weight))
    return space, cfg, pinned


def run_tune(args: argparse.Namespace) -> int:
    from fipcli.pipeline_cmds import job_config_from_args
    from tuning.sweep import run_sweep, suspect_task, sweep_summary

    sweep_from_args(args)  # every sweep flag is checked, in one line, before the model is read
    base = job_config_from_args(args)
    # the default space is the suspect's task's (reading the model costs a second); a file's space needs none
    task = suspect_task(base) if base.inputs.model and not args.space_file else "classification"
    space, sweep, pinned = sweep_from_args(args, task)
    for line in pinned:
        print(f"fip tune: {line}", file=sys.stderr)
    if args.print_space:
        import yaml

        print(yaml.safe_dump(space.describe(), sort_keys=False), end="")
        return 0
    result = run_sweep(base, space, sweep, resume=args.resume)
    print(json.dumps(sweep_summary(result), default=str), flush=True)
    return 0
