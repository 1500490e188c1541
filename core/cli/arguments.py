"""Command-line options made from config dataclasses, and the help shared by the commands that submit jobs."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from core.config import coerce_fields, field_docs

DETACH_HELP = (
    "submit, print the {what} and return at once (needs a Ray that outlives the command: --address, "
    "$PETLAB_RAY_ADDRESS, or a local cluster that PETLab starts with `ray start --head` and you stop with `ray stop`)"
)
ADDRESS_HELP = (
    "Ray cluster to run jobs on, HOST:PORT of `ray start --head` or 'auto' (default: $PETLAB_RAY_ADDRESS, else an "
    "embedded local Ray that lives as long as the command)"
)


def add_job_options(parser: argparse.ArgumentParser, what: str = "run id") -> None:
    """``--detach``, and ``--address`` (also accepted before the command, where `core.cli` reads it) for a command
    that submits jobs; ``what`` the command prints when detached."""
    parser.add_argument("--detach", action="store_true", help=DETACH_HELP.format(what=what))
    parser.add_argument("--address", default=argparse.SUPPRESS, help=ADDRESS_HELP)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, defaults: Any = None) -> None:
    """One ``--option`` per dataclass field, typed from its annotation, documented from its docstring."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        default = (
            getattr(defaults, f.name)
            if defaults is not None
            else (
                f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            )
        )
        kwargs: dict[str, Any] = {
            "default": argparse.SUPPRESS,
            "help": f"{docs.get(f.name, '')} (default: {default})",
        }
        if typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif hint is bool:
            kwargs["metavar"] = "true|false"
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def config_options(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` given on the command line (those not given are absent), as text."""
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}


def coerced(cls: type, values: dict[str, Any], defaults: Any) -> Any:
    """``defaults`` with the command line's text ``values`` converted to the field types and put in."""
    return dataclasses.replace(defaults, **coerce_fields(cls, values))
