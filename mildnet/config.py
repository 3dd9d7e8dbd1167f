"""A dataclass config as a command line: each field is spelled once, its flag generated from it.

A field becomes ``--field-name`` when its metadata holds :func:`flag` (help text and any argparse keyword);
its type comes from the annotation (``int | None`` -> ``int``) and its default from the field. A bool field
that defaults to True becomes ``--no-field-name`` (store_false): the dataclass says what is on by default.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def flag(help: str | None = None, **argparse_kw: Any) -> dict[str, Any]:
    """Field metadata making the field a command-line flag: ``field(default=..., metadata=flag("help"))``."""
    return {"flag": {"help": help, **argparse_kw}}


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``; other annotations as they are."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per flagged field of the dataclass ``cls``, in field order, ``dest`` = the field name."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "flag" not in f.metadata:
            continue
        kw = dict(f.metadata["flag"])
        name = f.name.replace("_", "-")
        default = None if f.default is dataclasses.MISSING else f.default
        typ = _base_type(hints[f.name])
        if typ is bool:
            on = default is True
            parser.add_argument(f"--no-{name}" if on else f"--{name}", dest=f.name,
                                action="store_false" if on else "store_true", **kw)
        else:
            kw.setdefault("default", default)
            kw.setdefault("type", typ)
            parser.add_argument(f"--{name}", dest=f.name, **kw)


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """The dataclass ``cls`` from parsed arguments: every flagged field from ``args`` (None: the field's
    default), then ``overrides``."""
    values = {}
    for f in dataclasses.fields(cls):
        if "flag" in f.metadata and f.name not in overrides:
            value = getattr(args, f.name)
            if value is not None or f.default is dataclasses.MISSING:
                values[f.name] = value
    return cls(**values, **overrides)
