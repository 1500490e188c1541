"""The data folder on disk: where it is, its layout, run ids, and the files in a run's folder.

Layout under the data folder (`default_root`)::

    runs.sqlite            the index: one row per run and its metric history (see `core.runs.schema`)
    runs/<run_id>/         the run's files: ``adapter.safetensors``, ``run.json`` (its row, so that the index can be
                           rebuilt), ``snapshots/step-<n>.safetensors`` and anything else the trainer keeps

Run ids are time-sortable (``20261122-153012-ab12cd``, UTC).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HOME_ENV = "PETLAB_HOME"
DB_NAME = "runs.sqlite"
RUNS_DIR = "runs"
SNAPSHOT_DIR = "snapshots"
ADAPTER_FILE = "adapter.safetensors"
RECORD_FILE = "run.json"

_RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")


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


def new_run_id() -> str:
    """A fresh run id: the UTC second, then six random hex digits."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def run_folders(runs_path: Path) -> dict[str, Path]:
    """The run folders under ``runs_path`` (folders named like a run id), by id."""
    if not runs_path.is_dir():
        return {}
    return {p.name: p for p in sorted(runs_path.iterdir()) if p.is_dir() and _RUN_ID.fullmatch(p.name)}


def read_record(folder: Path) -> dict[str, Any] | None:
    """The row kept in a run folder's ``run.json``; None when there is none or it cannot be read."""
    try:
        record = json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    run = record.get("run") if isinstance(record, dict) else None
    return run if isinstance(run, dict) and run.get("id") == folder.name else None


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a partial file and a rename: readers see the old or the new file, never
    half of one. A failed write removes its partial file."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
