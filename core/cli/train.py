"""``train``: fine-tune a backbone with a method on a dataset, recorded in the run store."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from core import methods
from core.backbone import BackboneSpec
from core.cli.arguments import add_config_arguments, add_job_options, coerced, config_options
from core.cli.follow import submit
from core.config import field_docs
from core.data import BAD_FILE_POLICIES, DataSpec, list_datasets
from core.experiment import DEMO
from core.train import TrainConfig

DEMO_DATA, DEMO_TRAIN, DEMO_METHOD, DEMO_OPTIONS = DEMO.data, DEMO.train, DEMO.method, DEMO.options


def add_parsers(commands: Any) -> None:
    """The ``train`` command, with one subcommand per registered method for its options. ``commands`` holds the
    subcommands of ``python -m core``."""
    parser = commands.add_parser("train", help="fine-tune and record a run", description="Fine-tune and record a run.")
    data_group = parser.add_argument_group("data")
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
    backbone = parser.add_argument_group("backbone")
    backbone.add_argument("--backbone", default="vit_small_patch14_dinov2", help="timm model name")
    backbone.add_argument(
        "--weights",
        default="offline-default",
        help="offline-default, hub, none, or a .safetensors/.pth file (default: offline-default)",
    )
    backbone.add_argument("--drop-path-rate", type=float, default=0.0, help="stochastic depth (default: 0.0)")
    add_config_arguments(parser.add_argument_group("training"), TrainConfig, DEMO_TRAIN)
    parser.add_argument("--label", default=None, help="a short name for the run")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    add_job_options(parser)
    method_parsers = parser.add_subparsers(dest="method", metavar="METHOD", help=", ".join(methods.list_methods()))
    for name in methods.list_methods():
        method = methods.get_method(name)
        method_parser = method_parsers.add_parser(
            name, help=method.summary, description=f"{method.summary}. {method.paper}."
        )
        add_config_arguments(method_parser, method.config)


def train(ns: argparse.Namespace) -> int:
    from core.experiment import Experiment
    from core.runs import RunStore

    method = ns.method or DEMO_METHOD
    options = config_options(ns, methods.get_method(method).config) if ns.method else dict(DEMO_OPTIONS)
    data_values = {
        k.removeprefix("data_"): v for k, v in vars(ns).items() if k.startswith("data_") and k != "data_root"
    }
    if hasattr(ns, "name"):
        data_values["name"] = ns.name
    data = coerced(DataSpec, data_values, DEMO_DATA)
    config = coerced(TrainConfig, config_options(ns, TrainConfig), DEMO_TRAIN)
    backbone = BackboneSpec(name=ns.backbone, weights=ns.weights, drop_path_rate=ns.drop_path_rate)
    experiment = Experiment(data=data, backbone=backbone, method=method, options=options, train=config, label=ns.label)
    title = f"{method} on {data.name} at {data.img_size} px, backbone {ns.backbone} ({ns.weights})"
    run = submit(ns, "finetune", experiment, title)  # a bad option fails here, before anything is recorded
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


COMMANDS = {"train": train}
