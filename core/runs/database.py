"""SQLite beneath the run store: the lock wait, read-only connections, and SQLite's and the file system's errors
told apart (a damaged file, a full disk, a read-only folder).

WAL mode lets several processes write at once (two trainers) while another reads (the app): readers never block
writers, writers queue on one lock, and every connection waits up to `BUSY_TIMEOUT_S` for it instead of failing
with "database is locked". WAL needs a local file system: do not put the data folder on a network share.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from core.errors import PetlabError, storage_error

BUSY_TIMEOUT_S = 10.0

# SQLite's primary result codes (the low byte of an extended code), and the words of their messages for Python 3.10,
# whose sqlite3 errors carry no code.
_SQLITE_CODES = {
    "SQLITE_PERM": (3, "access permission denied"),
    "SQLITE_READONLY": (8, "readonly database"),
    "SQLITE_IOERR": (10, "disk i/o error"),
    "SQLITE_CORRUPT": (11, "malformed"),
    "SQLITE_FULL": (13, "database or disk is full"),
    "SQLITE_CANTOPEN": (14, "unable to open database file"),
    "SQLITE_NOTADB": (26, "file is not a database"),
}
SQLITE_CODE = {name: code for name, (code, _) in _SQLITE_CODES.items()}
_MIN_FREE_BYTES = 64 * 1024
"""Below this much free space SQLite cannot even map its shared-memory file: the disk counts as full."""


def sqlite_code(exc: sqlite3.Error) -> int | None:
    """SQLite's primary result code of ``exc``, or None when it has none we know."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF
    text = str(exc).lower()
    return next((code for code, words in _SQLITE_CODES.values() if words in text), None)


def storage_problem(exc: BaseException, where: Path, consequence: str) -> PetlabError | None:
    """The `NoSpace` or `NotWritable` that ``exc`` (an OSError, or a sqlite3 error on a file in ``where``) stands
    for, with ``consequence`` (what happened and what was kept) in its message; None when it is neither."""
    if isinstance(exc, OSError):
        return storage_error(exc.errno, Path(exc.filename).parent if exc.filename else where, consequence)
    code = sqlite_code(exc) if isinstance(exc, sqlite3.Error) else None
    if code == SQLITE_CODE["SQLITE_FULL"]:
        return storage_error(errno.ENOSPC, where, consequence)
    if code not in (
        SQLITE_CODE[name] for name in ("SQLITE_PERM", "SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN")
    ):
        return None
    # SQLite says "disk I/O error" or "unable to open" for several causes: ask the file system which one it is.
    if not hasattr(os, "statvfs"):
        return None
    try:
        stats = os.statvfs(where)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return storage_error(errno.EROFS, where, consequence)
    if stats.f_bavail * stats.f_frsize < _MIN_FREE_BYTES:
        return storage_error(errno.ENOSPC, where, consequence)
    if not os.access(where, os.W_OK):
        return storage_error(errno.EACCES, where, consequence)
    return None


def connect_read_only(db_path: Path) -> tuple[sqlite3.Connection, bool]:
    """A connection that never writes, and whether it misses changes still in the ``-wal`` file.

    SQLite reads a WAL database read-only only where its shared-memory file exists or can be made; in a read-only
    folder or on a full disk it cannot, and then the file is read as immutable: without the changes still in its
    ``-wal`` file (a checkpoint moves them into the main file; the last writer to close does one).
    """
    uri = db_path.resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute("PRAGMA user_version").fetchone()
        return conn, False
    except sqlite3.OperationalError as exc:
        if sqlite_code(exc) not in (
            SQLITE_CODE["SQLITE_CANTOPEN"],
            SQLITE_CODE["SQLITE_IOERR"],
            SQLITE_CODE["SQLITE_READONLY"],
        ):
            raise
        conn.close()
    wal = db_path.with_name(db_path.name + "-wal")
    wal_ignored = wal.is_file() and wal.stat().st_size > 0
    return sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None), wal_ignored
