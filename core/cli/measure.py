"""Before fine-tuning: ``params`` (trainable parameter counts, without training) and ``intrinsic-dim`` (KAdaptation's
submodule selection: d90 of each parameter group, and the targets it recommends)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from core import methods
from core.backbone import BackboneSpec
from core.cli.arguments import add_config_arguments, add_job_options, coerced, config_options
from core.cli.follow import submit
from core.data import DataSpec


def add_parsers(commands: Any) -> None:
    """The ``params`` and ``intrinsic-dim`` commands. ``commands`` holds the subcommands of ``python -m core``."""
    params_parser = commands.add_parser("params", help="trainable parameter counts, without training")
    params_parser.add_argument(
        "--backbone", default="vit_base_patch16_224", help="timm model name (default: vit_base_patch16_224)"
    )
    params_parser.add_argument("--num-classes", type=int, default=100)
    params_parser.add_argument(
        "--img-size", type=int, default=None, help="input side in pixels (default: the model's pretrained size)"
    )
    params_parser.add_argument(
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
    add_job_options(intrinsic_dim_parser)
    intrinsic_dim_parser.add_argument(
        "--out", type=Path, default=None, help="folder for curves.csv, groups.csv and result.json"
    )
    from core.intrinsic_dim import IntrinsicDimConfig

    add_config_arguments(intrinsic_dim_parser.add_argument_group("measurement"), IntrinsicDimConfig)


def params(ns: argparse.Namespace) -> int:
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


def intrinsic_dim(ns: argparse.Namespace) -> int:
    import pandas as pd

    from core.experiment import IntrinsicDimRequest
    from core.intrinsic_dim import IntrinsicDimConfig

    config = coerced(IntrinsicDimConfig, config_options(ns, IntrinsicDimConfig), IntrinsicDimConfig())
    data = DataSpec(name=ns.dataset, img_size=ns.img_size, n_train=ns.n_train, n_val=ns.n_val)
    backbone = BackboneSpec(name=ns.backbone, weights=ns.weights)
    groups = tuple(ns.groups.split("|")) if "|" in ns.groups or ":" in ns.groups or "," in ns.groups else ns.groups
    request = IntrinsicDimRequest(data=data, backbone=backbone, groups=groups, config=config)
    run = submit(ns, "intrinsic_dim", request, f"intrinsic dimension of {groups} on {ns.dataset}")
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


COMMANDS = {"params": params, "intrinsic-dim": intrinsic_dim}
