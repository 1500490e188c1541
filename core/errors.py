"""The errors PETLab raises on purpose: one family, each with a message meant for the user.

Every error here derives from `PetlabError`; the command line prints its message on one line and exits non-zero,
the app shows it in the page. Where callers long caught a built-in type, the error derives from that type too
(`OptionError` is a ValueError, `NoSpace` an OSError), so older ``except`` clauses keep working.
"""

from __future__ import annotations

import errno
from pathlib import Path

__all__ = [
    "NoSpace",
    "NotWritable",
    "OptionError",
    "PetlabError",
    "StoreDamaged",
    "StoreError",
    "storage_error",
]


class PetlabError(Exception):
    """Base class of the errors PETLab raises on purpose; the message says what happened and what to do."""

    def __str__(self) -> str:  # KeyError subclasses would print the message in quotes
        return str(self.args[0]) if self.args else super().__str__()


class OptionError(PetlabError, ValueError):
    """A value given by the user is refused (unknown name, out of range, ambiguous run id prefix)."""


class StoreError(PetlabError, RuntimeError):
    """The run store cannot do what was asked (newer schema, opened read-only, needs an upgrade)."""


class StoreDamaged(StoreError):
    """The run store's index file is damaged or lost; it is left as it is, and ``runs rebuild`` rebuilds it."""


class NoSpace(PetlabError, OSError):
    """No space left on the device holding a file PETLab writes; the message says what was kept."""


class NotWritable(PetlabError, OSError):
    """A folder PETLab writes to is read-only or not permitted; the message says what was kept."""


def storage_error(code: int | None, where: Path | str, consequence: str) -> NoSpace | NotWritable | None:
    """The `NoSpace` or `NotWritable` an errno ``code`` stands for, naming the folder ``where`` and saying
    ``consequence`` (what failed and what was kept); None for any other code.

    >>> str(storage_error(errno.ENOSPC, "/data", "the adapter was not saved"))
    'no space left on device in /data: the adapter was not saved'
    """
    if code in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"no space left on device in {where}: {consequence}")
    if code == errno.EROFS:
        return NotWritable(f"{where} is on a read-only file system: {consequence}")
    if code in (errno.EACCES, errno.EPERM):
        return NotWritable(f"no permission to write in {where}: {consequence}")
    return None
