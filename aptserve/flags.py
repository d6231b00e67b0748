"""Flags declared once, as fields of a frozen dataclass: the same table gives the CLI options (`--kebab-case`,
with help and choices) and the keyword arguments of the Python API."""
from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable
from typing import TypeVar

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
T = TypeVar("T")


def parse_bytes(text: str | int) -> int:
    """'1073741824', '512M', '1G', '1.5GiB' -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgKMG]?)(i?[bB])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (use e.g. 1073741824, 512M or 1G)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def flag(default, help: str, parse: Callable | None = None, choices=None, action: str | None = None,
         nargs: str | None = None):
    """A dataclass field that is also a CLI option (`parse` turns the option's text into the value;
    action="store_true" for a switch; nargs="+" for a list, kept as a tuple)."""
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse, "choices": choices,
                                                        "action": action, "nargs": nargs})


def check_positive(values: dict[str, int | None]) -> None:
    """ValueError naming the first flag below 1 (None: not given, allowed)."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def add_cli_args(cls: type, parser: argparse.ArgumentParser, title: str) -> None:
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(cls):
        meta = field.metadata
        option = "--" + field.name.replace("_", "-")
        if meta["action"] == "store_true":
            group.add_argument(option, dest=field.name, action=meta["action"], help=meta["help"])
        elif meta["action"]:  # e.g. argparse.BooleanOptionalAction: --flag and --no-flag
            group.add_argument(option, dest=field.name, action=meta["action"], default=field.default,
                               help=meta["help"])
        else:
            group.add_argument(option, dest=field.name, default=field.default, type=meta["parse"],
                               choices=meta["choices"], nargs=meta["nargs"], help=meta["help"])


def from_cli_args(cls: type[T], args: argparse.Namespace) -> T:
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)}
    return cls(**{name: tuple(value) if isinstance(value, list) else value for name, value in values.items()})


class FlagTable:
    """Mixin of a flag dataclass: its CLI options under `cli_group`, and back from parsed options."""

    cli_group = "options"

    @classmethod
    def field_names(cls) -> list[str]:
        return [field.name for field in dataclasses.fields(cls)]

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        add_cli_args(cls, parser, cls.cli_group)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace):
        return from_cli_args(cls, args)
