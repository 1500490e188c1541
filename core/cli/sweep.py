"""``sweep``: grids of fine-tunes (methods x options x datasets x seeds): run, resume, cancel, list."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from core.cli.arguments import add_job_options
from core.cli.follow import follow_sweep
from core.config import field_docs
from core.data import DataSpec
from core.train import TrainConfig

SWEEP_DATA_FIELDS = ("img_size", "normalization", "n_train", "n_val", "n_test", "augment")


def add_parsers(commands: Any) -> None:
    """The ``sweep`` command and its subcommands. ``commands`` holds the subcommands of ``python -m core``."""
    parser = commands.add_parser(
        "sweep",
        help="grids of fine-tunes: run, resume, cancel, list",
        description="A sweep: every combination of methods and their options, datasets, seeds and training "
        "settings, each a fine-tune run tagged with the sweep's id. `sweep --grid FILE ...` (options straight "
        "after `sweep`) is `sweep run --grid FILE ...`.",
    )
    sweep_cmd = parser.add_subparsers(dest="sweep_command", required=True)
    run = sweep_cmd.add_parser(
        "run",
        help="check every point, then submit them all",
        description="Check every point of a grid (a bad one refuses the whole sweep), print the point count and "
        "the time estimate, then submit the points to Ray and follow them. The grid comes from a TOML file "
        "(bench/mini_vtab/grid.toml shows the format) or from the flags below; in both a list of values is an axis.",
    )
    run.add_argument("--grid", type=Path, default=None, help="a TOML grid file (then no --method/--dataset flags)")
    run.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="NAME[:OPT=V[,V...][,OPT=...]]",
        help="repeatable; e.g. lora:rank=4,8 or fact:variant=tt,rank=8,16; alternatives of an option whose value "
        "holds commas are separated by | (lora:targets=q,v|all)",
    )
    run.add_argument("--dataset", action="append", default=[], help="repeatable or comma-separated dataset names")
    run.add_argument("--seeds", default="0", help="training seeds, comma-separated (default: 0)")
    run.add_argument("--name", default=None, help="a short name for the sweep (put in front of each run's label)")
    run.add_argument("--backbone", default=None, help="timm model name (default: vit_small_patch14_dinov2)")
    run.add_argument("--weights", default=None, help="offline-default, hub, none, or a weights file")
    data_docs, train_docs = field_docs(DataSpec), field_docs(TrainConfig)
    data_group = run.add_argument_group("data (V[,V...]: a list is an axis)")
    for name in SWEEP_DATA_FIELDS:
        data_group.add_argument(
            "--" + name.replace("_", "-"),
            dest="data_" + name,
            default=argparse.SUPPRESS,
            metavar="V[,V...]",
            help=data_docs[name],
        )
    train_group = run.add_argument_group("training (V[,V...]: a list is an axis)")
    for f in dataclasses.fields(TrainConfig):
        if f.name != "seed":
            train_group.add_argument(
                "--" + f.name.replace("_", "-"),
                dest="train_" + f.name,
                default=argparse.SUPPRESS,
                metavar="V[,V...]",
                help=train_docs[f.name],
            )
    run.add_argument("--data-root", type=Path, default=None, help="folder that folder:/vtab: paths must lie in")
    run.add_argument("--dry-run", action="store_true", help="check and list the points with their estimates only")
    add_job_options(run, "sweep id")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    resume = sweep_cmd.add_parser("resume", help="submit again the points of a sweep that have no result yet")
    resume.add_argument("sweep_id", help="a sweep id or a unique prefix of one")
    resume.add_argument("--data-root", type=Path, default=None)
    add_job_options(resume, "sweep id")
    resume.add_argument("--quiet", action="store_true", help="no progress lines")
    cancel = sweep_cmd.add_parser("cancel", help="cancel a sweep: queued points end, running ones stop")
    cancel.add_argument("sweep_id")
    listing = sweep_cmd.add_parser("list", help="one line per sweep, newest first: its points by status")
    listing.add_argument("--json", action="store_true", help="every sweep as one JSON list")


def sweep_spec(ns: argparse.Namespace) -> Any:
    """The grid of ``sweep run``: from ``--grid``, or from the flags."""
    from core import sweeps

    data = {k.removeprefix("data_"): v for k, v in vars(ns).items() if k.startswith("data_") and k != "data_root"}
    train = {k.removeprefix("train_"): v for k, v in vars(ns).items() if k.startswith("train_")}
    backbone = {k: v for k, v in (("name", ns.backbone), ("weights", ns.weights)) if v is not None}
    if ns.grid is not None:
        given = [flag for flag, value in (("--method", ns.method), ("--dataset", ns.dataset)) if value]
        given += [f"--{k.replace('_', '-')}" for k in (*data, *train, *backbone)]
        if given or ns.seeds != "0" or ns.name:
            raise ValueError(f"--grid holds the whole sweep; put {', '.join(given) or 'these settings'} in the file")
        return sweeps.load_grid(ns.grid)
    return sweeps.spec_from_flags(ns.method, ns.dataset, ns.seeds, data, train, backbone, ns.name)


def _minutes(seconds: float | None) -> str:
    return "unknown" if seconds is None else f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def sweep(ns: argparse.Namespace) -> int:
    from core import jobs, sweeps
    from core.runs import RunStore

    store = RunStore(ns.home)
    if ns.sweep_command == "list":
        summaries = sweeps.list_sweeps(store.root)
        if ns.json:
            print(json.dumps([s.to_dict() for s in summaries]))
        elif not summaries:
            print(f"no sweeps in {store.root}")
        else:
            print(
                f"{'sweep':<31}{'status':<12}{'points':>7}{'done':>6}{'diverged':>9}{'failed':>7}{'cancelled':>10}"
                f"{'running':>8}{'queued':>7}  estimate   name"
            )
            for s in summaries:
                print(
                    f"{s.id:<31}{s.status:<12}{s.points:>7}{s.done:>6}{s.diverged:>9}{s.failed:>7}{s.cancelled:>10}"
                    f"{s.running:>8}{s.queued:>7}  {_minutes(s.estimate_s):<10} {s.name or ''}"
                )
        return 0
    if ns.sweep_command == "cancel":
        sweep_id = sweeps.load_sweep(store.root, ns.sweep_id)["id"]
        counts = sweeps.cancel_sweep(sweep_id, store.root)
        print(
            f"sweep {sweep_id}: {counts['cancelled']} queued points cancelled, {counts['stopping']} running "
            "ones asked to stop before their next step",
            flush=True,
        )
        summary = sweeps.wait_sweep(store, sweep_id, timeout=120) if counts["stopping"] else None
        print(f"sweep {sweep_id}: {(summary or sweeps.summarize(store, sweep_id)).status}")
        return 0
    if ns.sweep_command == "run":
        spec = sweep_spec(ns)
        points = sweeps.check_points(spec)
        guess = sweeps.estimate(points, store)
        if ns.dry_run:
            for index, (point, seconds) in enumerate(zip(points, guess.seconds, strict=True), 1):
                print(
                    f"{index:>5}  {point.params.without_head:>12,} params  ~{_minutes(seconds):>9}  "
                    f"{point.experiment.label}"
                )
        print(
            f"{len(points)} points; about {_minutes(guess.total_s)} one after another on one machine ({guess.basis})",
            flush=True,
        )
        if ns.dry_run:
            return 0
        sweep_id = sweeps.submit_sweep(
            spec, store.root, address=ns.address, persistent=ns.detach, data_root=ns.data_root
        )
    else:
        sweep_id = sweeps.resume_sweep(
            ns.sweep_id, store.root, address=ns.address, persistent=ns.detach, data_root=ns.data_root
        )
    submission = sweeps.load_sweep(store.root, sweep_id)["submissions"][-1]
    where = f"Ray at {jobs.connect()}" + ("" if jobs.on_cluster() else " (embedded)")
    print(
        f"PETLab sweep {sweep_id}: {len(submission['submitted'])} points submitted, {submission['skipped']} "
        f"skipped (completed, diverged, queued or running) on {where}; runs in {store.root}",
        flush=True,
    )
    if ns.detach:
        print(f"detached: see it with `python -m core sweep list`, cancel it with `sweep cancel {sweep_id}`")
        return 0
    summary = follow_sweep(store, sweep_id, quiet=ns.quiet)
    print(
        f"sweep {sweep_id}: {summary.status}: {summary.done} of {summary.points} points done, "
        f"{summary.diverged} diverged, {summary.failed} failed, {summary.cancelled} cancelled"
    )
    return 0 if summary.status == "completed" else 1


COMMANDS = {"sweep": sweep}
