"""The command line's failures: one line on stderr and a non-zero exit, never a traceback; a damaged run store
checked and rebuilt from the command line; a full disk and a read-only folder still listed; a diverged run.

The full disk and the read-only folder are real where the tests may mount a small tmpfs (as root, with mount
permitted); elsewhere they are simulated by making the store's writes fail as they would there (ENOSPC, EROFS)."""

from __future__ import annotations

import errno
import inspect
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import core.cli as cli_module
import core.cli.train as cli_train
from core import runs as R
from core.backbone import BackboneUnavailable
from core.cli import main as cli
from core.errors import NoSpace, NotWritable, PetlabError, StoreDamaged
from core.experiment import run_experiment
from core.runs import RunStore, files

RECORD = dict(method="lora", method_options={"rank": 2}, dataset={"name": "digits"}, label="kept")


def _finished_run(home: Path) -> str:
    """A completed run with an adapter file in a fresh store at ``home`` (closed afterwards); its id."""
    store = RunStore(home)
    run_id = store.create_run(RECORD)
    store.write_adapter(run_id, b"adapter bytes")
    store.finish_run(run_id, "completed", best_val_acc=0.75)
    store.close()
    return run_id


def _raising(exc: BaseException):
    def command(ns) -> int:
        raise exc

    return command


# ------------------------------------------------------------------------------------------------------------
# One line for every failure
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (BackboneUnavailable("Pretrained weights for 'vit_x' are not in the local cache"), "not in the local cache"),
        (StoreDamaged("the run store /x/runs.sqlite is damaged"), "the run store /x/runs.sqlite is damaged"),
        (ValueError("FacT rank=0 is out of range"), "FacT rank=0 is out of range"),
        (KeyError("no run with id 'nope'"), "no run with id 'nope'"),
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/out/points.csv"),
            "no space left on device in /data/out: the command stopped there; what was written before is kept",
        ),
        (OSError(errno.EROFS, "Read-only file system", "/ro/petlab/runs"), "/ro/petlab is on a read-only file system"),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x.csv"), "no permission to write in /root"),
        (sqlite3.DatabaseError("database disk image is malformed"), "runs.sqlite could not be used (database disk"),
    ],
)
def test_errors_print_one_line_and_exit_2(
    exc: BaseException, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(cli_module.COMMANDS, "params", _raising(exc))
    assert cli(["--home", str(tmp_path), "params"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err
    if isinstance(exc, sqlite3.Error):
        assert str(tmp_path / "runs.sqlite") in err and "runs check" in err and "runs rebuild" in err


def test_the_project_errors_are_one_family() -> None:
    assert issubclass(BackboneUnavailable, PetlabError) and issubclass(R.RunNotFoundError, PetlabError)
    assert issubclass(R.RunNotFoundError, KeyError) and issubclass(NoSpace, OSError)  # old except clauses still work


def test_an_unexpected_error_prints_one_line_naming_the_log_with_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(cli_module.COMMANDS, "params", _raising(ZeroDivisionError("division by zero")))
    assert cli(["--home", str(tmp_path / "home"), "params"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: unexpected ZeroDivisionError: division by zero; the full traceback is in ")
    log = Path(err.strip().rpartition(" ")[2])
    assert log.parent == tmp_path / "home" / "logs" and log.name.startswith("cli-")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError: division by zero" in text

    # A run store folder that cannot hold a log: the temporary folder does.
    (tmp_path / "a file").write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert cli(["--home", str(tmp_path / "a file" / "home"), "params"]) == 1
    log = Path(capsys.readouterr().err.strip().rpartition(" ")[2])
    assert log.parent == tmp_path / "tmp" / "petlab-logs" and "ZeroDivisionError" in log.read_text()


def test_ctrl_c_outside_a_followed_job_exits_130_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(cli_module.COMMANDS, "params", _raising(KeyboardInterrupt()))
    assert cli(["--home", str(tmp_path), "params"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


# ------------------------------------------------------------------------------------------------------------
# A damaged run store from the command line
# ------------------------------------------------------------------------------------------------------------


def test_runs_check_and_rebuild_on_a_damaged_store(tmp_path: Path, capsys) -> None:
    home = tmp_path / "home"
    run_id = _finished_run(home)
    db = home / R.DB_NAME
    db.write_bytes(b"garbage " * 512)

    assert cli(["--home", str(home), "runs", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the run store {db} is damaged (file is not a database)") and "Traceback" not in err
    assert f"python -m core --home {home} runs rebuild" in err and db.read_bytes() == b"garbage " * 512

    assert cli(["--home", str(home), "runs", "check"]) == 1
    out = capsys.readouterr().out
    assert f"{db} cannot be read (file is not a database)" in out and "1 problem(s) found" in out

    assert cli(["--home", str(home), "runs", "rebuild"]) == 0
    out = capsys.readouterr().out
    assert f"rebuilt {db}: 1 run(s), 0 from the old index and 1 from their run.json" in out
    aside = next(home.glob("runs.sqlite.before-rebuild-*"))
    assert f"kept aside: {aside}" in out and aside.read_bytes() == b"garbage " * 512

    assert cli(["--home", str(home), "runs", "check"]) == 0
    assert "no damage found" in capsys.readouterr().out
    assert cli(["--home", str(home), "runs", "list"]) == 0
    assert run_id in capsys.readouterr().out


def test_an_empty_index_beside_run_folders_is_refused_from_the_command_line(tmp_path: Path, capsys) -> None:
    home = tmp_path / "home"
    _finished_run(home)
    (home / R.DB_NAME).write_bytes(b"")
    assert cli(["--home", str(home), "runs", "list"]) == 2
    err = capsys.readouterr().err
    assert "is empty (0 bytes) but 1 run folder(s) exist" in err and "runs rebuild" in err
    assert (home / R.DB_NAME).stat().st_size == 0


# ------------------------------------------------------------------------------------------------------------
# A full disk and a read-only folder
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    """A folder on a 1 MiB tmpfs and True, where this process may mount one; else a plain folder and False."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount"):
        command = ["mount", "-t", "tmpfs", "-o", "size=1m", "petlab-test", str(folder)]
        mounted = subprocess.run(command, capture_output=True).returncode == 0
    yield folder, mounted
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def _fill(folder: Path, name: str) -> None:
    with open(folder / name, "wb", buffering=0) as filler, pytest.raises(OSError) as caught:
        while True:
            filler.write(b"\0" * 4096)
    assert caught.value.errno == errno.ENOSPC


def test_a_full_disk_says_so_keeps_what_was_recorded_and_still_lists(
    small_disk: tuple[Path, bool], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    home, mounted = small_disk
    run_id = _finished_run(home)
    real_wal = inspect.getattr_static(RunStore, "_wal")  # the staticmethod itself

    def fill_the_disk() -> None:
        if mounted:
            _fill(home, "filler")
            return

        # Simulated: file writes and SQLite's first write of an open fail as on a full disk.
        def full(path: Path, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        def sqlite_full(conn: sqlite3.Connection) -> str:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(files, "write_atomically", full)
        monkeypatch.setattr(RunStore, "_wal", staticmethod(sqlite_full))

    def free_the_disk() -> None:
        if mounted:
            (home / "filler").unlink()
        else:
            monkeypatch.undo()

    # A store closed before the disk filled up cannot be opened for writing (SQLite cannot make its -shm file)...
    fill_the_disk()
    in_home = f"no space left on device in {re.escape(str(home))}"
    with pytest.raises(NoSpace, match=f"{in_home}: the run store was not opened for writing; nothing was changed"):
        RunStore(home)
    # ... but the read-only commands still read it.
    assert cli(["--home", str(home), "runs", "list"]) == 0
    out, err = capsys.readouterr()
    assert run_id in out and "completed" in out
    assert f"note: reading the run store read-only (no space left on device in {home})" in err
    assert cli(["--home", str(home), "runs", "show", run_id[:10]]) == 0
    assert '"label": "kept"' in capsys.readouterr().out
    assert cli(["--home", str(home), "runs", "check"]) == 0

    # A store opened before the disk filled up: each write fails whole, and says what was kept.
    free_the_disk()
    store = RunStore(home)
    fill_the_disk()
    if not mounted:
        monkeypatch.setattr(RunStore, "_wal", real_wal)
    with pytest.raises(NoSpace, match=f"{in_home}.*this change was not recorded; every run recorded before is kept"):
        store.update_run(run_id, label="lost")
    with pytest.raises(NoSpace, match=f"{in_home}.*the adapter of run {run_id} was not saved .*its record is kept"):
        store.write_adapter(run_id, b"x" * 2_000_000)
    assert store.adapter_path(run_id).read_bytes() == b"adapter bytes"
    assert not list((home / "runs" / run_id).glob("*.partial"))
    assert store.get_run(run_id)["label"] == "kept"
    store.close()
    assert cli(["--home", str(home), "runs", "list"]) == 0
    assert run_id in capsys.readouterr().out


def test_a_read_only_folder_is_listed_shown_exported_and_checked(
    small_disk: tuple[Path, bool], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    home, mounted = small_disk
    run_id = _finished_run(home)
    if mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(home)], check=True)
    else:  # simulated: opening for writing fails as in a read-only folder

        def read_only(conn: sqlite3.Connection) -> str:
            raise sqlite3.OperationalError("attempt to write a readonly database")

        monkeypatch.setattr(RunStore, "_wal", staticmethod(read_only))
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != home and real_access(path, mode))

    with pytest.raises(NotWritable, match=f"{re.escape(str(home))}.*the run store was not opened for writing"):
        RunStore(home)
    assert cli(["--home", str(home), "runs", "list"]) == 0
    out, err = capsys.readouterr()
    assert run_id in out and "completed" in out and "reading the run store read-only" in err
    assert cli(["--home", str(home), "runs", "show", run_id]) == 0
    assert '"best_val_acc": 0.75' in capsys.readouterr().out
    assert cli(["--home", str(home), "runs", "export", str(tmp_path / "runs.csv")]) == 0
    assert run_id in (tmp_path / "runs.csv").read_text()
    assert cli(["--home", str(home), "runs", "check"]) == 0
    assert "no damage found" in capsys.readouterr().out
    assert cli(["--home", str(home), "runs", "delete", run_id]) == 2
    assert str(home) in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# A diverged run
# ------------------------------------------------------------------------------------------------------------


def test_a_diverged_run_prints_no_adapter_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    home = tmp_path / "home"
    store = RunStore(home)

    def run_here(ns, kind: str, spec, title: str) -> dict:  # the job, in this process instead of on Ray
        return store.get_run(run_experiment(spec, store))

    monkeypatch.setattr(cli_train, "submit", run_here)
    data = ["--dataset", "digits", "--img-size", "32", "--n-train", "32", "--n-val", "16", "--n-test", "16"]
    schedule = ["--steps", "5", "--batch-size", "16", "--lr", "1e12", "--warmup-steps", "0", "--min-lr", "0"]
    backbone = ["--backbone", "vit_tiny_patch16_224", "--weights", "none"]
    assert cli(["--home", str(home), "train", "--quiet", *data, *schedule, *backbone, "full"]) == 1
    out = capsys.readouterr().out
    run_id = store.list_runs()["id"].iloc[0]
    assert f"run {run_id}: diverged: diverged at step" in out
    assert "adapter" not in out and not (home / "runs" / run_id / R.ADAPTER_FILE).exists()
    assert store.get_run(run_id)["adapter_file"] is None
