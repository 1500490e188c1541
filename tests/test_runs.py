"""Tests of core.runs: round trips, refusals, id prefixes, concurrent writer processes, recovery, migration."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from core import runs as R
from core.errors import StoreDamaged, StoreError
from core.runs import RunNotFoundError, RunStore, schema

REPO = Path(__file__).resolve().parents[1]

RECORD = dict(
    method="lora",
    method_options={"rank": 8, "alpha": 16.0},
    backbone={"name": "vit_small_patch14_dinov2", "img_size": 28},
    weights={"source": "none", "description": "random initialisation", "mean": [0.5, 0.5, 0.5]},
    dataset={"name": "digits", "img_size": 28, "n_train": 100},
    normalization="half",
    seed=3,
    train_config={"lr": 1e-3, "epochs": 2},
    label="first",
    tags="smoke,cpu",
)


def _sql(root: Path, query: str, params: tuple = ()) -> list[tuple]:
    """Run one statement on the store's database with a separate plain connection."""
    with closing(sqlite3.connect(root / R.DB_NAME, timeout=10, isolation_level=None)) as conn:
        return conn.execute(query, params).fetchall()


def _values(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as plain objects with None for every kind of missing value."""
    return frame.astype(object).where(frame.notna(), None)


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# ------------------------------------------------------------------------------------------------------------
# Places and schema
# ------------------------------------------------------------------------------------------------------------


def test_default_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PETLAB_HOME", str(tmp_path / "home"))
    assert R.default_root() == tmp_path / "home"
    monkeypatch.delenv("PETLAB_HOME")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
        assert R.default_root() == tmp_path / "xdg" / "petlab"
        monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
        assert R.default_root() == Path.home() / ".local" / "share" / "petlab"


def test_new_store_makes_folders_schema_and_wal(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "data")
    assert (tmp_path / "data" / "runs.sqlite").is_file() and (tmp_path / "data" / "runs").is_dir()
    assert _sql(store.root, "PRAGMA journal_mode") == [("wal",)]
    assert _sql(store.root, "PRAGMA user_version") == [(R.SCHEMA_VERSION,)]
    columns = [row[1] for row in _sql(store.root, "PRAGMA table_info(runs)")]
    assert columns == [column.name for column in R.RUN_COLUMNS]
    assert store._conn().execute("PRAGMA busy_timeout").fetchone()[0] == 10_000
    RunStore(store.root)  # opening again is harmless


# ------------------------------------------------------------------------------------------------------------
# One run, end to end
# ------------------------------------------------------------------------------------------------------------


def test_create_update_finish_round_trip(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    run_id = store.create_run(RECORD)
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", run_id)
    assert store.run_dir(run_id) == tmp_path / "runs" / run_id and store.run_dir(run_id).is_dir()

    run = store.get_run(run_id)
    for key, value in RECORD.items():
        assert run[key] == value, key  # JSON fields come back decoded
    assert run["status"] == "running" and run["finished_at"] is None
    assert run["pid"] == os.getpid() and run["hostname"] == socket.gethostname()
    assert set(run["versions"]) == {"python", "torch", "timm", "petlab"} and run["versions"]["torch"]
    created = datetime.fromisoformat(run["created_at"])
    assert created.tzinfo is not None and abs((datetime.now(timezone.utc) - created).total_seconds()) < 60

    time.sleep(0.01)
    store.update_run(run_id, steps=40, best_val_acc=0.625, message="epoch 1 of 2")
    run = store.get_run(run_id)
    assert (run["steps"], run["best_val_acc"], run["message"]) == (40, 0.625, "epoch 1 of 2")
    assert run["heartbeat_at"] > run["created_at"]

    store.adapter_path(run_id).write_bytes(b"not really safetensors")
    store.finish_run(
        run_id,
        "completed",
        steps=80,
        test_acc=0.5,
        trainable_params=1234,
        trainable_params_with_head=1564,
        wall_time_s=12.5,
        steps_per_s=6.4,
        peak_memory_bytes=2**30,
        device="cpu",
    )
    run = store.get_run(run_id)
    assert run["status"] == "completed" and run["message"] is None and run["finished_at"] >= run["created_at"]
    assert (run["steps"], run["test_acc"], run["trainable_params"], run["peak_memory_bytes"]) == (80, 0.5, 1234, 2**30)
    assert run["adapter_file"] == "adapter.safetensors"
    assert store.adapter_path(run_id) == tmp_path / "runs" / run_id / "adapter.safetensors"
    with pytest.raises(ValueError, match="already ended as completed"):
        store.finish_run(run_id, "failed", message="late error")


def test_queued_run_starts_later_and_diverged_message_is_kept(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    run_id = store.create_run({"method": "fact"}, status="queued")
    assert store.get_run(run_id)["status"] == "queued"
    store.start_run(run_id)
    assert store.get_run(run_id)["status"] == "running"
    with pytest.raises(ValueError, match="is running, not queued"):
        store.start_run(run_id)
    message = "diverged at step 41: loss is nan; try a lower learning rate"
    store.finish_run(run_id, "diverged", message, steps=41)
    run = store.get_run(run_id)
    assert (run["status"], run["message"], run["steps"], run["adapter_file"]) == ("diverged", message, 41, None)
    with pytest.raises(FileNotFoundError, match="no adapter file"):
        store.record_adapter(run_id)
    store.adapter_path(run_id).write_bytes(b"x")
    assert store.record_adapter(run_id).name == "adapter.safetensors"
    assert store.get_run(run_id)["adapter_file"] == "adapter.safetensors"


def test_unknown_fields_bad_values_and_statuses_are_refused(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    with pytest.raises(ValueError, match=r"unknown run field\(s\) colour in create_run; known fields: message"):
        store.create_run({"method": "lora", "colour": "red"})
    with pytest.raises(ValueError, match="'running' or 'queued', not 'completed'"):
        store.create_run({"method": "lora"}, status="completed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"field 'seed' takes int values, got 'three'"):
        store.create_run({"seed": "three"})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        store.create_run({"train_config": {"callback": object()}})
    assert len(store.list_runs()) == 0  # no half-made rows

    run_id = store.create_run({"method": "lora"})
    with pytest.raises(ValueError, match=r"status are set by the run store.*finish_run"):
        store.update_run(run_id, status="completed")
    with pytest.raises(ValueError, match="unknown run field"):
        store.update_run(run_id, best_val=0.5)
    with pytest.raises(ValueError, match="takes text"):
        store.update_run(run_id, label=3)
    with pytest.raises(ValueError, match="not 'done'"):
        store.finish_run(run_id, "done")
    assert store.get_run(run_id)["status"] == "running"


def test_run_ids_accept_unique_prefixes_and_refuse_clearly(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    first, second = store.create_run({"label": "a"}), store.create_run({"label": "b"})
    common = os.path.commonprefix([first, second])
    assert common  # both start with the year
    assert store.get_run(first[: len(common) + 1])["label"] == "a"
    assert store.resolve(second[: len(common) + 1]) == second
    with pytest.raises(
        ValueError, match=f"prefix '{common}' is ambiguous: it matches {min(first, second)}, {max(first, second)}"
    ):
        store.get_run(common)
    with pytest.raises(RunNotFoundError, match="no run with id '1999'") as info:
        store.update_run("1999", steps=1)
    assert isinstance(info.value, KeyError)
    with pytest.raises(KeyError):
        store.metrics("zzz")
    with pytest.raises(ValueError, match="non-empty string"):
        store.get_run("")


# ------------------------------------------------------------------------------------------------------------
# Metrics, listing, deleting, exporting
# ------------------------------------------------------------------------------------------------------------


def test_metrics_round_trip_in_batches(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    run_id = store.create_run({"method": "lora"})
    rows = [dict(step=s, epoch=s / 4, split="train", name="loss", value=2.0 - s / 10) for s in range(10)]
    rows[7]["value"] = math.nan  # a diverging loss is recorded, not dropped
    rows.append(dict(step=9, epoch=2, split="val", name="acc", value=0.75, time=1.5e9))
    for start in range(0, len(rows), 4):
        store.log_metrics(run_id[:12], rows[start : start + 4], steps=start + 4)
    assert store.get_run(run_id)["steps"] == 12  # the progress of the last batch, written with it

    frame = store.metrics(run_id)
    assert list(frame.columns) == ["step", "epoch", "split", "name", "value", "time"]
    assert frame["step"].tolist() == list(range(10)) + [9]
    assert frame["epoch"].tolist() == [s / 4 for s in range(10)] + [2.0]
    expected = [2.0 - s / 10 for s in range(10)] + [0.75]
    assert all(math.isnan(v) if i == 7 else v == expected[i] for i, v in enumerate(frame["value"]))
    assert frame["time"].iloc[-1] == 1.5e9 and abs(frame["time"].iloc[0] - time.time()) < 60
    val = store.metrics(run_id, split="val")
    assert (len(val), val["name"].iloc[0], val["value"].iloc[0]) == (1, "acc", 0.75)
    assert len(store.metrics(run_id, split="train", name="acc")) == 0

    with pytest.raises(ValueError, match=r"metric row 1 .*missing split, name, value"):
        store.log_metrics(run_id, [dict(step=10, split="train", name="loss", value=1.0), dict(step=10)])
    with pytest.raises(ValueError, match="unknown colour"):
        store.log_metrics(run_id, [dict(step=10, split="train", name="loss", value=1.0, colour="red")])
    with pytest.raises(ValueError, match="metric row 0"):
        store.log_metrics(run_id, [dict(step=1.5, split="train", name="loss", value=1.0)])
    with pytest.raises(ValueError, match="non-empty strings"):
        store.log_metrics(run_id, [dict(step=1, split="", name="loss", value=1.0)])
    with pytest.raises(ValueError, match="steps"):
        store.log_metrics(run_id, [dict(step=13, split="train", name="loss", value=1.0)], steps="thirteen")
    assert len(store.metrics(run_id)) == 11  # a bad batch inserts nothing
    assert store.get_run(run_id)["steps"] == 12
    assert len(store.metrics(store.create_run({}))) == 0


def test_list_runs_filters_flattens_and_orders_newest_first(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    assert list(store.list_runs().columns) == [column.name for column in R.RUN_COLUMNS]
    ids = []
    for method, dataset, rank in [("lora", "digits", 4), ("fact", "count", 8), ("lora", "count", 16)]:
        ids.append(store.create_run({"method": method, "dataset": {"name": dataset}, "method_options": {"rank": rank}}))
        time.sleep(0.005)  # distinct created_at milliseconds
    store.finish_run(ids[0], "completed", best_val_acc=0.9)

    frame = store.list_runs()
    assert frame["id"].tolist() == ids[::-1]
    assert frame["method_options.rank"].tolist() == [16, 8, 4]
    assert frame["dataset.name"].tolist() == ["count", "count", "digits"]
    assert frame["best_val_acc"].dtype == "float64" and frame["best_val_acc"].iloc[2] == 0.9
    assert frame["best_val_acc"].iloc[:2].isna().all() and str(frame["steps"].dtype) == "Int64"
    assert store.list_runs(method="lora")["id"].tolist() == [ids[2], ids[0]]
    assert store.list_runs(dataset="count")["id"].tolist() == [ids[2], ids[1]]
    assert store.list_runs(status="completed")["id"].tolist() == [ids[0]]
    assert store.list_runs(status=["running", "completed"], method="fact")["id"].tolist() == [ids[1]]
    assert len(store.list_runs(dataset="cifar")) == 0
    with pytest.raises(ValueError, match="unknown status 'done'"):
        store.list_runs(status="done")


def test_delete_run_removes_row_metrics_and_files(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    keep, gone = store.create_run({"label": "keep"}), store.create_run({"label": "gone"})
    for run_id in (keep, gone):
        store.log_metrics(run_id, [dict(step=s, split="train", name="loss", value=1.0) for s in range(5)])
    store.adapter_path(gone).write_bytes(b"x")
    with pytest.raises(ValueError, match="is running; cancel it first, or pass force=True"):
        store.delete_run(gone)
    store.finish_run(gone, "cancelled", message="stopped by the user")
    store.delete_run(gone)
    assert not (tmp_path / "runs" / gone).exists()
    with pytest.raises(RunNotFoundError):
        store.get_run(gone)
    assert _sql(tmp_path, "SELECT run_id, COUNT(*) FROM metrics GROUP BY run_id") == [(keep, 5)]
    store.delete_run(keep, force=True)
    assert store.list_runs().empty and _sql(tmp_path, "SELECT COUNT(*) FROM metrics") == [(0,)]


def test_export_csv_and_parquet_read_back_equal(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "store")
    first = store.create_run(RECORD)
    store.finish_run(first, "completed", best_val_acc=0.8, test_acc=0.75, steps=100, trainable_params=999)
    second = store.create_run({**RECORD, "method": "fact", "method_options": {"rank": 4, "scale": 0.1}})
    store.finish_run(second, "failed", message="RuntimeError: out of memory, with a comma")

    expected = store.list_runs()
    expected["weights.mean"] = [json.dumps([0.5, 0.5, 0.5])] * 2  # lists are written as JSON text
    parquet = pd.read_parquet(store.export(tmp_path / "out" / "runs.parquet"))
    csv = pd.read_csv(store.export(tmp_path / "runs.csv"))
    for back in (parquet, csv):  # a file keeps values, not always dtypes (CSV: no missing-text vs NaN, Int64)
        pd.testing.assert_frame_equal(_values(back), _values(expected), check_dtype=False)

    assert csv["id"].tolist() == [second, first]
    assert csv["method_options.scale"].iloc[0] == 0.1 and math.isnan(csv["method_options.scale"].iloc[1])
    assert csv["message"].iloc[0] == "RuntimeError: out of memory, with a comma"
    assert parquet["trainable_params"].iloc[1] == 999 and parquet["test_acc"].iloc[1] == 0.75
    with pytest.raises(ValueError, match="export writes .csv or .parquet files, not 'runs.xlsx'"):
        store.export(tmp_path / "runs.xlsx")


# ------------------------------------------------------------------------------------------------------------
# Concurrency
# ------------------------------------------------------------------------------------------------------------

WORKER = """
import sys, time
from pathlib import Path
from core.runs import RunStore
root, label, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
while not (root.parent / "go").exists():
    time.sleep(0.005)
store = RunStore(root)  # both workers create the fresh database at the same moment
run_id = store.create_run({"method": "lora", "label": label})
for start in range(0, n, 3):
    rows = [dict(step=s, split="train", name="loss", value=s / 7) for s in range(start, min(n, start + 3))]
    store.log_metrics(run_id, rows)
    if start % 30 == 0:
        store.update_run(run_id, steps=start)
store.finish_run(run_id, "completed", steps=n)
print(run_id)
"""


def test_two_writer_processes_and_a_reader_do_not_collide(tmp_path: Path) -> None:
    root, n = tmp_path / "store", 300
    workers = [_python(WORKER, str(root), label, str(n)) for label in ("a", "b")]
    try:
        (tmp_path / "go").touch()
        reads = 0
        deadline = time.monotonic() + 60
        while any(w.poll() is None for w in workers) and time.monotonic() < deadline:
            if (root / R.DB_NAME).exists():
                store = RunStore(root)
                for run_id in store.list_runs()["id"]:
                    store.metrics(run_id)
                reads += 1
        outputs = [w.communicate(timeout=30) for w in workers]
    finally:
        for w in workers:
            w.kill()
    for w, (_, err) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, err
        assert err == ""

    store = RunStore(root)
    run_ids = {out.strip() for out, _ in outputs}
    frame = store.list_runs()
    assert set(frame["id"]) == run_ids and sorted(frame["label"]) == ["a", "b"]
    assert frame["status"].tolist() == ["completed"] * 2 and frame["steps"].tolist() == [n, n]
    for run_id in run_ids:
        metrics = store.metrics(run_id)
        assert metrics["step"].tolist() == list(range(n))
        assert metrics["value"].tolist() == [s / 7 for s in range(n)]
    assert _sql(root, "PRAGMA integrity_check") == [("ok",)]
    assert reads > 0


def test_threads_get_their_own_connections(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    run_id = store.create_run({"method": "lora"})
    errors: list[BaseException] = []

    def log(split: str) -> None:
        try:
            for step in range(20):
                store.log_metrics(run_id, [dict(step=step, split=split, name="loss", value=float(step))])
                store.list_runs()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=log, args=(split,)) for split in ("train", "val", "test")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.metrics(run_id).groupby("split")["step"].count().to_dict() == {"test": 20, "train": 20, "val": 20}


# ------------------------------------------------------------------------------------------------------------
# Recovery of dead runs
# ------------------------------------------------------------------------------------------------------------

KILLED = """
import sys, time
from pathlib import Path
from core.runs import RunStore
store = RunStore(Path(sys.argv[1]))
run_id = store.create_run({"method": "ssf"})
store.log_metrics(run_id, [dict(step=s, split="train", name="loss", value=1 / (s + 1)) for s in range(25)])
store.adapter_path(run_id).write_bytes(b"adapter")
print(run_id, flush=True)
time.sleep(60)
"""


def test_killed_run_is_marked_interrupted_and_keeps_its_data(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    alive = store.create_run({"method": "lora", "label": "this process"})
    child = _python(KILLED, str(tmp_path))
    try:
        assert child.stdout is not None
        dead = child.stdout.readline().strip()
        assert dead, child.communicate()[1]
        assert RunStore(tmp_path).get_run(dead)["status"] == "running"  # alive: left alone
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()

    reopened = RunStore(tmp_path)
    run = reopened.get_run(dead)
    assert run["status"] == "interrupted" and run["finished_at"] is not None
    assert f"its process (pid {child.pid} on {socket.gethostname()}) is gone" in run["message"]
    assert f"last heartbeat {run['heartbeat_at']}" in run["message"]
    assert len(reopened.metrics(dead)) == 25
    assert reopened.adapter_path(dead).read_bytes() == b"adapter"
    assert reopened.get_run(alive)["status"] == "running"  # the test process is alive
    assert reopened.recover() == []


def test_stale_heartbeat_interrupts_and_a_live_writer_revives(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    mine = store.create_run({"label": "mine"})
    remote = store.create_run({"label": "remote"})
    old = (datetime.now(timezone.utc) - timedelta(hours=2)).isoformat(timespec="milliseconds")
    _sql(tmp_path, "UPDATE runs SET heartbeat_at = ? WHERE id = ?", (old, mine))
    # Another host: its pid means nothing here, and its heartbeat is fresh.
    _sql(tmp_path, "UPDATE runs SET hostname = 'elsewhere', pid = 999999999 WHERE id = ?", (remote,))

    store = RunStore(tmp_path, stale_after_s=60)
    run = store.get_run(mine)
    assert run["status"] == "interrupted"
    assert run["message"].startswith("interrupted: no heartbeat for over 60 s") and old in run["message"]
    assert store.get_run(remote)["status"] == "running"

    store.heartbeat(mine)  # its writer (this process) was alive after all
    run = store.get_run(mine)
    assert (run["status"], run["message"], run["finished_at"]) == ("running", None, None)
    store.finish_run(mine, "completed")
    assert store.get_run(mine)["status"] == "completed"


# ------------------------------------------------------------------------------------------------------------
# Migration
# ------------------------------------------------------------------------------------------------------------


def test_migration_adds_new_columns_and_refuses_newer_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RunStore(tmp_path)
    run_id = store.create_run(RECORD)
    store.log_metrics(run_id, [dict(step=0, split="train", name="loss", value=1.0)])

    newer = R.SCHEMA_VERSION + 1
    monkeypatch.setattr(schema, "SCHEMA_VERSION", newer)
    monkeypatch.setattr(
        schema, "RUN_COLUMNS", (*R.RUN_COLUMNS, R.Column("gpu_name", "text", "accelerator", since=newer))
    )
    store = RunStore(tmp_path)
    assert _sql(tmp_path, "PRAGMA user_version") == [(newer,)]
    assert "gpu_name" in [row[1] for row in _sql(tmp_path, "PRAGMA table_info(runs)")]
    store.update_run(run_id, gpu_name="H100")
    run = store.get_run(run_id)
    assert (run["gpu_name"], run["method_options"], len(store.metrics(run_id))) == ("H100", RECORD["method_options"], 1)

    _sql(tmp_path, "PRAGMA user_version = 70")
    with pytest.raises(RuntimeError, match=f"schema version 70 but this PETLab knows versions up to {newer}"):
        RunStore(tmp_path)


def test_version_1_store_gains_the_job_columns_and_its_runs_stay_fine_tunes(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    run_id = store.create_run(RECORD)
    store.close()
    # Back to the version-1 layout: the columns added since, and the version number.
    with sqlite3.connect(tmp_path / R.DB_NAME) as conn:
        for column in R.RUN_COLUMNS:
            if column.since > 1:
                conn.execute(f"ALTER TABLE runs DROP COLUMN {column.name}")
        conn.execute("PRAGMA user_version = 1")
    store = RunStore(tmp_path)
    assert _sql(tmp_path, "PRAGMA user_version") == [(R.SCHEMA_VERSION,)]
    assert store.get_run(run_id)["kind"] == "finetune"
    assert list(store.list_runs()["id"]) == [run_id]
    assert store.list_runs(kind="intrinsic_dim").empty


def test_cancel_ends_a_queued_run_at_once_and_flags_a_running_one(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    queued = store.create_run({**RECORD, "resources": {"CPU": 2}}, status="queued")
    behind = store.create_run({**RECORD, "resources": {"CPU": 2}}, status="queued")
    gpu = store.create_run({**RECORD, "resources": {"GPU": 1}}, status="queued")
    assert [store.queue_position(r) for r in (queued, behind, gpu)] == [1, 2, 1]

    assert store.request_cancel(queued) == "cancelled"
    run = store.get_run(queued)
    assert (run["status"], run["message"], run["steps"]) == ("cancelled", "cancelled while queued", 0)
    assert store.queue_position(behind) == 1 and store.queue_position(queued) is None
    with pytest.raises(ValueError, match="is cancelled, not queued"):
        store.start_run(queued)

    store.start_run(behind, pid=os.getpid(), hostname="worker-host", node="node-1")
    run = store.get_run(behind)
    assert (run["status"], run["hostname"], run["node"]) == ("running", "worker-host", "node-1")
    assert not store.cancel_requested(behind)
    assert store.request_cancel(behind) == "running"
    assert store.cancel_requested(behind)
    store.finish_run(behind, "completed")
    assert store.request_cancel(behind) == "completed"  # nothing to cancel any more


def test_statuses_reads_many_runs_at_once_and_leaves_out_unknown_ids(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    ids = [store.create_run(RECORD, status="queued") for _ in range(1203)]  # more than one read of 500
    store.request_cancel(ids[0])
    store.start_run(ids[600])
    store.finish_run(ids[1202], "failed", "boom")
    expected = {run_id: store.get_run(run_id)["status"] for run_id in ids}
    assert store.statuses([*ids, "no-such-run"]) == expected
    assert (expected[ids[0]], expected[ids[600]], expected[ids[1202]], expected[ids[1]]) == (
        "cancelled",
        "running",
        "failed",
        "queued",
    )
    assert store.statuses([]) == {}


# ------------------------------------------------------------------------------------------------------------
# Damage: run.json, a damaged or lost index, check and rebuild, read-only opens
# ------------------------------------------------------------------------------------------------------------


def _record(root: Path, run_id: str) -> dict:
    return json.loads((root / "runs" / run_id / R.RECORD_FILE).read_text())["run"]


def _store_with_history(root: Path, runs: int = 3, steps: int = 5) -> list[str]:
    """A closed store of finished runs, each with a metric history and an adapter file; their ids."""
    store = RunStore(root)
    ids = []
    for index in range(runs):
        run_id = store.create_run({**RECORD, "label": f"run {index} " + "x" * 200})
        store.log_metrics(run_id, [dict(step=s, split="train", name="loss", value=1.0 / (s + 1)) for s in range(steps)])
        store.adapter_path(run_id).write_bytes(b"adapter bytes")
        store.finish_run(run_id, "completed", best_val_acc=0.5 + index / 10, steps=steps)
        ids.append(run_id)
    store.close()
    return ids


def test_run_json_follows_the_row_at_each_change(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    queued = store.create_run(RECORD, status="queued")
    assert _record(tmp_path, queued) == store.get_run(queued) and _record(tmp_path, queued)["status"] == "queued"
    store.start_run(queued)
    assert _record(tmp_path, queued)["status"] == "running"
    store.update_run(queued, trainable_params=42)
    assert _record(tmp_path, queued)["trainable_params"] == 42
    store.adapter_path(queued).write_bytes(b"adapter")
    store.record_adapter(queued)
    assert _record(tmp_path, queued)["adapter_file"] == R.ADAPTER_FILE
    store.finish_run(queued, "diverged", "diverged at step 3: loss is nan", best_val_acc=0.25)
    record = _record(tmp_path, queued)
    assert (record["status"], record["message"]) == ("diverged", "diverged at step 3: loss is nan")
    assert record["best_val_acc"] == 0.25 and record["method_options"] == RECORD["method_options"]

    cancelled = store.create_run(RECORD, status="queued")
    store.request_cancel(cancelled)
    assert _record(tmp_path, cancelled)["status"] == "cancelled"
    dead = store.create_run(RECORD)
    _sql(tmp_path, "UPDATE runs SET pid = ? WHERE id = ?", (_dead_pid(), dead))
    assert store.recover() == [dead] and _record(tmp_path, dead)["status"] == "interrupted"
    assert not list((tmp_path / "runs").glob("*/*.partial"))


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("damage", ["garbage header", "truncated"])
def test_a_damaged_index_is_refused_clearly_left_as_it_is_and_rebuilt(tmp_path: Path, damage: str) -> None:
    ids = _store_with_history(tmp_path, runs=20, steps=100)
    db = tmp_path / R.DB_NAME
    data = db.read_bytes()
    damaged = b"this is not SQLite" * 64 + data[1152:] if damage == "garbage header" else data[: len(data) // 2]
    db.write_bytes(damaged)

    with pytest.raises(StoreDamaged) as caught:
        store = RunStore(tmp_path)
        for run_id in ids:  # a truncated file may open; reading the lost pages then fails
            store.metrics(run_id)
    message = str(caught.value)
    assert str(db) in message and "is damaged" in message and "runs rebuild" in message and "runs check" in message
    with pytest.raises(StoreDamaged):
        store = RunStore(tmp_path, read_only=True)
        for run_id in ids:
            store.metrics(run_id)
    assert db.read_bytes() == damaged  # left as it is

    report = R.check_store(tmp_path)
    assert not report.ok and any(str(db) in line for line in report.damage)
    rebuilt = R.rebuild_store(tmp_path)
    assert sorted(rebuilt.from_index + rebuilt.from_records) == sorted(ids) and not rebuilt.unrecovered
    aside = [p for p in rebuilt.kept_aside if not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].read_bytes() == damaged  # kept aside, never deleted
    store = RunStore(tmp_path)
    runs = store.list_runs().set_index("id")
    assert sorted(runs.index) == sorted(ids)
    assert runs.loc[ids[3], "best_val_acc"] == pytest.approx(0.8) and runs.loc[ids[3], "label"].startswith("run 3")
    assert (runs["status"] == "completed").all() and (runs["adapter_file"] == R.ADAPTER_FILE).all()
    assert R.check_store(tmp_path).ok


def test_an_empty_or_missing_index_with_run_folders_is_refused_not_recreated(tmp_path: Path) -> None:
    ids = _store_with_history(tmp_path)
    db = tmp_path / R.DB_NAME
    db.write_bytes(b"")
    for read_only in (False, True):
        with pytest.raises(StoreDamaged, match=r"is empty \(0 bytes\) but 3 run folder\(s\) exist.*runs rebuild"):
            RunStore(tmp_path, read_only=read_only)
    assert db.stat().st_size == 0  # not re-created empty
    assert "is empty (0 bytes)" in R.check_store(tmp_path).damage[0]
    db.unlink()
    with pytest.raises(StoreDamaged, match="is missing"):
        RunStore(tmp_path)
    assert not db.exists()

    rebuilt = R.rebuild_store(tmp_path)
    assert sorted(rebuilt.from_records) == sorted(ids) and rebuilt.from_index == [] and rebuilt.metric_rows == 0
    store = RunStore(tmp_path)
    assert sorted(store.list_runs()["id"]) == sorted(ids)
    assert store.get_run(ids[0])["best_val_acc"] == pytest.approx(0.5)  # the final metrics live in run.json
    assert store.metrics(ids[0]).empty  # the history lived only in the lost index

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / R.DB_NAME).write_bytes(b"")
    assert RunStore(tmp_path / "empty").list_runs().empty  # no run folders: nothing is lost, it simply starts


def test_check_finds_orphans_missing_adapters_and_rows_without_folders_and_rebuild_keeps_history(
    tmp_path: Path,
) -> None:
    ids = _store_with_history(tmp_path, runs=4)
    orphan, adapterless, folderless, healthy = ids
    _sql(tmp_path, "DELETE FROM runs WHERE id = ?", (orphan,))  # its run.json remains
    (tmp_path / "runs" / adapterless / R.ADAPTER_FILE).unlink()
    (tmp_path / "runs" / folderless / R.ADAPTER_FILE).unlink()
    (tmp_path / "runs" / folderless / R.RECORD_FILE).unlink()
    (tmp_path / "runs" / folderless).rmdir()
    bare = tmp_path / "runs" / "20200101-000000-abcdef"
    bare.mkdir()  # a folder with neither a row nor a run.json

    report = R.check_store(tmp_path)
    assert report.runs == 3 and not report.ok
    damage = "\n".join(report.damage)
    assert f"folder {tmp_path / 'runs' / orphan} has no row" in damage and "lets `python -m core" in damage
    assert f"folder {bare} has no row" in damage and "cannot restore it" in damage
    assert f"run {adapterless} (completed): its adapter file" in damage
    assert f"run {folderless} (completed) has no folder" in damage
    assert healthy not in damage and len(report.damage) == 4

    before = (tmp_path / R.DB_NAME).read_bytes()
    rebuilt = R.rebuild_store(tmp_path)
    assert rebuilt.from_records == [orphan] and sorted(rebuilt.from_index) == sorted([adapterless, folderless, healthy])
    assert rebuilt.unrecovered == [bare] and bare.is_dir()
    assert rebuilt.metric_rows == 15 and rebuilt.kept_aside[0].read_bytes() == before
    store = RunStore(tmp_path)
    assert len(store.metrics(healthy)) == 5 and store.metrics(orphan).empty
    assert sorted(store.list_runs()["id"]) == sorted(ids)


def test_read_only_open_writes_nothing_and_refuses_writes(tmp_path: Path) -> None:
    empty = RunStore(tmp_path / "nowhere", read_only=True)
    assert empty.list_runs().empty and not (tmp_path / "nowhere").exists()

    store = RunStore(tmp_path)
    run_id = store.create_run(RECORD)
    _sql(tmp_path, "UPDATE runs SET pid = ? WHERE id = ?", (_dead_pid(), run_id))
    store.close()
    reader = RunStore(tmp_path, read_only=True)
    assert reader.get_run(run_id)["status"] == "running"  # a read-only open recovers nothing
    assert reader.recover() == [] and reader.run_dir(run_id) == tmp_path / "runs" / run_id
    with pytest.raises(StoreError, match="opened read-only"):
        reader.update_run(run_id, steps=3)
    _sql(tmp_path, "PRAGMA user_version = 1")
    with pytest.raises(
        StoreError, match=f"needs an upgrade to version {R.SCHEMA_VERSION}, which a read-only open does not make"
    ):
        RunStore(tmp_path, read_only=True)
    assert _sql(tmp_path, "PRAGMA user_version") == [(1,)]
