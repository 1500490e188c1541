"""After fine-tuning: ``spectra`` (SVD spectra of a run's pretrained versus tuned weights) and ``pareto`` (accuracy
versus trainable parameters: your runs, the front, the papers' points)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from core.cli.runs import reading_store


def add_parsers(commands: Any) -> None:
    """The ``spectra`` and ``pareto`` commands. ``commands`` holds the subcommands of ``python -m core``."""
    spectra_parser = commands.add_parser(
        "spectra",
        help="SVD spectra of a run's weights",
        description=(
            "Singular values of pretrained and tuned weights and of each update, subspace rotation, intruder "
            "dimensions, effective and stable rank, per adapted matrix (q, k, v slices separately)."
        ),
    )
    spectra_parser.add_argument("run_id", help="a completed run id or a unique prefix of one")
    spectra_parser.add_argument("--k", type=int, default=10, help="top singular subspace size compared (default: 10)")
    spectra_parser.add_argument("--threshold", type=float, default=0.5, help="intruder cosine threshold (default: 0.5)")
    spectra_parser.add_argument("--values-only", action="store_true", help="singular values only (faster, no vectors)")
    spectra_parser.add_argument(
        "--out", type=Path, default=None, help="folder for summary/values/angles/intruders CSVs"
    )

    pareto_parser = commands.add_parser("pareto", help="accuracy vs trainable parameters, with the front")
    pareto_parser.add_argument(
        "--benchmark", default="VTAB-1k", help="reference benchmark (VTAB-1k, FGVC; default VTAB-1k)"
    )
    pareto_parser.add_argument(
        "--average",
        choices=("mean19", "groups"),
        default="mean19",
        help="mean19: mean over tasks (RLRR's convention); groups: mean of group means (FacT's)",
    )
    pareto_parser.add_argument(
        "--head",
        choices=("without", "with"),
        default="without",
        help="parameter convention preferred where both are known (default: without head)",
    )
    pareto_parser.add_argument("--dataset", default=None, help="only runs on this dataset")
    pareto_parser.add_argument(
        "--out", type=Path, default=None, help="write points.csv (runs and references, front flags)"
    )


def spectra(ns: argparse.Namespace) -> int:
    from core.experiment import run_weight_updates
    from core.spectra import cached_decompositions, spectra_report

    store = reading_store(ns.home)
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


def pareto(ns: argparse.Namespace) -> int:
    import pandas as pd

    from core.pareto import combine_points, fronts_by_kind, reference_points

    runs = reading_store(ns.home).list_runs(status="completed", dataset=ns.dataset)
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


COMMANDS = {"spectra": spectra, "pareto": pareto}
