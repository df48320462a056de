"""`fip submit` and `fip jobs ...`: run fip commands as Ray jobs on a cluster and follow them.

The jobs address is the Ray dashboard (``http://HEAD:8265``): ``--address``, else RAY_ADDRESS when it
is an http(s) URL, else http://127.0.0.1:8265 (the local stand-in, ``make cluster-up``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

SUBMIT_USAGE = """fip submit [submit options] purify [fip purify flags] [--address URL] [--follow]
       fip submit [submit options] tune [fip tune args]
       fip submit [submit options] bench NAME [args]
       fip submit [submit options] -- FIP COMMAND LINE"""

SUBMIT_DESCRIPTION = """Run a fip command as a Ray job on a cluster, through Ray's jobs API.

purify   the job config is built here exactly as `fip purify` builds it (--preset < --config < flags,
         MLFLOW_TRACKING_URI) and travels with the job as job.yaml; the entrypoint is
         `fip purify --config job.yaml`. The job connects to the cluster it runs on.
tune     `fip tune` with the given args (its --config/--space-file files travel with the job)
bench    `python -m benchmarks.NAME` with the given args
--       any other fip command line, run as given

The code goes with the job as its working_dir (this checkout without .venv, runs, .cache, .git and
what .gitignore lists). Credentials never do: the cluster holds its own (docs/cluster.md).
Submit options go before the command word; `purify` also takes them after."""


def default_address() -> str:
    """--address's default, read here at the CLI edge: RAY_ADDRESS when it is the dashboard's URL."""
    env = os.environ.get("RAY_ADDRESS", "")
    return env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS


def _address_flag(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    p.add_argument("--address", dest="jobs_address", metavar="URL",
                   default=argparse.SUPPRESS if suppress else None,
                   help=f"Ray dashboard / jobs API (default: RAY_ADDRESS if http(s), else {DEFAULT_ADDRESS})")


def _submit_flags(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    _address_flag(p, suppress)
    p.add_argument("--follow", action="store_true", default=d(False),
                   help="stream the job's logs until it ends; exit 0 only if it succeeded")
    p.add_argument("--pip", action="append", default=d([]), metavar="REQ",
                   help="a pip requirement installed for the job (runtime_env pip); repeatable")
    p.add_argument("--pip-file", default=d(None), metavar="FILE", help="pip requirements file for the job")
    p.add_argument("--working-dir", default=d(None), metavar="DIR",
                   help="the code to upload (default: this checkout)")
    p.add_argument("--submission-id", default=d(None), metavar="ID", help="the job's id (default: fip-KIND-TIME-HEX)")


def register(sub) -> None:
    p = sub.add_parser("submit", help="run fip purify / tune / a benchmark / any fip command as a Ray job on a cluster",
                       usage=SUBMIT_USAGE, description=SUBMIT_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _submit_flags(p)
    p.add_argument("--debug", action="store_true")
    p.add_argument("target", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(handler=run_submit)

    p = sub.add_parser("jobs", help="list Ray jobs on a cluster, show one's status or logs, stop one")
    _address_flag(p)
    jsub = p.add_subparsers(dest="jobs_command", required=True)
    q = jsub.add_parser("list", help="every job the cluster knows, oldest first")
    _address_flag(q, suppress=True)
    q.set_defaults(handler=run_jobs_list)
    q = jsub.add_parser("status", help="a job's status and message")
    _address_flag(q, suppress=True)
    q.add_argument("job_id")
    q.set_defaults(handler=run_jobs_status)
    q = jsub.add_parser("logs", help="a job's logs so far (--follow: until it ends)")
    _address_flag(q, suppress=True)
    q.add_argument("job_id")
    q.add_argument("--follow", action="store_true")
    q.set_defaults(handler=run_jobs_logs)
    q = jsub.add_parser("stop", help="stop a running job and wait until it has ended")
    _address_flag(q, suppress=True)
    q.add_argument("job_id")
    q.set_defaults(handler=run_jobs_stop)
    p.add_argument("--debug", action="store_true")


def purify_submit_parser() -> argparse.ArgumentParser:
    """`fip purify`'s flags (from the config dataclasses) plus the submit options; --address is the
    jobs API here, the job itself always joins the cluster it runs on."""
    from fipcli.config_flags import add_config_flags
    from fipcli.pipeline_cmds import _sections
    from pipeline.config import preset_names

    p = argparse.ArgumentParser(prog="fip submit purify",
                                description="Submit `fip purify` as a Ray job; settings are layered as for "
                                            "`fip purify`: defaults < --preset < --config files < flags.")
    p.add_argument("--preset", default=None, choices=preset_names())
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML with config sections, read here; repeatable")
    p.add_argument("--print-config", action="store_true", help="print the job.yaml that would be sent and exit")
    g = p.add_argument_group("submit")
    _submit_flags(g, suppress=True)
    add_config_flags(p, _sections(), skip={"resources.address"})
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return p


def _jobs(args):
    from cluster.submit import Jobs

    quiet_ray_client()
    return Jobs(getattr(args, "jobs_address", None) or default_address())


def quiet_ray_client() -> None:
    """The terminal shows the job's id, its URL and its logs: Ray's client-side notes on packaging the
    working dir (which folders it skipped, the upload) are for Ray's debugging, not for the user."""
    import logging

    for name in ("ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir",
                 "ray.dashboard.modules.dashboard_sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _check_fip_command(argv: list[str], fip_parser: argparse.ArgumentParser) -> None:
    """Parse `argv` with the `fip` parser itself (`fip_parser`, which fipcli.main hands to every command):
    a job that cannot start is refused here, in one line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            fip_parser.parse_args(argv)
    except SystemExit as e:
        if e.code:
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
            raise ValueError(f"not a valid fip command line: {lines[-1] if lines else ' '.join(argv)}") from None


def _submission(args):
    from cluster.submit import command_submission, purify_submission, read_requirements, repo_root

    target = list(args.target)
    if target[:1] == ["--"]:
        target = target[1:]
    if target[:1] == ["fip"]:
        target = target[1:]
    if not target:
        raise ValueError("nothing to submit: give purify FLAGS, tune ARGS, bench NAME ARGS or -- FIP COMMAND LINE")
    if target[0] == "purify":
        from fipcli.pipeline_cmds import job_config_from_args

        args = purify_submit_parser().parse_args(target[1:], namespace=args)
    working_dir = Path(args.working_dir).resolve() if args.working_dir else repo_root()
    pip = list(args.pip) + (read_requirements(args.pip_file) if args.pip_file else [])
    if target[0] == "purify":
        sub, cfg = purify_submission(job_config_from_args(args), working_dir, pip, args.submission_id)
        return args, sub, cfg
    if target[0] == "bench":
        if len(target) < 2:
            raise ValueError("fip submit bench needs a benchmark NAME (a module of benchmarks/)")
        return args, command_submission(target[1:], working_dir, kind="bench", pip=pip,
                                        submission_id=args.submission_id), None
    _check_fip_command(target, args.fip_parser)
    kind = "tune" if target[0] == "tune" else "fip"
    return args, command_submission(target, working_dir, kind=kind, pip=pip, submission_id=args.submission_id,
                                    tracking_uri=os.environ.get("MLFLOW_TRACKING_URI")), None


def run_submit(args) -> int:
    from cluster.submit import dashboard_url

    args, sub, cfg = _submission(args)
    if getattr(args, "print_config", False):
        print(sub.files["job.yaml"], end="")
        return 0
    jobs = _jobs(args)
    job_id = jobs.submit(sub)
    print(f"submitted {job_id}: {sub.entrypoint}")
    print(f"dashboard {dashboard_url(jobs.address, job_id)}")
    if cfg is not None and cfg.tracking.log_to_mlflow:
        print(f"mlflow    {cfg.tracking.tracking_uri} (experiment {cfg.tracking.experiment}, run {cfg.run.run_name})")
    if not args.follow:
        print(f"follow    fip jobs --address {jobs.address} logs {job_id} --follow")
        return 0
    return _follow(jobs, job_id)


def _follow(jobs, job_id: str) -> int:
    try:
        status = jobs.follow(job_id, lambda chunk: print(chunk, end="", flush=True))
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (fip jobs --address {jobs.address} stop {job_id})",
              file=sys.stderr)
        return 130
    info = jobs.info(job_id)
    print(f"{job_id} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""))
    return 0 if status == "SUCCEEDED" else 1


def run_jobs_list(args) -> int:
    import datetime

    rows = _jobs(args).list()
    if not rows:
        print("no jobs")
    for j in rows:
        started = datetime.datetime.fromtimestamp(j.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") \
            if j.start_time else "-"
        entry = j.entrypoint if len(j.entrypoint) <= 70 else j.entrypoint[:67] + "..."
        print(f"{j.submission_id or j.job_id}  {j.status.value:<9}  {started}  {entry}")
    return 0


def run_jobs_status(args) -> int:
    info = _jobs(args).info(args.job_id)
    line = f"{args.job_id} {info.status.value}"
    if info.start_time and info.end_time:
        line += f" ({(info.end_time - info.start_time) / 1000:.1f} s)"
    print(line + (f": {info.message}" if info.message else ""))
    return 0


def run_jobs_logs(args) -> int:
    jobs = _jobs(args)
    if args.follow:
        return _follow(jobs, args.job_id)
    print(jobs.logs(args.job_id), end="")
    return 0


def run_jobs_stop(args) -> int:
    jobs = _jobs(args)
    before = jobs.status(args.job_id)
    status = jobs.stop(args.job_id)
    if before in ("SUCCEEDED", "FAILED", "STOPPED"):
        print(f"{args.job_id} had already ended: {status}")
        return 0
    print(f"{args.job_id} {status}" + ("" if status == "STOPPED" else " (stop requested; it has not ended yet)"))
    return 0 if status == "STOPPED" else 1
