"""Submitting a job from the command line and following it, or a sweep, to its end: progress on the terminal,
Ctrl-C cancels."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:
    from core.runs import RunStore


def submit(ns: argparse.Namespace, kind: str, spec: Any, title: str) -> dict[str, Any] | None:
    """Submit a job to Ray and, unless ``--detach``, follow it to its end; returns its record (None if detached)."""
    from core import jobs
    from core.runs import RunStore

    store = RunStore(ns.home)
    run_id = jobs.submit(kind, spec, store.root, address=ns.address, persistent=ns.detach, data_root=ns.data_root)
    where = f"Ray at {jobs.connect()}" + ("" if jobs.on_cluster() else " (embedded)")
    print(f"PETLab: {title}: run {run_id} on {where}; runs in {store.root}", flush=True)
    if ns.detach:
        print(f"detached: follow it with `python -m core runs wait {run_id}`, cancel it with `runs cancel {run_id}`")
        return None
    return follow_run(store, run_id, quiet=getattr(ns, "quiet", False))


def follow_run(store: RunStore, run_id: str, quiet: bool = False) -> dict[str, Any]:
    """Show a submitted job's progress from the run store until it ends; Ctrl-C cancels it. Returns its record.

    A fine-tune gets a tqdm bar over its steps (on stderr) with each evaluation a line above it; a measurement
    prints each trial as it finishes."""
    from core.jobs import wait

    bar: tqdm | None = None
    shown = {"evals": 0, "trials": 0, "queued": None, "beat": None}

    def update(run: dict[str, Any]) -> None:
        nonlocal bar
        if quiet:
            return
        if run["status"] == "queued":
            position = store.queue_position(run_id)
            if position != shown["queued"]:
                shown["queued"] = position
                print(f"queued: number {position} in the queue for its resources", flush=True)
            return
        if run["kind"] == "intrinsic_dim":
            trials = (run["result"] or {}).get("trials", [])
            for trial in trials[shown["trials"] :]:
                print(f"  {trial['group']:<16} d={trial['d']:<9} accuracy {trial['accuracy']:.3f}", flush=True)
            shown["trials"] = len(trials)
            return
        if bar is None:
            where = run["hostname"] + (f" (Ray node {run['node'][:8]})" if run["node"] else "")
            bar = tqdm(total=run["train_config"]["steps"], desc=f"training on {where}", unit="step", dynamic_ncols=True)
        if run["heartbeat_at"] == shown["beat"]:
            return  # nothing written since the last poll (every write of metrics refreshes the heartbeat)
        shown["beat"] = run["heartbeat_at"]
        history = store.metrics(run_id)
        loss = history[(history["split"] == "train") & (history["name"] == "loss")]
        if len(loss):
            bar.set_postfix_str(f"loss {loss['value'].iloc[-1]:.4f}", refresh=False)
        evals = history[(history["split"] == "val") & (history["name"] == "acc")]
        for row in evals.iloc[shown["evals"] :].itertuples():
            tqdm.write(f"  val @ step {row.step}: accuracy {row.value:.2f}%")
        shown["evals"] = len(evals)
        bar.update((run["steps"] or 0) - bar.n)

    try:
        return wait(store, run_id, on_update=update)
    except KeyboardInterrupt:
        print(f"\ncancelling run {run_id} ...", file=sys.stderr, flush=True)
        store.request_cancel(run_id)
        return wait(store, run_id)
    finally:
        if bar is not None:
            bar.close()


def follow_sweep(store: RunStore, sweep_id: str, quiet: bool = False) -> Any:
    """Show a sweep's progress until no point is queued or running: a bar over its points (on stderr) and a line
    per point as it ends. Ctrl-C cancels the sweep. Returns its `core.sweeps.SweepSummary`."""
    import pandas as pd

    from core import sweeps
    from core.runs import FINISHED_STATUSES

    shown = set(store.list_runs(sweep_id=sweep_id, status=FINISHED_STATUSES)["id"])  # ended before: not repeated
    bar: tqdm | None = None

    def update(summary: Any) -> None:
        nonlocal bar
        if quiet:
            return
        if bar is None:
            bar = tqdm(total=summary.points, desc=f"sweep {summary.id}", unit="point", dynamic_ncols=True)
        ended = store.list_runs(sweep_id=sweep_id, status=FINISHED_STATUSES)
        for run in reversed(ended[~ended["id"].isin(shown)].to_dict("records")):  # oldest first
            shown.add(run["id"])
            scores = ", ".join(
                f"{name} {run[column]:.2f}%"
                for name, column in (("val", "best_val_acc"), ("test", "test_acc"))
                if pd.notna(run[column])
            )
            tqdm.write(f"  {run['label']}: {run['status']}{', ' + scores if scores else ''}")
        bar.update(summary.finished - bar.n)
        bar.set_postfix_str(f"{summary.running} running, {summary.queued} queued", refresh=False)

    try:
        return sweeps.wait_sweep(store, sweep_id, on_update=update)
    except KeyboardInterrupt:
        print(f"\ncancelling sweep {sweep_id} ...", file=sys.stderr, flush=True)
        sweeps.cancel_sweep(sweep_id, store.root)
        return sweeps.wait_sweep(store, sweep_id)
    finally:
        if bar is not None:
            bar.close()
