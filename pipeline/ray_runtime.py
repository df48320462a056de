"""The job's local Ray, and one stage on it: connecting or starting Ray (start-ups take turns through a
machine-wide lock; the caller's SIGTERM handler survives ``ray.init``), refusing what a local Ray cannot
place, and :func:`fit_stage`, which runs a stage's function on Ray Train workers off the main thread (so
Ctrl-C stays the caller's) and returns its typed output. A failure inside Ray's wrappers comes out as one
line (:class:`StageError`, :func:`describe_cause`).

The driver (:mod:`pipeline.driver`) and the sweep (:mod:`tuning.sweep`) use it; nothing here reads the
job's config beyond :class:`~pipeline.config.Resources` and :class:`~pipeline.config.RunSettings`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from pipeline.artifacts import METRICS, StageOutput, decode_output
from pipeline.config import Resources, RunSettings
from pipeline.stages import StageContext
from pipeline.validation import JobError

StageFn = Callable[[dict], dict]
T = TypeVar("T")


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
        with _callers_sigterm_handler_kept(), _without_token_notice():
            if resources.address:
                ray.init(address=resources.address, **quiet)
            else:
                _start_local_ray(resources, {**quiet, "include_dashboard": dashboard})
    if not resources.address:
        check_local_resources(resources)


class _DropTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


@contextmanager
def _without_token_notice():
    """Ray 2.60 tells every ``ray.init`` that token authentication is on (the safe default, once a token exists
    in ~/.ray): framework chatter on every command, so it stays off the terminal while Ray starts. Its warning
    that authentication is *off* is left alone."""
    token_logger, notice = logging.getLogger(RAY_TOKEN_LOGGER), _DropTokenNotice()
    token_logger.addFilter(notice)
    try:
        yield
    finally:
        token_logger.removeFilter(notice)


RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"

# Ray Train settings for a Ray that fip starts on this machine: no PreemptionWatcher, an actor (one more Python
# process importing Ray, per stage) that watches for cloud nodes being taken away, which one machine never sees.
# A cluster given by --address keeps Ray's defaults.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

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
                ray.init(num_cpus=cpus, object_store_memory=256 * 1024**2,
                         runtime_env={"working_dir": empty, "env_vars": LOCAL_RAY_ENV}, **options)
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
              storage_path: str, callbacks: list | None = None) -> tuple[StageOutput, dict[str, bytes]]:
    """Run one stage on `resources.workers` Ray Train workers (`Resources.collective_backend`) and return the
    output and the other files of its last checkpoint; a dead worker is replaced up to `run.max_failures` times."""
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
    return decode_output(files.pop(METRICS)), files


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
