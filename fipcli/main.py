"""The `fip` command: one entry point, a sub-command per job. Heavy imports happen inside handlers."""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"fip {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
