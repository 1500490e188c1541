"""Pareto fronts and efficiency scores over runs, and the published reference points to compare them with.

Read in this order:
    1. ``pareto_front``: the non-dominated rows of any table, in either preference direction; ``fronts_by_kind``:
       one front each for your runs and the papers' points.
    2. ``ppt_score``: V-PETL Bench's accuracy-per-parameter score.
    3. Reference results: the papers' (``core/assets/reference_results.csv``) and PETLab's own mini-benchmark,
       measured on the offline tasks (``core/assets/mini_benchmark.csv``, written by ``bench/mini_vtab/run.py``),
       both shipped as package data; their averaging conventions.
    4. ``combine_points``: user runs and reference points in one frame, for one plot.

Parameter counts follow two conventions in the literature: FacT's table counts the backbone only, RLRR's counts
the classifier head too. Every frame here carries both columns, ``params_without_head`` and
``params_with_head`` (NaN where a paper did not give that count), plus ``params``: the preferred convention where
known, else the other one, with ``params_convention`` saying which. Accuracies are percentages throughout.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

REFERENCE_RESULTS = resources.files("core") / "assets" / "reference_results.csv"
REFERENCE_COLUMNS = (
    "benchmark", "method", "task", "group", "accuracy", "params_M", "params_include_head", "backbone", "source",
)  # fmt: skip
MINI_BENCHMARK = resources.files("core") / "assets" / "mini_benchmark.csv"
MINI_BENCHMARK_COVERAGE = resources.files("core") / "assets" / "mini_benchmark.json"
MINI_BENCHMARK_NAME = "PETLab mini-benchmark (measured)"
MINI_BENCHMARK_GROUPS = {
    "digits": "natural", "mnist5k": "natural", "lfw-faces": "natural",
    "count": "structured", "orientation": "structured", "location": "structured",
}  # fmt: skip
"""The mini-benchmark's tasks in VTAB-1k's groups: photographs and scans, and the procedural scenes."""
POINT_COLUMNS = (
    "kind", "id", "label", "method", "accuracy", "params", "params_convention", "params_without_head",
    "params_with_head", "ppt", "backbone", "dataset", "source",
)  # fmt: skip
"""Columns of ``combine_points``; ``reference_points`` gives the same ones minus kind and id, plus its own."""

Head = Literal["without", "with"]


# ----------------------------------------------------------------------------------------------------------------
# 1. Pareto front
# ----------------------------------------------------------------------------------------------------------------
def pareto_front(
    df: pd.DataFrame,
    x: str = "params",
    y: str = "accuracy",
    minimize_x: bool = True,
    maximize_y: bool = True,
) -> pd.Series:
    """Mark the non-dominated rows of ``df`` in the (x, y) plane.

    A row is dominated when another row is at least as good on both x and y and strictly better on one.
    Consequences worth knowing: exact duplicates do not dominate each other, so all copies of a front point
    stay on the front; of two rows with equal x, only the better y can be on the front (and likewise for equal y).
    Rows with NaN in x or y are never on the front and never dominate another row.

    Args:
        df: the table; any index.
        x, y: column names.
        minimize_x: smaller x is better (parameters); False for larger is better.
        maximize_y: larger y is better (accuracy); False for smaller is better (error, latency).

    Returns:
        A boolean Series named "pareto", aligned with ``df.index``.
    """
    # Turn both into costs (smaller is better): a row is on the front iff its y cost is below every y cost of a row
    # with a strictly smaller x cost, and is the smallest y cost among rows with the same x cost. O(n log n).
    x_cost = pd.to_numeric(df[x], errors="coerce").to_numpy(dtype=float) * (1.0 if minimize_x else -1.0)
    y_cost = pd.to_numeric(df[y], errors="coerce").to_numpy(dtype=float) * (-1.0 if maximize_y else 1.0)
    valid = ~(np.isnan(x_cost) | np.isnan(y_cost))
    on_front = np.zeros(len(df), dtype=bool)
    if valid.any():
        positions = np.flatnonzero(valid)
        order = np.lexsort((y_cost[positions], x_cost[positions]))  # by x cost, then y cost
        xs, ys = x_cost[positions][order], y_cost[positions][order]
        new_x = np.r_[True, xs[1:] != xs[:-1]]  # the first row of each run of equal x cost
        group_min = ys[new_x]  # the smallest y cost of each equal-x group (sorted by y cost within the group)
        best_before = np.r_[np.inf, np.minimum.accumulate(group_min)[:-1]]  # min y cost over strictly smaller x
        group = np.cumsum(new_x) - 1
        keep = (ys == group_min[group]) & (ys < best_before[group])
        on_front[positions[order[keep]]] = True
    return pd.Series(on_front, index=df.index, name="pareto")


def fronts_by_kind(points: pd.DataFrame, x: str = "params", y: str = "accuracy") -> pd.Series:
    """`pareto_front` of each ``kind`` of ``combine_points`` output on its own: your runs and the papers' points are
    results on different tasks, so neither dominates the other. A boolean Series named "front", aligned with
    ``points.index``."""
    front = pd.Series(False, index=points.index, name="front")
    for _, rows in points.groupby("kind", sort=False):
        front[rows.index] = pareto_front(rows, x=x, y=y).to_numpy()
    return front


# ----------------------------------------------------------------------------------------------------------------
# 2. Efficiency score
# ----------------------------------------------------------------------------------------------------------------
def ppt_score(
    acc_percent: float | np.ndarray | pd.Series, params: float | np.ndarray | pd.Series
) -> float | np.ndarray | pd.Series:
    """V-PETL Bench's performance-parameter trade-off, PPT = acc/100 * exp(-log10(params / 1e7 + 1)).

    Vectorised: returns what numpy broadcasting of the inputs gives (a float, an array, or a Series aligned
    like the inputs). ``params`` is an absolute count (not millions); which convention (with or without the
    head) is the caller's choice and should match across the points compared. NaN in, NaN out.
    """
    if isinstance(acc_percent, list | tuple):
        acc_percent = np.asarray(acc_percent, dtype=float)
    if isinstance(params, list | tuple):
        params = np.asarray(params, dtype=float)
    return acc_percent / 100.0 * np.exp(-np.log10(params / 1e7 + 1.0))


# ----------------------------------------------------------------------------------------------------------------
# 3. Reference results
# ----------------------------------------------------------------------------------------------------------------
def load_reference_results(path: str | Path | None = None) -> pd.DataFrame:
    """The published per-task numbers, one row per (benchmark, method, source, task), and by default the measured
    mini-benchmark's (`mini_benchmark_results`) after them; see the CSV's columns.

    Rows may carry ``accuracy_std`` (over seeds), ``n_seeds`` and ``params_with_head_M`` (a second count, with
    the head, beside ``params_M`` without it); NaN where a source does not give them.

    Args:
        path: a CSV with ``REFERENCE_COLUMNS``; default the shipped ``REFERENCE_RESULTS`` and the mini-benchmark.

    Raises:
        ValueError: a column is missing.
    """
    if path is None:
        with REFERENCE_RESULTS.open("rb") as shipped:  # works inside a zip or a wheel too, unlike a file path
            frame = pd.read_csv(shipped)
        frame = pd.concat([frame, mini_benchmark_results()], ignore_index=True)
    else:
        frame = pd.read_csv(path)
    missing = [c for c in REFERENCE_COLUMNS if c not in frame]
    if missing:
        raise ValueError(f"{path or REFERENCE_RESULTS}: missing columns {', '.join(missing)}")
    head = frame["params_include_head"]
    if head.dtype != bool:  # e.g. read from a file that spells booleans differently
        frame["params_include_head"] = head.astype(str).str.strip().str.lower().isin(["true", "1", "yes"])
    return frame


def load_mini_benchmark(path: str | Path | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The mini-benchmark's measured rows (one per task, method, options and seed: ``bench/mini_vtab/README.md``
    names the columns) and its coverage record (the command, the settings, the grid's point count, the points
    still missing). Default: the shipped copy; ``path`` names a results CSV with its ``.json`` beside it."""
    if path is None:
        with MINI_BENCHMARK.open("rb") as rows, MINI_BENCHMARK_COVERAGE.open("rb") as info:
            return pd.read_csv(rows, dtype={"options": str}), json.load(info)
    path = Path(path)
    return pd.read_csv(path, dtype={"options": str}), json.loads(path.with_suffix(".json").read_text())


def mini_benchmark_results(rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """The mini-benchmark per (task, method with its options), in the shape of the papers' results: test accuracy
    averaged over seeds (``accuracy``, with ``accuracy_std``, the sample standard deviation over seeds, NaN for one
    seed, and ``n_seeds``), both parameter counts. A diverged point has no test accuracy and counts in no mean.

    Args:
        rows: measured rows as `load_mini_benchmark` reads them (default the shipped ones).
    """
    rows = load_mini_benchmark()[0] if rows is None else rows
    rows = rows[rows["test_acc"].notna()]
    grouped = rows.groupby(["task", "name"], sort=False)
    frame = grouped.agg(
        accuracy=("test_acc", "mean"),
        accuracy_std=("test_acc", "std"),
        n_seeds=("seed", "nunique"),
        params_without=("params_without_head", "first"),
        params_with=("params_with_head", "first"),
        img_size=("img_size", "first"),
    ).reset_index()
    return pd.DataFrame(
        {
            "benchmark": MINI_BENCHMARK_NAME,
            "method": frame["name"],
            "task": frame["task"],
            "group": frame["task"].map(MINI_BENCHMARK_GROUPS),
            "accuracy": frame["accuracy"],
            "params_M": frame["params_without"] / 1e6,
            "params_include_head": False,
            "backbone": "DINOv2 ViT-S/14 (offline), " + frame["img_size"].astype("Int64").astype(str) + " px",
            "source": "PETLab mini-benchmark",
            "accuracy_std": frame["accuracy_std"],
            "n_seeds": frame["n_seeds"],
            "params_with_head_M": frame["params_with"] / 1e6,
        }
    )


def _params_columns(
    frame: pd.DataFrame, without: pd.Series, with_: pd.Series, prefer: Head = "without"
) -> pd.DataFrame:
    """Add params_without_head, params_with_head, params (the preferred one where known) and its convention."""
    first, second = (without, with_) if prefer == "without" else (with_, without)
    frame["params_without_head"] = without.astype(float)
    frame["params_with_head"] = with_.astype(float)
    frame["params"] = first.astype(float).fillna(second.astype(float))
    other = "with" if prefer == "without" else "without"
    convention = np.where(first.notna(), f"{prefer} head", np.where(second.notna(), f"{other} head", None))
    frame["params_convention"] = pd.Series(convention, index=frame.index, dtype=object)
    return frame


def reference_points(
    benchmark: str = "VTAB-1k",
    average: Literal["mean19", "groups"] = "mean19",
    results: pd.DataFrame | None = None,
    prefer: Head = "without",
) -> pd.DataFrame:
    """One point per (method, source, backbone) of a benchmark: its average accuracy and parameter count.

    Args:
        benchmark: a value of the ``benchmark`` column ("VTAB-1k", "FGVC", ...).
        average: "mean19": the plain mean over tasks (the 19 VTAB-1k tasks; RLRR's "Mean Total");
            "groups": the mean of the group means (VTAB-1k natural / specialized / structured; FacT's
            "Average"). With a single group (FGVC) both are the plain mean over tasks.
        results: per-task results (default ``load_reference_results()``).
        prefer: which parameter convention fills ``params`` where a paper gives it (see the module docstring).

    Returns:
        Columns label ("method [source]"), method (with its ``*`` for AugReg rows), accuracy, params and the
        ``params_*`` columns in absolute counts, ppt, backbone (" AugReg" appended for ``*`` rows whose label
        lacks it), dataset (the benchmark), source, average, n_tasks, and accuracy_std: the mean over tasks of
        each task's standard deviation over seeds (the mini-benchmark; NaN for the papers). Methods in the order
        of the file.

    Raises:
        ValueError: unknown benchmark or average.
    """
    if average not in ("mean19", "groups"):
        raise ValueError(f"average must be 'mean19' or 'groups', not {average!r}")
    results = load_reference_results() if results is None else results
    rows = results[results["benchmark"] == benchmark]
    if rows.empty:
        raise ValueError(f"no reference results for {benchmark!r}; have {', '.join(results['benchmark'].unique())}")
    rows = rows.assign(**{c: rows.get(c, np.nan) for c in ("accuracy_std", "params_with_head_M")})
    keys = ["method", "source", "backbone"]
    grouped = rows.groupby(keys, sort=False)
    if average == "mean19":
        acc = grouped["accuracy"].mean()
    else:
        acc = rows.groupby([*keys, "group"], sort=False)["accuracy"].mean().groupby(level=keys, sort=False).mean()
    info = grouped.agg(
        params_M=("params_M", "first"),
        include_head=("params_include_head", "first"),
        n_tasks=("task", "nunique"),
        accuracy_std=("accuracy_std", "mean"),  # the mean over tasks of each task's spread over seeds
        second_params_M=("params_with_head_M", "mean"),  # with the head: it differs by task (its class count)
    )
    points = info.join(acc.rename("accuracy")).reset_index()
    params = points["params_M"] * 1e6
    with_head = params.where(points["include_head"]).fillna(points["second_params_M"] * 1e6)
    points = _params_columns(points, params.where(~points["include_head"]), with_head, prefer)
    augreg = points["method"].str.contains("*", regex=False) & ~points["backbone"].str.contains("AugReg")
    points.loc[augreg, "backbone"] = points.loc[augreg, "backbone"] + " AugReg"
    points["label"] = points["method"] + " [" + points["source"] + "]"
    points["ppt"] = ppt_score(points["accuracy"], points["params"])
    points["dataset"] = benchmark
    points["average"] = average
    columns = [c for c in POINT_COLUMNS if c not in ("kind", "id")] + ["average", "n_tasks", "accuracy_std"]
    return points[columns]


# ----------------------------------------------------------------------------------------------------------------
# 4. Runs and references in one frame
# ----------------------------------------------------------------------------------------------------------------
def _column(frame: pd.DataFrame, name: str | None, default: object = pd.NA) -> pd.Series:
    """A column if present, else a constant column (the run store's optional fields may be absent)."""
    if name is not None and name in frame:
        return frame[name]
    return pd.Series(default, index=frame.index, dtype=object)


def combine_points(
    runs: pd.DataFrame | None,
    references: pd.DataFrame | None = None,
    accuracy: str = "test_acc",
    params: str = "trainable_params",
    params_with_head: str = "trainable_params_with_head",
    label: str = "label",
    prefer: Head = "without",
    dataset: str | None = "dataset.name",
    backbone: str | None = "backbone.name",
) -> pd.DataFrame:
    """User runs and reference points in one frame with a ``kind`` column ("run" or "reference").

    Args:
        runs: a run table (``RunStore.list_runs()`` by default column names: id, label, method, test_acc in
            percent, trainable_params, trainable_params_with_head, dataset.name, backbone.name); None or empty
            for references only. A run without a label is labelled "method id".
        references: ``reference_points(...)`` output (or None).
        accuracy, params, params_with_head, label, dataset, backbone: column names in ``runs``; dataset and
            backbone may be absent.
        prefer: which parameter convention fills ``params`` where both are known.

    Returns:
        ``POINT_COLUMNS`` (references keep their extra columns, NaN for runs), runs first, index 0..n-1.
    """
    frames = []
    if runs is not None and len(runs):
        out = pd.DataFrame(index=runs.index)
        out["kind"] = "run"
        out["id"] = _column(runs, "id").astype(object)
        out["method"] = _column(runs, "method").astype(object)
        fallback = out["method"].astype(str) + " " + out["id"].astype(str)
        out["label"] = _column(runs, label).astype(object).where(_column(runs, label).notna(), fallback)
        out["accuracy"] = pd.to_numeric(_column(runs, accuracy), errors="coerce").astype(float)
        out = _params_columns(
            out,
            pd.to_numeric(_column(runs, params), errors="coerce"),
            pd.to_numeric(_column(runs, params_with_head), errors="coerce"),
            prefer,
        )
        out["ppt"] = ppt_score(out["accuracy"], out["params"])
        out["backbone"] = _column(runs, backbone).astype(object)
        out["dataset"] = _column(runs, dataset).astype(object)
        out["source"] = "PETLab run"
        frames.append(out)
    if references is not None and len(references):
        ref = references.copy()
        ref["kind"] = "reference"
        ref["id"] = pd.NA
        frames.append(ref)
    if not frames:
        return pd.DataFrame(columns=list(POINT_COLUMNS))
    combined = pd.concat(frames, ignore_index=True)
    rest = [c for c in combined.columns if c not in POINT_COLUMNS]
    return combined[list(POINT_COLUMNS) + rest]
