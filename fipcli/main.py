"""The `fip` command: one entry point, a sub-command per job. Heavy imports happen inside handlers."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fipcli import cluster_cmds, lab_cmds, method_cmds, pipeline_cmds, tuning_cmds

COMMAND_MODULES = (lab_cmds, method_cmds, pipeline_cmds, tuning_cmds, cluster_cmds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fip",
        description="Fisher Information guided Purification of backdoored models (FIP, ACM CCS 2024).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in COMMAND_MODULES:
        mod.register(sub)
    # `fip submit` checks a job's command line with this whole parser: handed over here, so that no command
    # module imports this one (which imports them all)
    parser.set_defaults(fip_parser=parser)
    return parser


def quiet_frameworks() -> None:
    """The terminal shows our progress and real warnings: MLflow's INFO chatter (store migrations)
    is not for the user; Ray's own logs go to Ray's log folder (pipeline.ray_runtime.ensure_ray)."""
    # MLflow sets its own top logger's level when imported, so quiet the chatty module itself
    for name in ("mlflow", "mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Stopped(KeyboardInterrupt):
    """SIGTERM (`kill`, `fip jobs stop`, a scheduler's stop), raised where the command is, so that a job
    unwinds as it does on Ctrl-C: its MLflow run is marked KILLED and nothing is left half-registered."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`Stopped` and SIGINT raises KeyboardInterrupt (Python's
    own handler, in case a library replaced it); both handlers are put back afterwards. Only the CLI
    installs them: library code never touches signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame) -> None:
        raise Stopped(signum)

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    quiet_frameworks()
    parser = build_parser()
    args = parser.parse_args(argv)
    ray_before = ray_is_up()
    try:
        with stop_signals_interrupt():
            return int(args.handler(args) or 0)
    except KeyboardInterrupt as e:
        # one line, and the shell's code for death by that signal (130 for SIGINT, 143 for SIGTERM)
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        end_ray_before_last_line(ray_before)
        print(f"fip {args.command}: {'stopped' if isinstance(e, Stopped) else 'interrupted'} "
              f"({signal.Signals(signum).name}){interrupt_note(e)}", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        if getattr(args, "debug", False) or not user_facing(e):
            raise
        end_ray_before_last_line(ray_before)
        print(f"fip {args.command}: error: {e}", file=sys.stderr)
        return 2


def ray_is_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def end_ray_before_last_line(ray_was_up: bool) -> None:
    """Shut down the Ray the command started, if any, before the line saying how the command ended: at
    exit, Ray's core prints the calls it cancels (``actor_task_submitter.cc ... RpcError ... CANCELLED``),
    which would otherwise come after that line. A Ray that was up before the command (a caller calling
    `main` in its own process, `ray_was_up`) is the caller's, and is left alone."""
    if not ray_was_up and ray_is_up():
        try:
            sys.modules["ray"].shutdown()
        except Exception:  # noqa: BLE001 - the command's own outcome is what the user must see
            pass


def interrupt_note(error: BaseException) -> str:
    """What the interrupted command left, when it says so (pipeline.driver.run_job notes the MLflow run)."""
    notes = getattr(error, "__notes__", None) or []
    return "; " + "; ".join(notes) if notes else ""


def user_facing(error: BaseException) -> bool:
    """Errors that name a bad input or a failed stage: one line for the user (--debug shows the traceback)."""
    if isinstance(error, ValueError | OSError | FloatingPointError):
        return True
    return any(cls.__name__ == "StageError" for cls in type(error).__mro__)


if __name__ == "__main__":
    sys.exit(main())
