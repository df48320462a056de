"""The `fip` command: one entry point, a sub-command per job. Heavy imports happen inside handlers."""

from __future__ import annotations

import argparse
import sys

from fipcli import lab_cmds, method_cmds

COMMAND_MODULES = [lab_cmds, method_cmds]


def _optional_modules():
    """Commands from the pipeline/tuning/cluster layers, registered when those layers are present."""
    import importlib

    mods = []
    for name in ("fipcli.pipeline_cmds", "fipcli.tuning_cmds", "fipcli.cluster_cmds"):
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fip",
        description="Fisher Information guided Purification of backdoored models (FIP, ACM CCS 2024).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in COMMAND_MODULES + _optional_modules():
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
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"fip {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
