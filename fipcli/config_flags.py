"""Command-line flags generated from the job config's dataclasses: one flag per setting, typed, with
its choices and default in the help, so the dataclasses stay the single source of truth.

Flags are the top layer of :func:`pipeline.config.load_job_config` (defaults < ``--preset`` <
``--config`` files < flags); a flag left out changes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Literal

NONE_WORDS = ("none", "null", "")


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_mapping(text: str) -> dict:
    """A JSON object (``'{"patch_size": 4}'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"expected a JSON object, got {text!r} ({e.msg})") from e
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


def _parser_for(hint) -> tuple[typing.Callable[[str], object], list | None, bool]:
    """(parse function, choices, accepts none) for a field's type."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if typing.get_origin(hint) is Literal:
        return str, list(typing.get_args(hint)), optional
    parse = {bool: _parse_bool, int: int, float: float, str: str, dict: _parse_mapping}.get(hint)
    if parse is None:
        raise TypeError(f"no flag parser for settings of type {hint}")
    return parse, None, optional


def _typed(parse, optional: bool, name: str):
    def convert(text: str):
        if optional and text.strip().lower() in NONE_WORDS:
            return None
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"--{name}: {e}") from e

    convert.__name__ = getattr(parse, "__name__", "value").removeprefix("_parse_")
    return convert


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, sections: dict[str, type],
                     skip: typing.Iterable[str] = ()) -> None:
    """One flag per field of each section's dataclass, in a group per section; names must be unique."""
    seen: dict[str, str] = {}
    skip = set(skip)
    for section, cls in sections.items():
        group = parser.add_argument_group(f"{section} settings ({cls.__name__})")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f"{section}.{f.name}" in skip:
                continue
            if f.name in seen:
                raise ValueError(f"flag {flag_name(f.name)} would set both {seen[f.name]}.{f.name} and {section}.{f.name}")
            seen[f.name] = section
            parse, choices, optional = _parser_for(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else None
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            help_text = "required (here, in --config or a preset)" if required else f"default: {default}"
            if optional:
                help_text += "; 'none' to unset"
            group.add_argument(flag_name(f.name), dest=f"{section}.{f.name}", type=_typed(parse, optional, f.name),
                               choices=choices, default=argparse.SUPPRESS, help=help_text,
                               metavar="BOOL" if hints[f.name] is bool else (None if choices else f.name.upper()))


def config_overrides(args: argparse.Namespace, sections: dict[str, type]) -> dict:
    """The flags that were given, as nested sections (flags left out are absent; ``none`` is None)."""
    out: dict[str, dict] = {}
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if name and section in sections:
            out.setdefault(section, {})[name] = value
    return out
