"""The run store: every fine-tune's record, metric history and adapter file, on disk.

Layout under the data folder (`default_root`: ``$PETLAB_HOME``, else the user's data directory)::

    runs.sqlite            one row per run (table ``runs``) and its metric history (table ``metrics``)
    runs/<run_id>/         the run's files: ``adapter.safetensors``, ``run.json`` (its row, so that the index can be
                           rebuilt) and anything else the trainer keeps

Several processes may write at once (two trainers) while another reads (the app). SQLite in WAL mode makes that
safe: readers never block writers, writers queue on one lock. Each write is one short ``BEGIN IMMEDIATE``
transaction (the lock is taken up front, so two writers never deadlock upgrading a read lock), every connection
waits up to `BUSY_TIMEOUT_S` for the lock instead of failing with "database is locked", and connections are
per thread and per process (a sqlite3 connection must not cross threads, nor survive a ``fork``). WAL needs a
local file system: do not put the data folder on a network share.

A run whose process died stays ``running`` in the table; the next `RunStore` opened anywhere on the same folder
calls `RunStore.recover`, which marks it ``interrupted`` (its metrics and files stay). The schema is `RUN_COLUMNS`
plus `_METRICS_DDL`, versioned by ``PRAGMA user_version``: to add a column, append it with ``since`` set to a new
`SCHEMA_VERSION`, and `migrate` adds it to older databases.

Damage is never repaired silently: a ``runs.sqlite`` that SQLite cannot read, or one that is missing or empty while
run folders exist, raises `StoreDamaged` and is left as it is. `check_store` reports damage, `rebuild_store`
rebuilds the index from the run folders' ``run.json`` records (and whatever the old file still yields), keeping the
old file aside. A store on a full disk or in a read-only folder still opens with ``read_only=True``.

Run ids are time-sortable (``20261122-153012-ab12cd``, UTC); every method taking a run id also takes a unique
prefix of one, like git.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import importlib.metadata
import itertools
import json
import math
import operator
import os
import platform
import re
import secrets
import shutil
import socket
import sqlite3
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from core.errors import OptionError, PetlabError, StoreDamaged, StoreError, storage_error

__all__ = [
    "ACTIVE_STATUSES",
    "FINISHED_STATUSES",
    "KINDS",
    "RUN_COLUMNS",
    "SCHEMA_VERSION",
    "RebuildReport",
    "StoreCheck",
    "STATUSES",
    "Column",
    "RunNotFoundError",
    "RunStore",
    "check_store",
    "default_root",
    "migrate",
    "package_versions",
    "rebuild_store",
]

HOME_ENV = "PETLAB_HOME"
DB_NAME = "runs.sqlite"
RUNS_DIR = "runs"
SNAPSHOT_DIR = "snapshots"
ADAPTER_FILE = "adapter.safetensors"
RECORD_FILE = "run.json"
BUSY_TIMEOUT_S = 10.0
STALE_AFTER_S = 1800.0
"""A ``running`` run whose heartbeat is older than this is taken for dead, even where its pid cannot be checked
(another host). Generous on purpose: the trainer should heartbeat during long evaluations too, and a live run
wrongly marked ``interrupted`` returns to ``running`` at its next `RunStore.heartbeat` or `RunStore.log_metrics`."""

STATUSES = ("queued", "running", "completed", "cancelled", "diverged", "failed", "interrupted")
ACTIVE_STATUSES = ("queued", "running")
FINISHED_STATUSES = ("completed", "cancelled", "diverged", "failed", "interrupted")


# ------------------------------------------------------------------------------------------------------------
# The schema (the one place it is written down)
# ------------------------------------------------------------------------------------------------------------

SCHEMA_VERSION = 3


@dataclass(frozen=True)
class Column:
    """One column of the ``runs`` table.

    Attributes:
        name: Column and field name.
        kind: ``text``, ``int``, ``real``, or ``json`` (any JSON-ready value, stored as text, decoded on read).
        doc: What it holds.
        system: Set by the store itself (id, timestamps, writer), not through `RunStore.create_run` /
            `RunStore.update_run`.
        since: The `SCHEMA_VERSION` that added it; `migrate` adds it to databases older than that.
        constraint: Extra SQL for a fresh table (only columns present since version 1 may have one).
    """

    name: str
    kind: Literal["text", "int", "real", "json"]
    doc: str
    system: bool = False
    since: int = 1
    constraint: str = ""

    @property
    def ddl(self) -> str:
        sql_type = {"text": "TEXT", "int": "INTEGER", "real": "REAL", "json": "TEXT"}[self.kind]
        return f"{self.name} {sql_type} {self.constraint}".strip()


RUN_COLUMNS: tuple[Column, ...] = (
    Column("id", "text", "time-sortable unique id, e.g. 20261122-153012-ab12cd", system=True, constraint="PRIMARY KEY"),
    Column("created_at", "text", "UTC ISO time the row was created", system=True, constraint="NOT NULL"),
    Column("finished_at", "text", "UTC ISO time of finish_run (or of recovery)", system=True),
    Column("status", "text", "one of STATUSES", system=True, constraint="NOT NULL"),
    Column("message", "text", "why it ended, e.g. 'diverged at step 41: loss is nan; ...', or the error text"),
    Column("label", "text", "free short name given by the user"),
    Column("tags", "text", "free text (e.g. comma-separated tags)"),
    Column("method", "text", "registered method name (core.methods)"),
    Column("method_options", "json", "the method's options"),
    Column("backbone", "json", "backbone spec"),
    Column("weights", "json", "where the weights came from and what they are"),
    Column("dataset", "json", "dataset spec (DataSpec.to_dict())"),
    Column("normalization", "text", "input normalisation name"),
    Column("seed", "int", "training seed"),
    Column("train_config", "json", "trainer configuration"),
    Column("trainable_params", "int", "trainable parameters without the classifier head"),
    Column("trainable_params_with_head", "int", "trainable parameters with the classifier head"),
    Column("best_val_acc", "real", "best validation accuracy (the selection criterion)"),
    Column("test_acc", "real", "test accuracy of the selected checkpoint, measured once"),
    Column("steps", "int", "optimisation steps done"),
    Column("wall_time_s", "real", "training wall time in seconds"),
    Column("steps_per_s", "real", "training throughput"),
    Column("peak_memory_bytes", "int", "peak accelerator (or process) memory"),
    Column("device", "text", "device it ran on, e.g. cuda:0 (NVIDIA H100) or cpu"),
    Column("adapter_file", "text", "adapter file, relative to the run folder, once recorded", system=True),
    Column("versions", "json", "package versions: torch, timm, python, petlab"),
    Column("pid", "int", "process id of the writer", system=True),
    Column("hostname", "text", "host of the writer", system=True),
    Column("heartbeat_at", "text", "UTC ISO time of the writer's last sign of life", system=True),
    Column("kind", "text", "what the record is: 'finetune' or 'intrinsic_dim' (a measurement)", since=2),
    Column("node", "text", "Ray node id of the worker that ran it (empty when it ran in the calling process)", since=2),
    Column("resources", "json", "what its job reserved, e.g. {'CPU': 2, 'GPU': 0}", since=2),
    Column("owner", "text", "who started it (the app's signed-in user), when known", since=2),
    Column("sweep_id", "text", "the sweep it is a point of, if any", since=2),
    Column("result", "json", "a measurement's result (intrinsic dimension: settings, trials, d90 per group)", since=2),
    Column("cancel_requested_at", "text", "UTC ISO time a cancel was asked for a running job", system=True, since=2),
    Column("skipped_files", "json", "folder dataset files left out: {'count': n, 'first': [[file, why]]}", since=3),
)
KINDS = ("finetune", "intrinsic_dim")

_METRICS_DDL = """
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    epoch REAL,
    split TEXT NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_by_run ON metrics(run_id, step);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs(created_at);
"""
_DTYPES = {"int": "Int64", "real": "float64"}
_METRIC_KEYS = ("step", "epoch", "split", "name", "value", "time")

_MIGRATION_STEPS: dict[int, Callable[[sqlite3.Connection], None]] = {
    2: lambda conn: conn.execute("UPDATE runs SET kind = 'finetune' WHERE kind IS NULL"),
}
"""Data changes beyond added columns, by the version they lead to."""


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the database behind ``conn`` (autocommit mode) to `SCHEMA_VERSION`, in one write transaction.

    A fresh file gets every table; an older one gets the columns added since its version, then the data steps.

    Raises:
        StoreError: (a RuntimeError) the database was written by a newer PETLab (a higher schema version).
    """
    if _user_version(conn) == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _user_version(conn)  # again, under the lock: another process may have migrated meanwhile
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"this run store has schema version {version} but this PETLab knows versions up to "
                f"{SCHEMA_VERSION}; upgrade PETLab, or point ${HOME_ENV} at another folder"
            )
        if version == SCHEMA_VERSION:
            pass  # another process migrated while this one waited for the lock
        elif version == 0:
            columns = ",\n    ".join(column.ddl for column in RUN_COLUMNS)
            conn.execute(f"CREATE TABLE IF NOT EXISTS runs (\n    {columns}\n)")
            for statement in _METRICS_DDL.split(";"):
                if statement.strip():
                    conn.execute(statement)
        else:
            existing = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for column in RUN_COLUMNS:
                    if column.since == target and column.name not in existing:
                        conn.execute(f"ALTER TABLE runs ADD COLUMN {column.ddl}")
                if target in _MIGRATION_STEPS:
                    _MIGRATION_STEPS[target](conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


# ------------------------------------------------------------------------------------------------------------
# Small helpers: places, times, processes, values
# ------------------------------------------------------------------------------------------------------------


def default_root() -> Path:
    """The data folder: ``$PETLAB_HOME``, else ``petlab`` in the user's data directory.

    That is ``$XDG_DATA_HOME/petlab`` (default ``~/.local/share/petlab``) on Linux,
    ``~/Library/Application Support/petlab`` on macOS and ``%LOCALAPPDATA%\\petlab`` on Windows.
    """
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        xdg = os.environ.get("XDG_DATA_HOME", "")
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"  # the XDG spec: ignore relative
    return base / "petlab"


def package_versions() -> dict[str, str | None]:
    """Versions of python, torch, timm and petlab, read from package metadata (torch is not imported)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "timm", "petlab"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    if versions["petlab"] is None:
        from core import __version__

        versions["petlab"] = __version__
    return versions


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _new_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host still runs; a zombie (killed, not yet reaped) counts as dead."""
    if sys.platform == "win32":
        return True  # os.kill(pid, 0) would terminate it there; rely on the heartbeat instead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS), or it vanished just now: take the answer of os.kill
    return stat.rpartition(")")[2].split()[0] != "Z"


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _encode(column: Column, value: Any) -> Any:
    """The SQLite value of ``value`` for ``column``; ValueError naming the field when it does not fit."""
    if value is None:
        return None
    try:
        if column.kind == "json":
            return json.dumps(value, sort_keys=True, default=_json_default, allow_nan=True)
        if column.kind == "int":
            return operator.index(value)
        if column.kind == "real":
            return float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"field {column.name!r} takes {column.kind} values, got {value!r}: {err}") from None
    if not isinstance(value, str):
        raise ValueError(f"field {column.name!r} takes text, got {type(value).__name__} {value!r}")
    return value


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    kinds = {column.name: column.kind for column in RUN_COLUMNS}
    record = dict(row)
    for name, value in record.items():
        if kinds.get(name) == "json" and value is not None:
            record[name] = json.loads(value)
    return record


def _flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    """One run as a flat row: JSON objects become dotted columns (``method_options.rank``), the rest stays."""
    flat: dict[str, Any] = {}

    def put(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                put(f"{prefix}.{key}", sub)
        else:
            flat[prefix] = value

    for name, value in record.items():
        put(name, value)
    return flat


def _tabular(frame: pd.DataFrame) -> pd.DataFrame:
    """Make object columns file-safe: lists, dicts and mixed-type columns become JSON text."""
    frame = frame.copy()
    for name in frame.columns:
        if frame[name].dtype != object:
            continue
        values = [v for v in frame[name] if v is not None and not (isinstance(v, float) and math.isnan(v))]
        types = {type(v) for v in values}
        if not types <= {int, float} and (len(types) > 1 or types & {list, dict, tuple}):
            frame[name] = [None if v is None else v if isinstance(v, str) else json.dumps(v) for v in frame[name]]
    return frame


_RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
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
_CODE = {name: code for name, (code, _) in _SQLITE_CODES.items()}
_MIN_FREE_BYTES = 64 * 1024
"""Below this much free space SQLite cannot even map its shared-memory file: the disk counts as full."""


def _sqlite_code(exc: sqlite3.Error) -> int | None:
    """SQLite's primary result code of ``exc``, or None when it has none we know."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF
    text = str(exc).lower()
    return next((code for code, words in _SQLITE_CODES.values() if words in text), None)


def _storage_error(exc: BaseException, where: Path, consequence: str) -> PetlabError | None:
    """The `NoSpace` or `NotWritable` that ``exc`` (an OSError, or a sqlite3 error on a file in ``where``) stands
    for, with ``consequence`` (what happened and what was kept) in its message; None when it is neither."""
    if isinstance(exc, OSError):
        return storage_error(exc.errno, Path(exc.filename).parent if exc.filename else where, consequence)
    code = _sqlite_code(exc) if isinstance(exc, sqlite3.Error) else None
    if code == _CODE["SQLITE_FULL"]:
        return storage_error(errno.ENOSPC, where, consequence)
    if code not in (_CODE[name] for name in ("SQLITE_PERM", "SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN")):
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


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a partial file and a rename: readers see the old or the new file, never
    half of one. A failed write removes its partial file."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _connect_read_only(db_path: Path) -> tuple[sqlite3.Connection, bool]:
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
        if _sqlite_code(exc) not in (_CODE["SQLITE_CANTOPEN"], _CODE["SQLITE_IOERR"], _CODE["SQLITE_READONLY"]):
            raise
        conn.close()
    wal = db_path.with_name(db_path.name + "-wal")
    wal_ignored = wal.is_file() and wal.stat().st_size > 0
    return sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None), wal_ignored


def _run_folders(runs_path: Path) -> dict[str, Path]:
    """The run folders under ``runs_path`` (folders named like a run id), by id."""
    if not runs_path.is_dir():
        return {}
    return {p.name: p for p in sorted(runs_path.iterdir()) if p.is_dir() and _RUN_ID.fullmatch(p.name)}


def _read_record(folder: Path) -> dict[str, Any] | None:
    """The row kept in a run folder's ``run.json``; None when there is none or it cannot be read."""
    try:
        record = json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    run = record.get("run") if isinstance(record, dict) else None
    return run if isinstance(run, dict) and run.get("id") == folder.name else None


class RunNotFoundError(PetlabError, KeyError):
    """No run has this id, nor an id starting with it."""


# ------------------------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------------------------


class RunStore:
    """Runs, their metric histories and their files under one data folder.

    One instance may be shared by threads: each thread (and each process after a fork) opens its own connection
    on first use. Every method taking ``run_id`` accepts a unique prefix of one.
    """

    def __init__(
        self, root: Path | str | None = None, stale_after_s: float = STALE_AFTER_S, read_only: bool = False
    ) -> None:
        """Open the store: create the folders and schema if needed, migrate an older schema, `recover` dead runs.

        Args:
            root: The data folder; None means `default_root`.
            stale_after_s: Heartbeat age after which a ``running`` run counts as dead (see `STALE_AFTER_S`).
            read_only: Write nothing at all (no folders, no migration, no recovery, no switch to WAL): for reading
                a store on a full disk or in a read-only folder. A store that does not exist yet reads as empty;
                its write methods raise `StoreError`.

        Raises:
            StoreDamaged: SQLite cannot read ``runs.sqlite``, or it is missing or empty while run folders exist.
            NoSpace, NotWritable: the store cannot be written (full disk, read-only folder); open it read-only.
            StoreError: a newer schema, or (read-only) an older one that needs the migration a writable open does.
        """
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.db_path = self.root / DB_NAME
        self.runs_path = self.root / RUNS_DIR
        self.stale_after_s = stale_after_s
        self.read_only = read_only
        self.wal_ignored = False
        """Whether a read-only open misses the changes still in the ``-wal`` file (see `_connect_read_only`)."""
        self._local = threading.local()
        opening = (
            "the run store was not opened for writing; nothing was changed "
            f"(`python -m core --home {self.root} runs list` still reads it)"
        )
        with self._translating(opening):
            if not read_only:
                self.runs_path.mkdir(parents=True, exist_ok=True)
            self._refuse_lost_index()
            version = _user_version(self._conn())
            if read_only:
                self._check_readable_version(version)
            else:
                migrate(self._conn())
                self.recover()

    @classmethod
    def open(
        cls, root: Path | str | None = None, stale_after_s: float = STALE_AFTER_S, read_only: bool = False
    ) -> RunStore:
        """Same as ``RunStore(root, stale_after_s, read_only)``."""
        return cls(root, stale_after_s, read_only)

    def _refuse_lost_index(self) -> None:
        """Raise `StoreDamaged` when ``runs.sqlite`` is missing or empty but run folders exist: opening would make
        a fresh, empty index and every run would vanish from the list."""
        if self.db_path.is_file() and self.db_path.stat().st_size > 0:
            return
        folders = _run_folders(self.runs_path)
        if not folders:
            return
        state = "is empty (0 bytes)" if self.db_path.exists() else "is missing"
        raise StoreDamaged(
            f"the run store index {self.db_path} {state} but {len(folders)} run folder(s) exist in "
            f"{self.runs_path}: the index was lost, not the runs. Nothing was changed; rebuild the index from the "
            f"folders with `python -m core --home {self.root} runs rebuild`"
        )

    def _check_readable_version(self, version: int) -> None:
        """A read-only open reads only the current schema (it cannot migrate)."""
        if version == SCHEMA_VERSION or self._empty():
            return
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the run store {self.db_path} has schema version {version} but this PETLab knows versions up to "
                f"{SCHEMA_VERSION}; upgrade PETLab"
            )
        raise StoreError(
            f"the run store {self.db_path} has schema version {version} and needs an upgrade to version "
            f"{SCHEMA_VERSION}, which a read-only open does not make: run any command that writes (e.g. "
            f"`python -m core --home {self.root} runs list`) once the folder is writable and has free space"
        )

    def _empty(self) -> bool:
        """Whether there is no database file yet (or a 0-byte one), which a read-only open reads as no runs."""
        return not self.db_path.is_file() or self.db_path.stat().st_size == 0

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- connections

    @staticmethod
    def _wal(conn: sqlite3.Connection) -> str:
        """Switch to WAL mode (it persists in the file). Switching needs an exclusive lock and SQLite may answer
        "database is locked" at once, without its busy handler, while another process creates the same new file:
        retry until `BUSY_TIMEOUT_S`."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        delay = 0.01
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if mode.lower() == "wal":
                    return mode
                return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def _conn(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "conn", None) is not None and local.pid == os.getpid():
            return local.conn
        if self.read_only:
            conn = self._read_only_conn()
        else:
            conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            mode = self._wal(conn)
            if mode.lower() != "wal":
                warnings.warn(
                    f"{self.db_path} could not switch to WAL mode (got {mode!r}); concurrent runs may wait on each "
                    "other. Is the data folder on a network file system?",
                    RuntimeWarning,
                    stacklevel=3,
                )
            conn.execute("PRAGMA synchronous = NORMAL")  # safe in WAL mode: a power cut loses the last commits only
            conn.execute("PRAGMA foreign_keys = ON")
        conn.row_factory = sqlite3.Row
        local.conn, local.pid = conn, os.getpid()  # a connection inherited through fork is dropped, not reused
        return conn

    def _read_only_conn(self) -> sqlite3.Connection:
        """A connection that never writes; an empty in-memory store when there is no database file yet."""
        if self._empty():
            conn = sqlite3.connect(":memory:", isolation_level=None)
            migrate(conn)
            return conn
        conn, self.wal_ignored = _connect_read_only(self.db_path)
        return conn

    @contextmanager
    def _translating(self, consequence: str) -> Iterator[None]:
        """Raise SQLite's and the file system's errors as PETLab's: `StoreDamaged` for a file SQLite cannot read,
        `NoSpace` / `NotWritable` (saying ``consequence``) for a full disk or a read-only folder."""
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            if isinstance(exc, PetlabError):
                raise
            code = _sqlite_code(exc) if isinstance(exc, sqlite3.Error) else None
            if code in (_CODE["SQLITE_CORRUPT"], _CODE["SQLITE_NOTADB"]):
                raise self._damaged(str(exc)) from exc
            problem = _storage_error(exc, self.root, consequence)
            if problem is None:
                raise
            raise problem from exc

    def _damaged(self, detail: str) -> StoreDamaged:
        return StoreDamaged(
            f"the run store {self.db_path} is damaged ({detail}); it was left as it is. See what is affected with "
            f"`python -m core --home {self.root} runs check`, rebuild it from the run folders with "
            f"`python -m core --home {self.root} runs rebuild` (the damaged file is kept aside)"
        )

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, for reading; errors as in `_translating`."""
        with self._translating("nothing was changed"):
            yield self._conn()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction; the write lock is taken at BEGIN (waiting up to `BUSY_TIMEOUT_S`).

        A failure rolls it back: nothing of it is recorded, everything recorded before is kept.
        """
        if self.read_only:
            raise StoreError(f"the run store {self.db_path} was opened read-only; open it without read_only to write")
        kept = f"this change was not recorded; every run recorded before is kept in {self.db_path}"
        with self._translating(kept):
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _save_record(self, conn: sqlite3.Connection, run_id: str) -> None:
        """Write the run's row to ``runs/<id>/run.json`` (atomically), inside the write transaction that changed
        it: writers hold the lock, so the file follows the row in commit order, and a failed write is rolled back
        with the change."""
        row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        folder = self.runs_path / run_id
        folder.mkdir(parents=True, exist_ok=True)
        record = {"schema_version": SCHEMA_VERSION, "run": _decode(row)}
        _write_atomically(folder / RECORD_FILE, json.dumps(record, indent=1, sort_keys=True).encode())

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends); the store stays usable."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    # ---------------------------------------------------------------------------------------------- ids

    def resolve(self, run_id: str) -> str:
        """The full id of the run ``run_id`` names (itself, or the one run whose id starts with it).

        Raises:
            RunNotFoundError: (a KeyError) no run matches.
            ValueError: the prefix is empty or matches several runs.
        """
        with self._read() as conn:
            return self._resolve(conn, run_id)

    def _resolve(self, conn: sqlite3.Connection, run_id: str) -> str:
        if not isinstance(run_id, str) or not run_id:
            raise OptionError(f"a run id must be a non-empty string, got {run_id!r}")
        if conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone():
            return run_id
        matches = [
            row[0]
            for row in conn.execute(
                "SELECT id FROM runs WHERE substr(id, 1, ?) = ? ORDER BY id LIMIT 6", (len(run_id), run_id)
            )
        ]
        if not matches:
            raise RunNotFoundError(f"no run with id {run_id!r} (nor one starting with it) in {self.db_path}")
        if len(matches) > 1:
            shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
            raise OptionError(f"run id prefix {run_id!r} is ambiguous: it matches {shown}; give more characters")
        return matches[0]

    # ------------------------------------------------------------------------------------------- writing

    @staticmethod
    def _fields(fields: Mapping[str, Any], action: str) -> dict[str, Any]:
        """Encode the record fields of a write; ValueError for unknown or store-managed fields."""
        columns = {column.name: column for column in RUN_COLUMNS}
        unknown = sorted(set(fields) - set(columns))
        if unknown:
            allowed = ", ".join(c.name for c in RUN_COLUMNS if not c.system)
            raise ValueError(f"unknown run field(s) {', '.join(unknown)} in {action}; known fields: {allowed}")
        system = sorted(name for name in fields if columns[name].system)
        if system:
            raise ValueError(
                f"field(s) {', '.join(system)} are set by the run store, not by {action} "
                "(status changes go through create_run, start_run and finish_run)"
            )
        return {name: _encode(columns[name], value) for name, value in fields.items()}

    def create_run(self, record: Mapping[str, Any], status: Literal["running", "queued"] = "running") -> str:
        """Insert a run; return its id. Its folder and ``run.json`` are created, and this process is recorded as
        its writer.

        Args:
            record: Any non-system fields of `RUN_COLUMNS` (method, method_options, backbone, dataset, ...).
                ``versions`` defaults to `package_versions`.
            status: ``running`` (the caller trains it now) or ``queued`` (a worker will `start_run` it).

        Raises:
            ValueError: unknown or store-managed fields, values of the wrong kind, or another status.
        """
        if status not in ACTIVE_STATUSES:
            raise ValueError(f"a new run is 'running' or 'queued', not {status!r}; use finish_run to end it")
        values = self._fields({"versions": package_versions(), "kind": "finetune", **record}, "create_run")
        if values["kind"] not in KINDS:
            raise ValueError(f"a run's kind is one of {', '.join(KINDS)}, not {values['kind']!r}")
        now = _now()
        values |= {"created_at": now, "status": status, "pid": os.getpid()}
        values |= {"hostname": socket.gethostname(), "heartbeat_at": now}
        for _ in range(10):
            values["id"] = _new_id()
            names = ", ".join(values)
            try:
                with self._write() as conn:
                    conn.execute(
                        f"INSERT INTO runs ({names}) VALUES ({', '.join('?' * len(values))})", list(values.values())
                    )
                    self._save_record(conn, values["id"])  # creates the run's folder
                break
            except sqlite3.IntegrityError:  # the same id in the same second: draw again
                continue
        else:
            raise RuntimeError("could not draw a unique run id in 10 tries")
        return values["id"]

    def start_run(
        self, run_id: str, pid: int | None = None, hostname: str | None = None, node: str | None = None
    ) -> None:
        """Move a ``queued`` run to ``running``, with its worker as the writer.

        Args:
            run_id: The run.
            pid, hostname: The worker process that runs it (default: this process), so that `recover` can tell
                when it died.
            node: The Ray node id of the worker, when it runs on Ray.

        Raises:
            ValueError: the run is not queued (e.g. it was cancelled while it waited).
        """
        now = _now()
        pid = os.getpid() if pid is None else pid
        hostname = socket.gethostname() if hostname is None else hostname
        with self._write() as conn:
            run_id = self._resolve(conn, run_id)
            cursor = conn.execute(
                "UPDATE runs SET status = 'running', pid = ?, hostname = ?, node = ?, heartbeat_at = ? "
                "WHERE id = ? AND status = 'queued'",
                (pid, hostname, node, now, run_id),
            )
            if cursor.rowcount == 0:
                status = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
                raise ValueError(f"run {run_id} is {status}, not queued; only a queued run can start")
            self._save_record(conn, run_id)

    def request_cancel(self, run_id: str) -> str:
        """Cancel a run: a queued one ends ``cancelled`` at once; a running one is asked to stop (its worker sees
        `cancel_requested` before its next step and ends it ``cancelled`` with the step it reached). Returns the
        run's status afterwards (``cancelled``, ``running`` until the worker stops, or how it had already ended).
        """
        now = _now()
        with self._write() as conn:
            run_id = self._resolve(conn, run_id)
            status = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
            if status == "queued":
                conn.execute(
                    "UPDATE runs SET status = 'cancelled', message = 'cancelled while queued', steps = 0, "
                    "cancel_requested_at = ?, finished_at = ? WHERE id = ?",
                    (now, now, run_id),
                )
                self._save_record(conn, run_id)
                return "cancelled"
            if status == "running":
                conn.execute("UPDATE runs SET cancel_requested_at = ? WHERE id = ?", (now, run_id))
            return status

    def cancel_requested(self, run_id: str) -> bool:
        """Whether someone asked this run to stop (`request_cancel`)."""
        with self._read() as conn:
            row = conn.execute("SELECT cancel_requested_at FROM runs WHERE id = ?", (self._resolve(conn, run_id),))
            return row.fetchone()[0] is not None

    def queue_position(self, run_id: str) -> int | None:
        """1 for the next queued run to start among those waiting for the same resources, 2 for the one after,
        ...; None when the run is not queued. Ray starts work that needs the same resources in submission order."""
        with self._read() as conn:
            run_id = self._resolve(conn, run_id)
            row = conn.execute("SELECT status, resources, created_at FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row["status"] != "queued":
                return None
            ahead = conn.execute(
                "SELECT COUNT(*) FROM runs WHERE status = 'queued' AND resources IS ? AND (created_at < ? OR "
                "(created_at = ? AND id < ?))",
                (row["resources"], row["created_at"], row["created_at"], run_id),
            ).fetchone()[0]
        return int(ahead) + 1

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Set record fields of a run (e.g. ``steps=120, best_val_acc=0.81``) and refresh its heartbeat.

        Raises:
            ValueError: unknown or store-managed fields (``status`` among them), or values of the wrong kind.
        """
        values = self._fields(fields, "update_run") | {"heartbeat_at": _now()}
        assignments = ", ".join(f"{name} = ?" for name in values)
        with self._write() as conn:
            run_id = self._resolve(conn, run_id)
            conn.execute(f"UPDATE runs SET {assignments} WHERE id = ?", [*values.values(), run_id])
            self._save_record(conn, run_id)

    def finish_run(self, run_id: str, status: str, message: str | None = None, **fields: Any) -> None:
        """End a run: set its final status, message and any record fields, the finish time, and its adapter file
        if `adapter_path` exists.

        A run marked ``interrupted`` by `recover` may still be finished by its writer (its process was alive
        after all); a run that ended otherwise may not be finished again.

        Raises:
            ValueError: ``status`` is not one of `FINISHED_STATUSES`, the run already ended, or bad fields.
        """
        if status not in FINISHED_STATUSES:
            raise ValueError(f"a run finishes as one of {', '.join(FINISHED_STATUSES)}, not {status!r}")
        values = self._fields({"message": message, **fields}, "finish_run")
        now = _now()
        values |= {"status": status, "finished_at": now, "heartbeat_at": now}
        with self._write() as conn:
            run_id = self._resolve(conn, run_id)
            current = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
            if current not in (*ACTIVE_STATUSES, "interrupted"):
                raise ValueError(f"run {run_id} already ended as {current}; it cannot finish again as {status}")
            if (self.runs_path / run_id / ADAPTER_FILE).is_file():
                values["adapter_file"] = ADAPTER_FILE
            assignments = ", ".join(f"{name} = ?" for name in values)
            conn.execute(f"UPDATE runs SET {assignments} WHERE id = ?", [*values.values(), run_id])
            self._save_record(conn, run_id)

    def heartbeat(self, run_id: str) -> None:
        """Record that the run's writer is alive (also done by `update_run` and `log_metrics`)."""
        with self._write() as conn:
            self._touch(conn, self._resolve(conn, run_id))

    def _touch(self, conn: sqlite3.Connection, run_id: str) -> None:
        """Refresh the heartbeat; a run of this very process that `recover` took for dead runs again."""
        revive = "status = 'interrupted' AND pid = :pid AND hostname = :host"
        conn.execute(
            f"UPDATE runs SET heartbeat_at = :now, "
            f"status = CASE WHEN {revive} THEN 'running' ELSE status END, "
            f"message = CASE WHEN {revive} THEN NULL ELSE message END, "
            f"finished_at = CASE WHEN {revive} THEN NULL ELSE finished_at END "
            "WHERE id = :id",
            {"now": _now(), "pid": os.getpid(), "host": socket.gethostname(), "id": run_id},
        )

    def log_metrics(self, run_id: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append metric rows in one transaction and refresh the heartbeat.

        Args:
            run_id: The run.
            rows: Dicts with ``step`` (int), ``split`` (e.g. train / val / test), ``name`` (e.g. loss / acc / lr),
                ``value`` (float; NaN is kept, it reads back as NaN), optionally ``epoch`` (may be fractional)
                and ``time`` (unix seconds; default now).

        Raises:
            ValueError: a row with missing or unknown keys, or values of the wrong type.
        """
        now = time.time()
        records = []
        for index, row in enumerate(rows):
            missing = [key for key in ("step", "split", "name", "value") if key not in row]
            unknown = sorted(set(row) - set(_METRIC_KEYS))
            if missing or unknown:
                problems = [f"missing {', '.join(missing)}"] if missing else []
                problems += [f"unknown {', '.join(unknown)}"] if unknown else []
                raise ValueError(
                    f"metric row {index} {dict(row)!r}: {'; '.join(problems)} "
                    f"(keys: {', '.join(_METRIC_KEYS)}; step, split, name and value are required)"
                )
            try:
                epoch, value = row.get("epoch"), row["value"]
                record = (
                    operator.index(row["step"]),
                    None if epoch is None else float(epoch),
                    row["split"],
                    row["name"],
                    None if value is None else float(value),
                    now if row.get("time") is None else float(row["time"]),
                )
            except (TypeError, ValueError) as err:
                raise ValueError(f"metric row {index} {dict(row)!r}: {err}") from None
            if not (isinstance(record[2], str) and record[2] and isinstance(record[3], str) and record[3]):
                raise ValueError(f"metric row {index} {dict(row)!r}: split and name must be non-empty strings")
            records.append(record)
        with self._write() as conn:
            run_id = self._resolve(conn, run_id)
            conn.executemany(
                "INSERT INTO metrics (run_id, step, epoch, split, name, value, time) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(run_id, *record) for record in records],
            )
            self._touch(conn, run_id)

    def write_adapter(self, run_id: str, data: bytes) -> Path:
        """Store a run's adapter file from its bytes (what a worker on another node sends back), atomically.

        Raises:
            NoSpace, NotWritable: the file could not be written; nothing of it is left, the run's record is kept.
        """
        path = self.adapter_path(run_id)
        kept = f"the adapter of run {path.parent.name} was not saved (no partial file is left); its record is kept"
        try:
            _write_atomically(path, data)
        except OSError as exc:
            problem = _storage_error(exc, path.parent, kept)
            if problem is None:
                raise
            raise problem from exc
        return path

    def record_adapter(self, run_id: str) -> Path:
        """Record the adapter file the trainer wrote at `adapter_path` (`finish_run` does so by itself).

        Raises:
            FileNotFoundError: the file is not there.
        """
        path = self.adapter_path(run_id)
        if not path.is_file():
            raise FileNotFoundError(f"no adapter file at {path}; write it (core.methods.save_adapter) first")
        with self._write() as conn:
            run_id = self._resolve(conn, run_id)
            conn.execute("UPDATE runs SET adapter_file = ? WHERE id = ?", (path.name, run_id))
            self._save_record(conn, run_id)
        return path

    # ------------------------------------------------------------------------------------------- snapshots
    # Adapter snapshots taken during training (``snapshots/step-<n>.safetensors`` in the run's folder), so the
    # spectra can be followed over training. Written from bytes, as the adapter: workers have no access to this disk.

    def write_snapshot(self, run_id: str, step: int, data: bytes) -> Path:
        """Store the adapter as it was after ``step`` training steps (safetensors bytes), atomically."""
        folder = self.run_dir(run_id) / SNAPSHOT_DIR
        folder.mkdir(exist_ok=True)
        path = folder / f"step-{int(step)}.safetensors"
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        os.replace(partial, path)
        return path

    def snapshot_paths(self, run_id: str) -> dict[int, Path]:
        """The run's adapter snapshots by training step, in step order (empty when it kept none)."""
        folder = self.run_dir(run_id) / SNAPSHOT_DIR
        found = {int(p.stem.removeprefix("step-")): p for p in folder.glob("step-*.safetensors")}
        return dict(sorted(found.items()))

    def recover(self) -> list[str]:
        """Mark ``interrupted`` the runs whose writer is gone; return their ids. Called when a store opens.

        Gone means: a ``running`` or ``queued`` run of this host whose pid no longer exists, or a ``running`` run
        (any host) whose heartbeat is older than ``stale_after_s``. Their metrics and files stay. A heartbeat that
        arrives meanwhile wins (each update checks the heartbeat it judged). A read-only store recovers nothing.
        """
        if self.read_only:
            return []
        host, now = socket.gethostname(), datetime.now(timezone.utc)
        with self._read() as conn:
            rows = conn.execute(
                "SELECT id, status, pid, hostname, heartbeat_at FROM runs WHERE status IN ('running', 'queued')"
            ).fetchall()
        verdicts = []
        for row in rows:
            beat = row["heartbeat_at"]
            age = (now - datetime.fromisoformat(beat)).total_seconds() if beat else math.inf
            when = f"last heartbeat {beat} ({_duration(age)} before recovery)" if beat else "no heartbeat recorded"
            if row["hostname"] == host and row["pid"] is not None and not _pid_alive(row["pid"]):
                why = f"its process (pid {row['pid']} on {host}) is gone; {when}"
            elif row["status"] == "running" and age > self.stale_after_s:
                why = f"no heartbeat for over {_duration(self.stale_after_s)} (writer pid {row['pid']} on "
                why += f"{row['hostname']}); {when}"
            else:
                continue
            verdicts.append((row["id"], row["status"], beat, f"interrupted: {why}"))
        if not verdicts:
            return []
        recovered = []
        with self._write() as conn:
            for run_id, status, beat, message in verdicts:
                cursor = conn.execute(
                    "UPDATE runs SET status = 'interrupted', message = ?, finished_at = ? "
                    "WHERE id = ? AND status = ? AND heartbeat_at IS ?",
                    (message, _now(), run_id, status, beat),
                )
                if cursor.rowcount:
                    self._save_record(conn, run_id)
                    recovered.append(run_id)
        return recovered

    def delete_run(self, run_id: str, force: bool = False) -> None:
        """Delete a run's row, its metrics and its folder.

        Raises:
            ValueError: the run is queued or running and ``force`` is False (cancel it first).
        """
        with self._write() as conn:
            run_id = self._resolve(conn, run_id)
            status = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
            if status in ACTIVE_STATUSES and not force:
                raise ValueError(f"run {run_id} is {status}; cancel it first, or pass force=True")
            conn.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        folder = self.runs_path / run_id
        if folder.exists():
            shutil.rmtree(folder)

    # ------------------------------------------------------------------------------------------- reading

    def get_run(self, run_id: str) -> dict[str, Any]:
        """Every field of one run, JSON fields decoded.

        Raises:
            RunNotFoundError: (a KeyError) unknown id; ValueError: ambiguous prefix.
        """
        with self._read() as conn:
            row = conn.execute("SELECT * FROM runs WHERE id = ?", (self._resolve(conn, run_id),)).fetchone()
        if row is None:  # deleted between the two statements
            raise RunNotFoundError(f"run {run_id!r} was just deleted")
        return _decode(row)

    def list_runs(
        self,
        status: str | Iterable[str] | None = None,
        method: str | None = None,
        dataset: str | None = None,
        kind: str | None = "finetune",
        sweep_id: str | None = None,
    ) -> pd.DataFrame:
        """All runs matching the filters, newest first, one flat row each.

        JSON objects become dotted columns (``method_options.rank``, ``dataset.name``, ``train_config.lr``);
        lists and scalars stay as they are; timestamps stay UTC ISO strings. With no runs, the frame still has
        the `RUN_COLUMNS`.

        Args:
            status: One status or several.
            method: Method name.
            dataset: Dataset name (``dataset["name"]``, or ``dataset`` itself when it is a string).
            kind: ``finetune`` (the default), ``intrinsic_dim``, or None for every kind.
            sweep_id: Only the points of this sweep.

        Raises:
            ValueError: an unknown status.
        """
        clauses, params = [], []
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            bad = [s for s in statuses if s not in STATUSES]
            if bad:
                raise OptionError(f"unknown status {', '.join(map(repr, bad))}; statuses: {', '.join(STATUSES)}")
            clauses.append(f"status IN ({', '.join('?' * len(statuses))})")
            params += statuses
        if method is not None:
            clauses.append("method = ?")
            params.append(method)
        for column, value in (("kind", kind), ("sweep_id", sweep_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._read() as conn:
            rows = conn.execute(f"SELECT * FROM runs {where} ORDER BY created_at DESC, id DESC", params).fetchall()
        records = [_decode(row) for row in rows]
        if dataset is not None:
            records = [r for r in records if _dataset_name(r["dataset"]) == dataset]
        if not records:
            frame = pd.DataFrame(columns=[column.name for column in RUN_COLUMNS])
        else:
            frame = pd.DataFrame([_flatten(record) for record in records])
        # Numeric columns keep their kind when some (or all) runs lack a value: Int64 holds <NA>, float NaN.
        return frame.astype({c.name: _DTYPES[c.kind] for c in RUN_COLUMNS if c.kind in _DTYPES})

    def metrics(self, run_id: str, split: str | None = None, name: str | None = None) -> pd.DataFrame:
        """A run's metric history in long form: step, epoch, split, name, value, time (unix seconds), by step."""
        with self._read() as conn:
            clauses, params = ["run_id = ?"], [self._resolve(conn, run_id)]
            for column, value in (("split", split), ("name", name)):
                if value is not None:
                    clauses.append(f"{column} = ?")
                    params.append(value)
            rows = conn.execute(
                f"SELECT step, epoch, split, name, value, time FROM metrics WHERE {' AND '.join(clauses)} "
                "ORDER BY step, rowid",
                params,
            ).fetchall()
        frame = pd.DataFrame([tuple(row) for row in rows], columns=list(_METRIC_KEYS))
        return frame.astype({"step": "int64", "epoch": "float64", "value": "float64", "time": "float64"})

    def run_dir(self, run_id: str) -> Path:
        """The run's folder (created if missing, unless the store is read-only)."""
        path = self.runs_path / self.resolve(run_id)
        if not self.read_only:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def adapter_path(self, run_id: str) -> Path:
        """Where the run's adapter safetensors file belongs; the trainer writes it there."""
        return self.run_dir(run_id) / ADAPTER_FILE

    def export(self, path: Path | str) -> Path:
        """Write every run, flattened as in `list_runs`, to ``.csv`` or ``.parquet`` (by suffix); return the path.

        Lists, dicts and columns of mixed types are written as JSON text.

        Raises:
            ValueError: another suffix.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".csv", ".parquet"):
            raise OptionError(f"export writes .csv or .parquet files, not {path.name!r}")
        frame = _tabular(self.list_runs())
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
        return path


def _dataset_name(dataset: Any) -> Any:
    return dataset.get("name") if isinstance(dataset, dict) else dataset


def _duration(seconds: float) -> str:
    if math.isinf(seconds):
        return "ever"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------------------------------------
# Damage: check and rebuild
# ------------------------------------------------------------------------------------------------------------


@dataclass
class StoreCheck:
    """What `check_store` found.

    Attributes:
        root: The data folder.
        runs: Rows the index holds (0 when it cannot be read).
        damage: Problems that lose or hide runs or their files; each says what to do.
        notes: Findings that are not damage.
    """

    root: Path
    runs: int = 0
    damage: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damage


def check_store(root: Path | str | None = None) -> StoreCheck:
    """Look for damage without writing anything: SQLite's integrity check of ``runs.sqlite``, a lost index (missing or
    empty while run folders exist), rows without a folder, recorded adapter files that are missing, and folders
    without a row (orphans)."""
    root = Path(root).expanduser() if root is not None else default_root()
    db_path, runs_path = root / DB_NAME, root / RUNS_DIR
    report = StoreCheck(root)
    folders = _run_folders(runs_path)
    rebuild = f"`python -m core --home {root} runs rebuild`"
    if not db_path.is_file() or db_path.stat().st_size == 0:
        state = "is empty (0 bytes)" if db_path.exists() else "is missing"
        if folders:
            report.damage.append(f"the index {db_path} {state} but {len(folders)} run folder(s) exist: rebuild it")
        else:
            report.notes.append(f"no runs recorded in {root} yet")
        return report
    try:
        conn, wal_ignored = _connect_read_only(db_path)
        with contextlib.closing(conn):
            problems = [row[0] for row in conn.execute("PRAGMA integrity_check(20)")]
            version = _user_version(conn)
            rows = {row[0]: (row[1], row[2]) for row in conn.execute("SELECT id, status, adapter_file FROM runs")}
    except sqlite3.Error as exc:
        report.damage.append(f"{db_path} cannot be read ({exc}): rebuild it with {rebuild}")
        return report
    if wal_ignored:
        report.notes.append(f"{db_path} was read without its -wal file (read-only folder or full disk)")
    if problems != ["ok"]:
        report.damage.append(f"{db_path} fails SQLite's integrity check: {'; '.join(problems)}")
    if version != SCHEMA_VERSION:
        report.notes.append(f"schema version {version}; this PETLab writes version {SCHEMA_VERSION}")
    report.runs = len(rows)
    without_record = []
    for run_id, (status, adapter_file) in rows.items():
        folder = runs_path / run_id
        if not folder.is_dir():
            report.damage.append(f"run {run_id} ({status}) has no folder {folder}")
            continue
        if adapter_file and not (folder / adapter_file).is_file():
            report.damage.append(f"run {run_id} ({status}): its adapter file {folder / adapter_file} is missing")
        if not (folder / RECORD_FILE).is_file():
            without_record.append(run_id)
    for run_id, folder in folders.items():
        if run_id not in rows:
            restorable = (
                f"its {RECORD_FILE} lets {rebuild} restore it"
                if _read_record(folder) is not None
                else f"it has no readable {RECORD_FILE}, so a rebuild cannot restore it"
            )
            report.damage.append(f"folder {folder} has no row in the index (an orphan): {restorable}")
    if without_record:
        report.notes.append(
            f"{len(without_record)} run(s) have no {RECORD_FILE} (recorded before PETLab kept one): a rebuild "
            f"recovers them from {db_path} only while it can still be read, and writes their {RECORD_FILE}"
        )
    return report


@dataclass
class RebuildReport:
    """What `rebuild_store` recovered.

    Attributes:
        root: The data folder.
        from_index: Runs whose row came from the old ``runs.sqlite`` (it could still be read).
        from_records: Runs whose row came from their folder's ``run.json``.
        metric_rows: Metric history rows copied from the old ``runs.sqlite``.
        unrecovered: Run folders with neither a readable row nor a ``run.json``; left as they are.
        kept_aside: Where the old ``runs.sqlite`` (and its ``-wal`` / ``-shm``) went.
    """

    root: Path
    from_index: list[str] = dataclasses.field(default_factory=list)
    from_records: list[str] = dataclasses.field(default_factory=list)
    metric_rows: int = 0
    unrecovered: list[Path] = dataclasses.field(default_factory=list)
    kept_aside: list[Path] = dataclasses.field(default_factory=list)


def _salvage(db_path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, list[tuple]]]:
    """The rows and metric histories that can still be read from ``db_path``, by run id (empty when none)."""
    if not db_path.is_file() or db_path.stat().st_size == 0:
        return {}, {}
    rows: dict[str, dict[str, Any]] = {}
    metrics: dict[str, list[tuple]] = {}
    try:
        conn, _ = _connect_read_only(db_path)
    except sqlite3.Error:
        return {}, {}
    with contextlib.closing(conn):
        conn.row_factory = sqlite3.Row
        try:
            version = _user_version(conn)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{db_path} was written by a newer PETLab (schema version {version}); upgrade PETLab to rebuild it"
                )
            ids = [row[0] for row in conn.execute("SELECT id FROM runs")]
        except sqlite3.Error:
            return {}, {}
        for run_id in ids:  # one run at a time: a damaged page loses the runs on it, not all of them
            try:
                rows[run_id] = _decode(conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone())
                metrics[run_id] = [
                    tuple(row)
                    for row in conn.execute(
                        "SELECT run_id, step, epoch, split, name, value, time FROM metrics WHERE run_id = ? "
                        "ORDER BY rowid",
                        (run_id,),
                    )
                ]
            except sqlite3.Error:
                continue
    return rows, metrics


def rebuild_store(root: Path | str | None = None) -> RebuildReport:
    """Rebuild ``runs.sqlite`` from what survives, and move the old file aside (never deleting it).

    Each run's row comes from the old file where it can still be read, else from its folder's ``run.json``; metric
    histories come only from the old file (``run.json`` keeps a run's final metrics, in its row, not the history of
    every step). Every recovered run gets its ``run.json`` written afresh. The old file and its ``-wal`` / ``-shm``
    become ``runs.sqlite.before-rebuild-<UTC time>``. Stop every job on this store first: a writer that still has
    the old file open would keep writing to it.

    Raises:
        StoreError: the old file was written by a newer PETLab.
        NoSpace, NotWritable: the new file could not be written; the old one is then left where it was.
    """
    root = Path(root).expanduser() if root is not None else default_root()
    db_path, runs_path = root / DB_NAME, root / RUNS_DIR
    report = RebuildReport(root)
    rows, metrics = _salvage(db_path)
    report.from_index = sorted(rows)
    for run_id, folder in _run_folders(runs_path).items():
        if run_id in rows:
            continue
        record = _read_record(folder)
        if record is None:
            report.unrecovered.append(folder)
        else:
            rows[run_id] = record
            report.from_records.append(run_id)
    for row in rows.values():
        row.setdefault("kind", "finetune")  # a row of a schema-1 store (migration step 2)
    fresh = root / f"{DB_NAME}.rebuilding"
    kept = f"the index was not rebuilt; {db_path} was left where it was"
    try:
        root.mkdir(parents=True, exist_ok=True)
        fresh.unlink(missing_ok=True)  # what a rebuild that failed half-way left
        with contextlib.closing(sqlite3.connect(fresh, isolation_level=None)) as conn:
            migrate(conn)
            conn.execute("BEGIN")
            for row in rows.values():
                values = [
                    json.dumps(row.get(c.name), sort_keys=True)
                    if c.kind == "json" and row.get(c.name) is not None
                    else row.get(c.name)
                    for c in RUN_COLUMNS
                ]
                names = ", ".join(c.name for c in RUN_COLUMNS)
                conn.execute(f"INSERT INTO runs ({names}) VALUES ({', '.join('?' * len(RUN_COLUMNS))})", values)
            for history in metrics.values():
                conn.executemany(
                    "INSERT INTO metrics (run_id, step, epoch, split, name, value, time) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    history,
                )
                report.metric_rows += len(history)
            conn.execute("COMMIT")
        stamp = base = f"{DB_NAME}.before-rebuild-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        suffixes = ("", "-wal", "-shm")
        for number in itertools.count(2):  # never replace what an earlier rebuild kept aside
            if not any((root / f"{stamp}{suffix}").exists() for suffix in suffixes):
                break
            stamp = f"{base}-{number}"
        for suffix in suffixes:
            old = root / f"{DB_NAME}{suffix}"
            if old.exists():
                aside = root / f"{stamp}{suffix}"
                os.replace(old, aside)
                report.kept_aside.append(aside)
        os.replace(fresh, db_path)
    except (OSError, sqlite3.Error) as exc:
        problem = _storage_error(exc, root, kept)
        if problem is None:
            raise
        raise problem from exc
    store = RunStore(root)
    with store._write() as conn:
        for run_id in rows:
            store._save_record(conn, run_id)
    store.close()
    return report
