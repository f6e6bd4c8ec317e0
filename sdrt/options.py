"""Settings declared once as dataclass fields, and the command-line flags derived from them.

A field made with ``option(default, help, ...)`` carries its help and flag names; ``add_arguments``
adds one flag per such field to an argparse parser (a flag left out keeps the dataclass's
default) and ``from_arguments`` builds the dataclass back from the parsed flags. Used for
``sdrt.GenerationParams`` (``sdrt generate``), ``ServerConfig`` and ``Scaling`` (``sdrt serve``).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing


def option(default, help: str, *, flags: tuple[str, ...] | None = None, cli: bool = True,
           choices: tuple | None = None, metavar: str | None = None, **metadata):
    """A dataclass field with its one-line help and CLI flags (default ``--field-name``;
    ``cli=False``: no flag). Extra keyword arguments are kept in the field's metadata."""
    meta = dict(help=help, flags=flags, cli=cli, choices=choices, metavar=metavar, **metadata)
    return dataclasses.field(default=default, metadata=meta)


def declared(cls) -> tuple[dataclasses.Field, ...]:
    """The fields of ``cls`` made with ``option``."""
    return tuple(f for f in dataclasses.fields(cls) if "help" in f.metadata)


def scalar_type(cls, f: dataclasses.Field):
    """bool, int, float or str: the type of one value of a field (None for anything else)."""
    hint = typing.get_type_hints(cls)[f.name]
    for arg in (typing.get_args(hint) or (hint,)):
        if arg in (bool, int, float, str):
            return arg
    return None


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` in pixels, for a flag."""
    w, sep, h = str(text).lower().partition("x")
    if not sep or not w.strip().isdigit() or not h.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 512x768, got {text!r}")
    return int(w), int(h)


def add_arguments(parser: argparse.ArgumentParser, cls, defaults: dict | None = None) -> None:
    """One flag per ``option`` field of ``cls``; ``defaults``: how the command describes the
    defaults it sets itself."""
    for f in declared(cls):
        m = f.metadata
        if not m["cli"]:
            continue
        flags = m["flags"] or ("--" + f.name.replace("_", "-"),)
        default = (defaults or {}).get(f.name, f.default)
        shown = "" if default is None or default is False or default == "" else f" (default: {default})"
        kwargs = dict(help=m["help"] + shown)
        if flags[0].startswith("-"):
            kwargs.update(dest=f.name, default=argparse.SUPPRESS)
        kind = scalar_type(cls, f)
        if kind is bool:
            parser.add_argument(*flags, action="store_true", **kwargs)
            continue
        kwargs.update(choices=m["choices"], metavar=m["metavar"])
        parser.add_argument(*flags, type=kind or parse_size, **kwargs)


def from_arguments(cls, args: argparse.Namespace, **defaults):
    """``cls`` from parsed flags; ``defaults`` fill what the command line left out."""
    given = {f.name: getattr(args, f.name) for f in declared(cls) if hasattr(args, f.name)}
    return cls(**{**defaults, **given})
