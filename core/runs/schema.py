"""The run store's tables and the shape of their values: the columns of ``runs`` and their migration, the
``metrics`` table and its rows, how field values are stored (JSON fields as text, timestamps as UTC ISO strings),
and a run as a flat table row.

To add a column, append it to `RUN_COLUMNS` with ``since`` set to a new `SCHEMA_VERSION`: `migrate` adds it to
older databases.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import operator
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from core.errors import StoreError
from core.runs import files

STATUSES = ("queued", "running", "completed", "cancelled", "diverged", "failed", "interrupted")
ACTIVE_STATUSES = ("queued", "running")
FINISHED_STATUSES = ("completed", "cancelled", "diverged", "failed", "interrupted")


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

METRICS_DDL = """
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
DTYPES = {"int": "Int64", "real": "float64"}
METRIC_KEYS = ("step", "epoch", "split", "name", "value", "time")

MIGRATION_STEPS: dict[int, Callable[[sqlite3.Connection], None]] = {
    2: lambda conn: conn.execute("UPDATE runs SET kind = 'finetune' WHERE kind IS NULL"),
}
"""Data changes beyond added columns, by the version they lead to."""


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the database behind ``conn`` (autocommit mode) to `SCHEMA_VERSION`, in one write transaction.

    A fresh file gets every table; an older one gets the columns added since its version, then the data steps.

    Raises:
        StoreError: (a RuntimeError) the database was written by a newer PETLab (a higher schema version).
    """
    if user_version(conn) == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = user_version(conn)  # again, under the lock: another process may have migrated meanwhile
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"this run store has schema version {version} but this PETLab knows versions up to "
                f"{SCHEMA_VERSION}; upgrade PETLab, or point ${files.HOME_ENV} at another folder"
            )
        if version == SCHEMA_VERSION:
            pass  # another process migrated while this one waited for the lock
        elif version == 0:
            columns = ",\n    ".join(column.ddl for column in RUN_COLUMNS)
            conn.execute(f"CREATE TABLE IF NOT EXISTS runs (\n    {columns}\n)")
            for statement in METRICS_DDL.split(";"):
                if statement.strip():
                    conn.execute(statement)
        else:
            existing = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for column in RUN_COLUMNS:
                    if column.since == target and column.name not in existing:
                        conn.execute(f"ALTER TABLE runs ADD COLUMN {column.ddl}")
                if target in MIGRATION_STEPS:
                    MIGRATION_STEPS[target](conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def utc_now() -> str:
    """The current time as the table stores it: UTC ISO, to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


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


def encode(column: Column, value: Any) -> Any:
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


def decode(row: sqlite3.Row) -> dict[str, Any]:
    kinds = {column.name: column.kind for column in RUN_COLUMNS}
    record = dict(row)
    for name, value in record.items():
        if kinds.get(name) == "json" and value is not None:
            record[name] = json.loads(value)
    return record


def metric_record(index: int, row: Mapping[str, Any], now: float) -> tuple:
    """Metric row number ``index`` as the metrics table stores it (step, epoch, split, name, value, time); ``now``
    is its time when it has none. ValueError naming the row when keys are missing or unknown, or values do not fit."""
    missing = [key for key in ("step", "split", "name", "value") if key not in row]
    unknown = sorted(set(row) - set(METRIC_KEYS))
    if missing or unknown:
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"unknown {', '.join(unknown)}"] if unknown else []
        raise ValueError(
            f"metric row {index} {dict(row)!r}: {'; '.join(problems)} "
            f"(keys: {', '.join(METRIC_KEYS)}; step, split, name and value are required)"
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
    return record


def flatten(record: Mapping[str, Any]) -> dict[str, Any]:
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


def tabular(frame: pd.DataFrame) -> pd.DataFrame:
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
