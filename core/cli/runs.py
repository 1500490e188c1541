"""``runs``: list, show, cancel, wait for, export or delete recorded runs; check the store for damage, rebuild it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.cli.follow import follow_run
from core.errors import NoSpace, NotWritable

if TYPE_CHECKING:
    from core.runs import RunStore


def add_parsers(commands: Any) -> None:
    """The ``runs`` command and its subcommands. ``commands`` holds the subcommands of ``python -m core``."""
    parser = commands.add_parser("runs", help="list, show, cancel, wait for, export or delete runs")
    runs_cmd = parser.add_subparsers(dest="runs_command", required=True)
    list_runs = runs_cmd.add_parser("list", help="one line per run, newest first")
    list_runs.add_argument("--status", default=None)
    list_runs.add_argument("--method", default=None)
    list_runs.add_argument(
        "--kind", default="finetune", choices=("finetune", "intrinsic_dim", "all"), help="(default: finetune)"
    )
    list_runs.add_argument("--json", action="store_true", help="every run as one JSON list")
    cancel = runs_cmd.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("run_id")
    wait = runs_cmd.add_parser("wait", help="wait until a job ends; exit 0 if it completed")
    wait.add_argument("run_id")
    wait.add_argument("--timeout", type=float, default=None, help="seconds (default: no limit)")
    show = runs_cmd.add_parser("show", help="everything recorded for one run")
    show.add_argument("run_id", help="a run id or a unique prefix of one")
    export = runs_cmd.add_parser("export", help="all runs to .csv or .parquet")
    export.add_argument("path", type=Path)
    delete = runs_cmd.add_parser("delete", help="a run, its metrics and its files")
    delete.add_argument("run_id")
    runs_cmd.add_parser(
        "check",
        help="look for damage (writes nothing); exit 1 if any",
        description="SQLite's integrity check of runs.sqlite, rows without a run folder, missing adapter files and "
        "run folders without a row. Writes nothing.",
    )
    runs_cmd.add_parser(
        "rebuild",
        help="rebuild the store from the run folders, keeping the old file aside",
        description="Rebuild runs.sqlite from the run folders' run.json records and whatever the old file still "
        "yields (rows, metric histories); the old file is moved aside, never deleted. Stop every job first.",
    )


def runs(ns: argparse.Namespace) -> int:
    import pandas as pd

    from core.jobs import wait
    from core.runs import RunStore

    if ns.runs_command in ("check", "rebuild"):
        return _check(ns.home) if ns.runs_command == "check" else _rebuild(ns.home)
    reading = ns.runs_command in ("list", "show", "export")
    store = reading_store(ns.home) if reading else RunStore(ns.home)
    if ns.runs_command == "list":
        kind = None if ns.kind == "all" else ns.kind
        if ns.json:
            print(json.dumps(_runs_json(store, store.list_runs(status=ns.status, method=ns.method, kind=kind))))
            return 0
        table = store.list_runs(status=ns.status, method=ns.method, kind=kind)
        if table.empty:
            print(f"no runs in {store.root}")
            return 0
        cols = [
            c
            for c in (
                "id",
                "kind",
                "status",
                "method",
                "dataset.name",
                "trainable_params",
                "best_val_acc",
                "test_acc",
                "wall_time_s",
                "label",
            )
            if c in table.columns
        ]
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(table[cols].to_string(index=False))
    elif ns.runs_command == "show":
        print(json.dumps(store.get_run(ns.run_id), indent=2, default=str))
    elif ns.runs_command == "cancel":
        run_id = store.resolve(ns.run_id)
        status = store.request_cancel(run_id)
        if status == "running":
            print(f"run {run_id}: cancel requested; it stops before its next training step", flush=True)
            status = wait(store, run_id, timeout=120)["status"]
        print(f"run {run_id}: {status}")
    elif ns.runs_command == "wait":
        run = follow_run(store, store.resolve(ns.run_id)) if ns.timeout is None else wait(store, ns.run_id, ns.timeout)
        print(f"run {run['id']}: {run['status']}: {run['message']}")
        return 0 if run["status"] == "completed" else 1
    elif ns.runs_command == "export":
        print(f"wrote {store.export(ns.path)}")
    elif ns.runs_command == "delete":
        run_id = store.resolve(ns.run_id)
        store.delete_run(run_id)
        print(f"deleted run {run_id}")
    return 0


def reading_store(home: Path | None) -> RunStore:
    """The run store for a command that only reads: opened for writing where it can be (so that runs whose
    process died are marked interrupted), else read-only, with a note on stderr (a full disk, a read-only folder).
    """
    from core.runs import RunStore

    try:
        return RunStore(home)
    except (NoSpace, NotWritable) as exc:
        store = RunStore(home, read_only=True)
        note = f"note: reading the run store read-only ({exc.args[0].partition(':')[0]})"
        note += "; runs whose process died may still show as running"
        if store.wal_ignored:
            note += f", and the last changes (still in {store.db_path.name}-wal) are not shown"
        print(note, file=sys.stderr, flush=True)
        return store


def _check(home: Path | None) -> int:
    from core.runs import check_store

    report = check_store(home)
    print(f"run store {report.root}: {report.runs} run(s) indexed")
    for title, lines in (("damage", report.damage), ("notes", report.notes)):
        if lines:
            print(f"{title}:")
            print("\n".join(f"  - {line}" for line in lines))
    print("no damage found" if report.ok else f"{len(report.damage)} problem(s) found")
    return 0 if report.ok else 1


def _rebuild(home: Path | None) -> int:
    from core.runs import DB_NAME, RECORD_FILE, rebuild_store

    report = rebuild_store(home)
    runs = len(report.from_index) + len(report.from_records)
    print(
        f"rebuilt {report.root / DB_NAME}: {runs} run(s), {len(report.from_index)} from the old index and "
        f"{len(report.from_records)} from their {RECORD_FILE}; {report.metric_rows} metric history rows kept"
    )
    if report.from_records:
        print(
            f"  runs recovered from {RECORD_FILE} keep their final metrics (best_val_acc, test_acc, steps, ...) but "
            "no metric history: the history lived only in the old index"
        )
    for path in report.kept_aside:
        print(f"  kept aside: {path}")
    for folder in report.unrecovered:
        print(f"  not recovered (no row and no readable {RECORD_FILE}; left as it is): {folder}")
    return 1 if report.unrecovered else 0


def _runs_json(store: RunStore, table: Any) -> list[dict[str, Any]]:
    """Every listed run as a JSON-ready dict: its record, and its queue position while it is queued."""
    runs = []
    for run_id in table["id"]:
        run = store.get_run(run_id)
        run["queue_position"] = store.queue_position(run_id)
        runs.append(json.loads(json.dumps(run, default=str)))
    return runs


COMMANDS = {"runs": runs}
