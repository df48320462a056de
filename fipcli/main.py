"""The `fip` command: one entry point, a sub-command per job. Heavy imports happen inside handlers."""

from __future__ import annotations

import argparse
import logging
import sys

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
    return parser


def quiet_frameworks() -> None:
    """The terminal shows our progress and real warnings: MLflow's INFO chatter (store migrations)
    is not for the user; Ray's own logs go to Ray's log folder (pipeline.driver.ensure_ray)."""
    # MLflow sets its own top logger's level when imported, so quiet the chatty module itself
    for name in ("mlflow", "mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    quiet_frameworks()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False) or not user_facing(e):
            raise
        print(f"fip {args.command}: error: {e}", file=sys.stderr)
        return 2


def user_facing(error: BaseException) -> bool:
    """Errors that name a bad input or a failed stage: one line for the user (--debug shows the traceback)."""
    if isinstance(error, ValueError | OSError | FloatingPointError):
        return True
    return any(cls.__name__ == "StageError" for cls in type(error).__mro__)


if __name__ == "__main__":
    sys.exit(main())
