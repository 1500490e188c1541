"""`RunStore`: the runs, their metric histories and their files, written and read through one API.

Every method taking a run id also takes a unique prefix of one, like git.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import socket
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from core.errors import OptionError, PetlabError
from core.runs import database, files, schema
from core.runs.base import STALE_AFTER_S, RunStoreBase


class RunNotFoundError(PetlabError, KeyError):
    """No run has this id, nor an id starting with it."""


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


class RunStore(RunStoreBase):
    """Runs, their metric histories and their files under one data folder.

    One instance may be shared by threads: each thread (and each process after a fork) opens its own connection
    on first use. Every method taking ``run_id`` accepts a unique prefix of one.
    """

    @classmethod
    def open(
        cls, root: Path | str | None = None, stale_after_s: float = STALE_AFTER_S, read_only: bool = False
    ) -> RunStore:
        """Same as ``RunStore(root, stale_after_s, read_only)``."""
        return cls(root, stale_after_s, read_only)

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        columns = {column.name: column for column in schema.RUN_COLUMNS}
        unknown = sorted(set(fields) - set(columns))
        if unknown:
            allowed = ", ".join(c.name for c in schema.RUN_COLUMNS if not c.system)
            raise ValueError(f"unknown run field(s) {', '.join(unknown)} in {action}; known fields: {allowed}")
        system = sorted(name for name in fields if columns[name].system)
        if system:
            raise ValueError(
                f"field(s) {', '.join(system)} are set by the run store, not by {action} "
                "(status changes go through create_run, start_run and finish_run)"
            )
        return {name: schema.encode(columns[name], value) for name, value in fields.items()}

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
        if status not in schema.ACTIVE_STATUSES:
            raise ValueError(f"a new run is 'running' or 'queued', not {status!r}; use finish_run to end it")
        values = self._fields({"versions": package_versions(), "kind": "finetune", **record}, "create_run")
        if values["kind"] not in schema.KINDS:
            raise ValueError(f"a run's kind is one of {', '.join(schema.KINDS)}, not {values['kind']!r}")
        now = schema.utc_now()
        values |= {"created_at": now, "status": status, "pid": os.getpid()}
        values |= {"hostname": socket.gethostname(), "heartbeat_at": now}
        for _ in range(10):
            values["id"] = files.new_run_id()
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
        now = schema.utc_now()
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
        now = schema.utc_now()
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
        values = self._fields(fields, "update_run") | {"heartbeat_at": schema.utc_now()}
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
        if status not in schema.FINISHED_STATUSES:
            raise ValueError(f"a run finishes as one of {', '.join(schema.FINISHED_STATUSES)}, not {status!r}")
        values = self._fields({"message": message, **fields}, "finish_run")
        now = schema.utc_now()
        values |= {"status": status, "finished_at": now, "heartbeat_at": now}
        with self._write() as conn:
            run_id = self._resolve(conn, run_id)
            current = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
            if current not in (*schema.ACTIVE_STATUSES, "interrupted"):
                raise ValueError(f"run {run_id} already ended as {current}; it cannot finish again as {status}")
            if (self.runs_path / run_id / files.ADAPTER_FILE).is_file():
                values["adapter_file"] = files.ADAPTER_FILE
            assignments = ", ".join(f"{name} = ?" for name in values)
            conn.execute(f"UPDATE runs SET {assignments} WHERE id = ?", [*values.values(), run_id])
            self._save_record(conn, run_id)

    def heartbeat(self, run_id: str) -> None:
        """Record that the run's writer is alive (also done by `update_run` and `log_metrics`)."""
        with self._write() as conn:
            self._touch(conn, self._resolve(conn, run_id))

    def log_metrics(self, run_id: str, rows: Iterable[Mapping[str, Any]], steps: int | None = None) -> None:
        """Append metric rows in one transaction and refresh the heartbeat.

        Args:
            run_id: The run.
            rows: Dicts with ``step`` (int), ``split`` (e.g. train / val / test), ``name`` (e.g. loss / acc / lr),
                ``value`` (float; NaN is kept, it reads back as NaN), optionally ``epoch`` (may be fractional)
                and ``time`` (unix seconds; default now).
            steps: The run's progress, its ``steps`` field, set in the same transaction (a training loop's one
                write per batch of metrics). Unlike `update_run`, this does not rewrite the run's record file,
                which its next `update_run` or `finish_run` brings up to date.

        Raises:
            ValueError: a row with missing or unknown keys, or values of the wrong type.
        """
        now = time.time()
        records = [schema.metric_record(index, row, now) for index, row in enumerate(rows)]
        progress = {} if steps is None else self._fields({"steps": steps}, "log_metrics")
        with self._write() as conn:
            run_id = self._resolve(conn, run_id)
            conn.executemany(
                "INSERT INTO metrics (run_id, step, epoch, split, name, value, time) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(run_id, *record) for record in records],
            )
            if progress:
                conn.execute("UPDATE runs SET steps = ? WHERE id = ?", (progress["steps"], run_id))
            self._touch(conn, run_id)

    def write_adapter(self, run_id: str, data: bytes) -> Path:
        """Store a run's adapter file from its bytes (what a worker on another node sends back), atomically.

        Raises:
            NoSpace, NotWritable: the file could not be written; nothing of it is left, the run's record is kept.
        """
        path = self.adapter_path(run_id)
        kept = f"the adapter of run {path.parent.name} was not saved (no partial file is left); its record is kept"
        try:
            files.write_atomically(path, data)
        except OSError as exc:
            problem = database.storage_problem(exc, path.parent, kept)
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
        folder = self.run_dir(run_id) / files.SNAPSHOT_DIR
        folder.mkdir(exist_ok=True)
        path = folder / f"step-{int(step)}.safetensors"
        files.write_atomically(path, data)
        return path

    def snapshot_paths(self, run_id: str) -> dict[int, Path]:
        """The run's adapter snapshots by training step, in step order (empty when it kept none)."""
        folder = self.run_dir(run_id) / files.SNAPSHOT_DIR
        found = {int(p.stem.removeprefix("step-")): p for p in folder.glob("step-*.safetensors")}
        return dict(sorted(found.items()))

    def delete_run(self, run_id: str, force: bool = False) -> None:
        """Delete a run's row, its metrics and its folder.

        Raises:
            ValueError: the run is queued or running and ``force`` is False (cancel it first).
        """
        with self._write() as conn:
            run_id = self._resolve(conn, run_id)
            status = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
            if status in schema.ACTIVE_STATUSES and not force:
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
        return schema.decode(row)

    def statuses(self, run_ids: Iterable[str]) -> dict[str, str]:
        """Full run id -> status of each of ``run_ids`` still in the store (full ids; unknown ones are left out),
        in one read: what a watcher of many runs polls instead of reading each whole record."""
        ids = list(run_ids)
        found: dict[str, str] = {}
        with self._read() as conn:
            for start in range(0, len(ids), 500):  # SQLite's limit on parameters is 999 on older builds
                chunk = ids[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                found |= dict(conn.execute(f"SELECT id, status FROM runs WHERE id IN ({marks})", chunk).fetchall())
        return found

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
            bad = [s for s in statuses if s not in schema.STATUSES]
            if bad:
                raise OptionError(f"unknown status {', '.join(map(repr, bad))}; statuses: {', '.join(schema.STATUSES)}")
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
        records = [schema.decode(row) for row in rows]
        if dataset is not None:
            records = [r for r in records if _dataset_name(r["dataset"]) == dataset]
        if not records:
            frame = pd.DataFrame(columns=[column.name for column in schema.RUN_COLUMNS])
        else:
            frame = pd.DataFrame([schema.flatten(record) for record in records])
        # Numeric columns keep their kind when some (or all) runs lack a value: Int64 holds <NA>, float NaN.
        return frame.astype({c.name: schema.DTYPES[c.kind] for c in schema.RUN_COLUMNS if c.kind in schema.DTYPES})

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
        frame = pd.DataFrame([tuple(row) for row in rows], columns=list(schema.METRIC_KEYS))
        return frame.astype({"step": "int64", "epoch": "float64", "value": "float64", "time": "float64"})

    def run_dir(self, run_id: str) -> Path:
        """The run's folder (created if missing, unless the store is read-only)."""
        path = self.runs_path / self.resolve(run_id)
        if not self.read_only:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def adapter_path(self, run_id: str) -> Path:
        """Where the run's adapter safetensors file belongs; the trainer writes it there."""
        return self.run_dir(run_id) / files.ADAPTER_FILE

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
        frame = schema.tabular(self.list_runs())
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
        return path


def _dataset_name(dataset: Any) -> Any:
    return dataset.get("name") if isinstance(dataset, dict) else dataset
