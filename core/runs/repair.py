"""Damage to a run store: `check_store` reports it, `rebuild_store` rebuilds the index from what survives.

Damage is never repaired silently: a ``runs.sqlite`` that SQLite cannot read, or one that is missing or empty while
run folders exist, makes opening a store raise `StoreDamaged` and is left as it is. `rebuild_store` rebuilds the
index from the run folders' ``run.json`` records (and whatever the old file still yields), keeping the old file
aside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.errors import StoreError
from core.runs import database, files, schema
from core.runs.store import RunStore


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
    root = Path(root).expanduser() if root is not None else files.default_root()
    db_path, runs_path = root / files.DB_NAME, root / files.RUNS_DIR
    report = StoreCheck(root)
    folders = files.run_folders(runs_path)
    rebuild = f"`python -m core --home {root} runs rebuild`"
    if not db_path.is_file() or db_path.stat().st_size == 0:
        state = "is empty (0 bytes)" if db_path.exists() else "is missing"
        if folders:
            report.damage.append(f"the index {db_path} {state} but {len(folders)} run folder(s) exist: rebuild it")
        else:
            report.notes.append(f"no runs recorded in {root} yet")
        return report
    try:
        conn, wal_ignored = database.connect_read_only(db_path)
        with contextlib.closing(conn):
            problems = [row[0] for row in conn.execute("PRAGMA integrity_check(20)")]
            version = schema.user_version(conn)
            rows = {row[0]: (row[1], row[2]) for row in conn.execute("SELECT id, status, adapter_file FROM runs")}
    except sqlite3.Error as exc:
        report.damage.append(f"{db_path} cannot be read ({exc}): rebuild it with {rebuild}")
        return report
    if wal_ignored:
        report.notes.append(f"{db_path} was read without its -wal file (read-only folder or full disk)")
    if problems != ["ok"]:
        report.damage.append(f"{db_path} fails SQLite's integrity check: {'; '.join(problems)}")
    if version != schema.SCHEMA_VERSION:
        report.notes.append(f"schema version {version}; this PETLab writes version {schema.SCHEMA_VERSION}")
    report.runs = len(rows)
    without_record = []
    for run_id, (status, adapter_file) in rows.items():
        folder = runs_path / run_id
        if not folder.is_dir():
            report.damage.append(f"run {run_id} ({status}) has no folder {folder}")
            continue
        if adapter_file and not (folder / adapter_file).is_file():
            report.damage.append(f"run {run_id} ({status}): its adapter file {folder / adapter_file} is missing")
        if not (folder / files.RECORD_FILE).is_file():
            without_record.append(run_id)
    for run_id, folder in folders.items():
        if run_id not in rows:
            restorable = (
                f"its {files.RECORD_FILE} lets {rebuild} restore it"
                if files.read_record(folder) is not None
                else f"it has no readable {files.RECORD_FILE}, so a rebuild cannot restore it"
            )
            report.damage.append(f"folder {folder} has no row in the index (an orphan): {restorable}")
    if without_record:
        report.notes.append(
            f"{len(without_record)} run(s) have no {files.RECORD_FILE} (recorded before PETLab kept one): a rebuild "
            f"recovers them from {db_path} only while it can still be read, and writes their {files.RECORD_FILE}"
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
        conn, _ = database.connect_read_only(db_path)
    except sqlite3.Error:
        return {}, {}
    with contextlib.closing(conn):
        conn.row_factory = sqlite3.Row
        try:
            version = schema.user_version(conn)
            if version > schema.SCHEMA_VERSION:
                raise StoreError(
                    f"{db_path} was written by a newer PETLab (schema version {version}); upgrade PETLab to rebuild it"
                )
            ids = [row[0] for row in conn.execute("SELECT id FROM runs")]
        except sqlite3.Error:
            return {}, {}
        for run_id in ids:  # one run at a time: a damaged page loses the runs on it, not all of them
            try:
                rows[run_id] = schema.decode(conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone())
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
    root = Path(root).expanduser() if root is not None else files.default_root()
    db_path, runs_path = root / files.DB_NAME, root / files.RUNS_DIR
    report = RebuildReport(root)
    rows, metrics = _salvage(db_path)
    report.from_index = sorted(rows)
    for run_id, folder in files.run_folders(runs_path).items():
        if run_id in rows:
            continue
        record = files.read_record(folder)
        if record is None:
            report.unrecovered.append(folder)
        else:
            rows[run_id] = record
            report.from_records.append(run_id)
    for row in rows.values():
        row.setdefault("kind", "finetune")  # a row of a schema-1 store (migration step 2)
    fresh = root / f"{files.DB_NAME}.rebuilding"
    kept = f"the index was not rebuilt; {db_path} was left where it was"
    try:
        root.mkdir(parents=True, exist_ok=True)
        fresh.unlink(missing_ok=True)  # what a rebuild that failed half-way left
        with contextlib.closing(sqlite3.connect(fresh, isolation_level=None)) as conn:
            schema.migrate(conn)
            conn.execute("BEGIN")
            for row in rows.values():
                values = [
                    json.dumps(row.get(c.name), sort_keys=True)
                    if c.kind == "json" and row.get(c.name) is not None
                    else row.get(c.name)
                    for c in schema.RUN_COLUMNS
                ]
                names = ", ".join(c.name for c in schema.RUN_COLUMNS)
                conn.execute(f"INSERT INTO runs ({names}) VALUES ({', '.join('?' * len(schema.RUN_COLUMNS))})", values)
            for history in metrics.values():
                conn.executemany(
                    "INSERT INTO metrics (run_id, step, epoch, split, name, value, time) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    history,
                )
                report.metric_rows += len(history)
            conn.execute("COMMIT")
        stamp = base = f"{files.DB_NAME}.before-rebuild-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        suffixes = ("", "-wal", "-shm")
        for number in itertools.count(2):  # never replace what an earlier rebuild kept aside
            if not any((root / f"{stamp}{suffix}").exists() for suffix in suffixes):
                break
            stamp = f"{base}-{number}"
        for suffix in suffixes:
            old = root / f"{files.DB_NAME}{suffix}"
            if old.exists():
                aside = root / f"{stamp}{suffix}"
                os.replace(old, aside)
                report.kept_aside.append(aside)
        os.replace(fresh, db_path)
    except (OSError, sqlite3.Error) as exc:
        problem = database.storage_problem(exc, root, kept)
        if problem is None:
            raise
        raise problem from exc
    store = RunStore(root)
    with store._write() as conn:
        for run_id in rows:
            store._save_record(conn, run_id)
    store.close()
    return report
