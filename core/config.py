"""Config dataclasses read the same way everywhere: help text from their docstrings, values from text.

The command line, the app's forms and the method configs all describe a field by the ``Attributes:`` section of its
class's Google-style docstring (`field_docs`), and turn what a user typed into the annotated field type (`coerce`).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

_ENTRY = re.compile(r"(\w+)(?: \([^)]*\))?: ?(.*)")  # "name: text" or "name (type): text"


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its text in the ``Attributes:`` section of the class docstring, continuation lines joined.

    The section ends at its first blank or dedented line; entries that name no field of ``cls`` are left out.
    """
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if start is None:
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    current: str | None = None
    entry_indent: int | None = None
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        indent = len(line) - len(line.lstrip())
        if entry_indent is None:
            entry_indent = indent
        if indent < entry_indent:
            break
        if indent == entry_indent:
            match = _ENTRY.fullmatch(line.strip())
            if match is None:
                break
            current = match.group(1)
            docs[current] = match.group(2)
        elif current is not None:
            docs[current] = f"{docs[current]} {line.strip()}".strip()
    return {name: text for name, text in docs.items() if name in names}


def unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed); ``(hint, False)`` for any other annotation."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def coerce(cls: type, name: str, value: Any) -> Any:
    """``value`` (text, or a Python value) as the annotated type of field ``name`` of dataclass ``cls``.

    Text is read as: ``none`` (any case) for None where the field allows it; ``true/false/yes/no/1/0`` for a bool;
    a number for an int or a float (an int refuses fractions); one of the allowed values for a ``Literal``. A field
    whose type has a ``parse`` classmethod (``Targets``) is parsed by it. Other annotations keep the value as given.

    Raises:
        ValueError: naming the field, the value and what it must be.
    """
    hint, optional = unwrap_optional(typing.get_type_hints(cls)[name])
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() == "none")):
        return None
    or_none = " or none" if optional else ""
    if typing.get_origin(hint) is typing.Literal:
        allowed = typing.get_args(hint)
        for choice in allowed:
            if value == choice or (isinstance(value, str) and value == str(choice)):
                return choice
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}{or_none}")
    parse = getattr(hint, "parse", None)
    if isinstance(hint, type) and callable(parse):
        return value if isinstance(value, hint) else parse(value)
    try:
        if hint is bool:
            if not isinstance(value, str):
                return bool(value)
            text = value.strip().lower()
            if text not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError
            return text in ("true", "yes", "1")
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float:
            return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be of type {hint.__name__}{or_none}") from None
    return value


def coerce_fields(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """`coerce` applied to every ``name: value`` of ``values`` (all must be fields of ``cls``)."""
    return {name: coerce(cls, name, value) for name, value in values.items()}
