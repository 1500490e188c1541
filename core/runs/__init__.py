"""The run store: every fine-tune's record, metric history and adapter file, on disk.

One concept per module, read in this order:

    files      the data folder (`default_root`: ``$PETLAB_HOME``, else the user's data directory), its layout,
               run ids, and the files in a run's folder (``run.json``, the adapter, snapshots)
    schema     the tables: `RUN_COLUMNS`, the metrics table, `SCHEMA_VERSION` and `migrate`, how values are stored
    database   SQLite beneath it: the lock wait, read-only connections, errors told apart
    base       opening a store: folders, schema, connections, write transactions, recovery of dead runs
    store      `RunStore`: the API that writes and reads runs, metrics and files
    repair     `check_store` and `rebuild_store`, for a damaged or lost index

Several processes may write at once (two trainers) while another reads (the app): SQLite in WAL mode makes that
safe. A run whose process died is marked ``interrupted`` by the next store opened on the same folder. Damage is
never repaired silently: `check_store` reports it and `rebuild_store` rebuilds the index from the run folders. A
store on a full disk or in a read-only folder still opens with ``read_only=True``.

The modules import one another as modules (``schema.RUN_COLUMNS``, ``files.write_atomically``), so each name is
defined, and looked up, in one place.
"""

from core.runs.base import STALE_AFTER_S
from core.runs.database import BUSY_TIMEOUT_S
from core.runs.files import (
    ADAPTER_FILE,
    DB_NAME,
    HOME_ENV,
    RECORD_FILE,
    RUNS_DIR,
    SNAPSHOT_DIR,
    default_root,
)
from core.runs.repair import RebuildReport, StoreCheck, check_store, rebuild_store
from core.runs.schema import (
    ACTIVE_STATUSES,
    FINISHED_STATUSES,
    KINDS,
    RUN_COLUMNS,
    SCHEMA_VERSION,
    STATUSES,
    Column,
    migrate,
)
from core.runs.store import RunNotFoundError, RunStore, package_versions

__all__ = [
    "ACTIVE_STATUSES",
    "ADAPTER_FILE",
    "BUSY_TIMEOUT_S",
    "DB_NAME",
    "FINISHED_STATUSES",
    "HOME_ENV",
    "KINDS",
    "RECORD_FILE",
    "RUNS_DIR",
    "RUN_COLUMNS",
    "SCHEMA_VERSION",
    "SNAPSHOT_DIR",
    "STALE_AFTER_S",
    "STATUSES",
    "Column",
    "RebuildReport",
    "RunNotFoundError",
    "RunStore",
    "StoreCheck",
    "check_store",
    "default_root",
    "migrate",
    "package_versions",
    "rebuild_store",
]
