"""Opening a run store: its folders and schema, per-thread SQLite connections, write transactions, and the
recovery of runs whose writer died. `core.runs.store.RunStore` builds its reading and writing API on this.

Each write is one short ``BEGIN IMMEDIATE`` transaction (the lock is taken up front, so two writers never deadlock
upgrading a read lock), and connections are per thread and per process (a sqlite3 connection must not cross
threads, nor survive a ``fork``).

A run whose process died stays ``running`` in the table; the next store opened anywhere on the same folder calls
`RunStoreBase.recover`, which marks it ``interrupted`` (its metrics and files stay).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sqlite3
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from core.errors import PetlabError, StoreDamaged, StoreError
from core.runs import database, files, schema

STALE_AFTER_S = 1800.0
"""A ``running`` run whose heartbeat is older than this is taken for dead, even where its pid cannot be checked
(another host). Generous on purpose: the trainer should heartbeat during long evaluations too, and a live run
wrongly marked ``interrupted`` returns to ``running`` at its next `RunStore.heartbeat` or `RunStore.log_metrics`."""


class RunStoreBase:
    """A run store's data folder, opened: connections, transactions and recovery, without the runs API."""

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
        self.root = Path(root).expanduser() if root is not None else files.default_root()
        self.db_path = self.root / files.DB_NAME
        self.runs_path = self.root / files.RUNS_DIR
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
            version = schema.user_version(self._conn())
            if read_only:
                self._check_readable_version(version)
            else:
                schema.migrate(self._conn())
                self.recover()

    def _refuse_lost_index(self) -> None:
        """Raise `StoreDamaged` when ``runs.sqlite`` is missing or empty but run folders exist: opening would make
        a fresh, empty index and every run would vanish from the list."""
        if self.db_path.is_file() and self.db_path.stat().st_size > 0:
            return
        folders = files.run_folders(self.runs_path)
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
        if version == schema.SCHEMA_VERSION or self._empty():
            return
        if version > schema.SCHEMA_VERSION:
            raise StoreError(
                f"the run store {self.db_path} has schema version {version} but this PETLab knows versions up to "
                f"{schema.SCHEMA_VERSION}; upgrade PETLab"
            )
        raise StoreError(
            f"the run store {self.db_path} has schema version {version} and needs an upgrade to version "
            f"{schema.SCHEMA_VERSION}, which a read-only open does not make: run any command that writes (e.g. "
            f"`python -m core --home {self.root} runs list`) once the folder is writable and has free space"
        )

    def _empty(self) -> bool:
        """Whether there is no database file yet (or a 0-byte one), which a read-only open reads as no runs."""
        return not self.db_path.is_file() or self.db_path.stat().st_size == 0

    # ----------------------------------------------------------------------------------------- connections

    @staticmethod
    def _wal(conn: sqlite3.Connection) -> str:
        """Switch to WAL mode (it persists in the file). Switching needs an exclusive lock and SQLite may answer
        "database is locked" at once, without its busy handler, while another process creates the same new file:
        retry until `BUSY_TIMEOUT_S`."""
        deadline = time.monotonic() + database.BUSY_TIMEOUT_S
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
            conn = sqlite3.connect(self.db_path, timeout=database.BUSY_TIMEOUT_S, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(database.BUSY_TIMEOUT_S * 1000)}")
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
            schema.migrate(conn)
            return conn
        conn, self.wal_ignored = database.connect_read_only(self.db_path)
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
            code = database.sqlite_code(exc) if isinstance(exc, sqlite3.Error) else None
            if code in (database.SQLITE_CODE["SQLITE_CORRUPT"], database.SQLITE_CODE["SQLITE_NOTADB"]):
                raise self._damaged(str(exc)) from exc
            problem = database.storage_problem(exc, self.root, consequence)
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
        record = {"schema_version": schema.SCHEMA_VERSION, "run": schema.decode(row)}
        files.write_atomically(folder / files.RECORD_FILE, json.dumps(record, indent=1, sort_keys=True).encode())

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends); the store stays usable."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    # ------------------------------------------------------------------------------ heartbeats and recovery

    def _touch(self, conn: sqlite3.Connection, run_id: str) -> None:
        """Refresh the heartbeat; a run of this very process that `recover` took for dead runs again."""
        revive = "status = 'interrupted' AND pid = :pid AND hostname = :host"
        conn.execute(
            f"UPDATE runs SET heartbeat_at = :now, "
            f"status = CASE WHEN {revive} THEN 'running' ELSE status END, "
            f"message = CASE WHEN {revive} THEN NULL ELSE message END, "
            f"finished_at = CASE WHEN {revive} THEN NULL ELSE finished_at END "
            "WHERE id = :id",
            {"now": schema.utc_now(), "pid": os.getpid(), "host": socket.gethostname(), "id": run_id},
        )

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
                    (message, schema.utc_now(), run_id, status, beat),
                )
                if cursor.rowcount:
                    self._save_record(conn, run_id)
                    recovered.append(run_id)
        return recovered


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


def _duration(seconds: float) -> str:
    if math.isinf(seconds):
        return "ever"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
