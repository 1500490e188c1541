"""The offline mini-benchmark, through the sweep engine, into its own run store; writes results.csv.

    python bench/mini_vtab/run.py [--device auto|cpu|cuda] [--img-size 224] [--stop-after MINUTES]

1. The learning-rate search (once): `lr_search.toml` over `grid.toml`'s methods, one seed, a subset of the tasks;
   each method's rate with the best mean validation accuracy is written to ``lr_choice.json`` (with every score).
2. The grid: `grid.toml` with those rates, seeds outermost (a stopped run has whole seeds done first).
3. The results: one row per point of the grid with a result (``results.csv``) and what it covers
   (``results.json``: the command, the settings, the grid's points and the missing ones); both copied into
   ``core/assets`` as ``mini_benchmark.csv`` / ``.json``, which `core.pareto` reads as a reference benchmark.
   ``--table`` prints the results as the README's Markdown table; ``pareto.svg`` is the README's figure.

Resumable: each phase is a sweep found again by its name in the store, and submitting it again skips the points
with a result (`core.sweeps.submit_sweep`). ``--stop-after`` cancels the sweep after so many minutes and still
writes the results; the same command later goes on from there. Rows of an earlier results file whose points the
store does not hold (another machine's store) are kept, so results from several stores add up.

The store is ``~/.petlab-mini-vtab`` by default (outside the repository, so later sessions find it); results of
other settings than the committed ones (``--img-size``, ``--device cuda``) go to ``--out`` beside it, never over
the committed file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing it

from core import sweeps  # noqa: E402
from core.jobs import ADDRESS_ENV, Resources  # noqa: E402
from core.runs import RunStore  # noqa: E402

GRID = HERE / "grid.toml"
LR_SEARCH = HERE / "lr_search.toml"
LR_CHOICE = HERE / "lr_choice.json"
RESULTS = HERE / "results.csv"
ASSETS = HERE.parents[1] / "core" / "assets"
DEFAULT_STORE = Path.home() / ".petlab-mini-vtab"
COLUMNS = [
    "task", "method", "options", "name", "seed", "params_without_head", "params_with_head", "val_acc", "test_acc",
    "wall_time_s", "device", "cpus", "status", "img_size", "steps", "batch_size", "lr", "run_id",
]  # fmt: skip
TITLES = {"fact": "FacT", "rlrr": "RLRR", "kadaptation": "KAdaptation", "lora": "LoRA", "adapter": "Adapter"}
TITLES |= {"vpt": "VPT-deep", "bitfit": "BitFit", "ssf": "SSF", "linear": "Linear probe", "full": "Full fine-tuning"}


def read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(path.read_text())


def method_key(table: dict[str, Any]) -> str:
    """A grid method's key in lr_choice.json: its name, and its variant where it has one (``fact-tt``)."""
    return table["name"] + (f"-{table['variant']}" if "variant" in table else "")


def display_name(method: str, options: dict[str, Any]) -> str:
    """A short name of a point's method and the options the grid sets (``FacT-TT r=8``, ``LoRA r=8 q,v``)."""
    title = TITLES.get(method, method)
    if "variant" in options:
        title += f"-{str(options['variant']).upper()}"
    if "rank" in options:
        title += f" r={options['rank']}"
    if method == "lora":
        title += f" {options.get('targets', '')}".rstrip()
    return title


def with_settings(raw: dict[str, Any], device: str, img_size: int | None) -> dict[str, Any]:
    raw = json.loads(json.dumps(raw))  # a deep copy
    raw.setdefault("train", {})["device"] = device
    if img_size is not None:
        raw.setdefault("data", {})["img_size"] = img_size
    return raw


def search_spec(grid: dict[str, Any], search: dict[str, Any]) -> sweeps.SweepSpec:
    """The learning-rate search: each grid method at its first option values, at each rate of its search grid."""
    raw = {**grid, "name": f"{grid['name']}-lr-search", "seeds": [search["seed"]], "datasets": search["datasets"]}
    tables = []
    for table in grid["method"]:
        first = {k: (v[0] if isinstance(v, list) else v) for k, v in table.items()}
        rates = search.get("method", {}).get(method_key(table), search["lr"])
        tables.append({**first, "train": {**table.get("train", {}), "lr": rates}})
    raw["method"] = tables
    return sweeps.SweepSpec.from_dict(raw)


def grid_spec(grid: dict[str, Any], choice: dict[str, float]) -> sweeps.SweepSpec:
    """The benchmark's grid with each method's chosen learning rate."""
    raw = dict(grid)
    raw["method"] = [{**t, "train": {**t.get("train", {}), "lr": choice[method_key(t)]}} for t in grid["method"]]
    return sweeps.SweepSpec.from_dict(raw)


def run_sweep(
    spec: sweeps.SweepSpec, store: RunStore, deadline: float | None, address: str | None, cpus: int | None
) -> bool:
    """Submit (or resume) the sweep named like ``spec`` and follow it, each point reserving ``cpus`` CPUs (its torch
    threads; None: a whole node's); True once every point has its result."""
    named = [s for s in sweeps.list_sweeps(store.root) if s.name == spec.name]
    points = sweeps.check_points(spec)
    guess = sweeps.estimate(points, store)
    print(f"{spec.name}: {len(points)} points, about {guess.total_s / 60:.0f} min ({guess.basis})", flush=True)
    sweep_id = sweeps.submit_sweep(
        spec,
        store.root,
        sweep_id=named[0].id if named else None,
        address=address,
        resources=None if cpus is None else Resources(cpus=cpus),
    )
    submission = sweeps.load_sweep(store.root, sweep_id)["submissions"][-1]
    print(f"sweep {sweep_id}: {len(submission['submitted'])} submitted, {submission['skipped']} have results")
    seen: set[str] = set()

    def show(summary: sweeps.SweepSummary) -> None:
        ended = store.list_runs(sweep_id=sweep_id, status=["completed", "diverged", "failed", "cancelled"])
        for run in ended[~ended["id"].isin(seen)].to_dict("records")[::-1]:
            seen.add(run["id"])
            print(
                f"  [{summary.finished}/{summary.points}] {run['label']}: {run['status']}, val "
                f"{run['best_val_acc']}, test {run['test_acc']}, {run['wall_time_s'] or 0:.0f} s",
                flush=True,
            )
        if deadline is not None and time.monotonic() > deadline and not summary.cancel_requested:
            print(f"stop: cancelling sweep {sweep_id} (resume with the same command)", flush=True)
            sweeps.cancel_sweep(sweep_id, store.root)

    try:
        summary = sweeps.wait_sweep(store, sweep_id, on_update=show, poll_s=5.0)
    except KeyboardInterrupt:
        sweeps.cancel_sweep(sweep_id, store.root)
        summary = sweeps.wait_sweep(store, sweep_id)
    print(f"sweep {sweep_id}: {summary.status}, {summary.done} of {summary.points} done", flush=True)
    return summary.status == "completed"


def grid_points(spec: sweeps.SweepSpec) -> dict[str, tuple[str, str, str, int]]:
    """Point key -> (task, method, the options the grid sets as JSON, seed) of every point of ``spec``, in the
    sweep's order (seeds, tasks, methods, options, training axes)."""
    described = [
        (dataset["name"], grid.name, json.dumps(dict(zip(grid.options, values, strict=True)), sort_keys=True), seed)
        for seed in spec.seeds
        for dataset in spec.datasets
        for grid in spec.methods
        for values in itertools.product(*grid.options.values())
        for _ in itertools.product(*{**spec.train, **grid.train}.values())
    ]
    checked = sweeps.check_points(spec)
    return {sweeps.point_key(p.experiment): d for p, d in zip(checked, described, strict=True)}


def point_rows(store: RunStore, spec: sweeps.SweepSpec, points: dict[str, tuple[str, str, str, int]]) -> pd.DataFrame:
    """One row per point of ``spec`` with a completed or diverged run in its sweep (the newest such run)."""
    named = [s for s in sweeps.list_sweeps(store.root) if s.name == spec.name]
    rows: dict[str, dict[str, Any]] = {}
    runs = store.list_runs(sweep_id=named[0].id, status=list(sweeps.SETTLED_STATUSES)) if named else None
    for run_id in [] if runs is None else runs["id"][::-1]:  # oldest first: newer runs of a point replace them
        run = store.get_run(run_id)
        key = sweeps.point_key(run)
        if key not in points:  # a point of an earlier version of the grid
            continue
        task, method, options, seed = points[key]
        rows[key] = {
            "task": task,
            "method": method,
            "options": options,
            "name": display_name(method, json.loads(options)),
            "seed": seed,
            "params_without_head": run["trainable_params"],
            "params_with_head": run["trainable_params_with_head"],
            "val_acc": run["best_val_acc"],
            "test_acc": run["test_acc"],
            "wall_time_s": run["wall_time_s"],
            "device": run["device"],
            "cpus": (run["resources"] or {}).get("CPU"),  # CPUs reserved = torch threads (with no GPU)
            "status": run["status"],
            "img_size": run["dataset"]["img_size"],
            "steps": run["train_config"]["steps"],
            "batch_size": run["train_config"]["batch_size"],
            "lr": run["train_config"]["lr"],
            "run_id": run["id"],
        }
    return pd.DataFrame(list(rows.values()), columns=COLUMNS)


def choose_rates(rows: pd.DataFrame) -> dict[str, Any]:
    """Each grid method's learning rate: the best mean validation accuracy over the search tasks (diverged: 0)."""
    keys = [
        method + (f"-{json.loads(o)['variant']}" if "variant" in o else "")
        for method, o in zip(rows["method"], rows["options"], strict=True)
    ]
    scores = rows.assign(val=rows["val_acc"].fillna(0.0), key=keys).groupby(["key", "lr"])["val"].mean()
    chosen = {}
    for key, group in scores.reset_index().groupby("key", sort=False):
        best = group.sort_values(["val", "lr"], ascending=[False, True]).iloc[0]
        means = {f"{r.lr:g}": round(r.val, 2) for r in group.itertuples()}
        chosen[key] = {"lr": float(best["lr"]), "mean_val_acc": means}
    return chosen


def coverage(points: dict[str, tuple[str, str, str, int]], rows: pd.DataFrame, **info: Any) -> dict[str, Any]:
    """What the results cover: the grid's points as (task, method, options, seed), and those without a row."""
    done = set(zip(rows["task"], rows["method"], rows["options"], rows["seed"], strict=True))
    names = ("task", "method", "options", "seed")
    missing = [dict(zip(names, p, strict=True)) for p in points.values() if p not in done]
    return {
        "benchmark": "PETLab mini-benchmark (measured)",
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **info,
        "points": len(points),
        "measured": len(points) - len(missing),
        "complete": not missing,
        "missing": missing,
    }


def write_results(rows: pd.DataFrame, out: Path) -> pd.DataFrame:
    """Write ``rows`` with the earlier file's rows of points that ``rows`` lacks; returns what was written."""
    key = ["task", "method", "options", "seed"]
    if out.is_file():
        earlier = pd.read_csv(out, dtype={"options": str})
        new = pd.MultiIndex.from_frame(rows[key]) if len(rows) else pd.MultiIndex.from_tuples([], names=key)
        rows = pd.concat([earlier[~pd.MultiIndex.from_frame(earlier[key]).isin(new)], rows], ignore_index=True)
    rows = rows.sort_values(["seed", "task", "method", "options"], kind="stable")
    rows.to_csv(out, index=False, float_format="%.6g")
    return rows


def markdown_table(path: Path) -> str:
    """The README's table of a results file: mean test accuracy (and its spread over seeds) per task and method,
    the mean over tasks, the trainable parameters without the head, and the seeds each cell averages."""
    from core.pareto import load_mini_benchmark, mini_benchmark_results

    per_task = mini_benchmark_results(load_mini_benchmark(path)[0])
    if per_task.empty:
        return "(no results yet)"
    tasks = list(dict.fromkeys(per_task["task"]))
    lines = ["| method | params | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 3) + "|"]
    for method, rows in per_task.groupby("method", sort=False):
        cells = rows.set_index("task")
        text = [
            f"{cells.loc[t, 'accuracy']:.1f} ± {cells.loc[t, 'accuracy_std']:.1f} ({cells.loc[t, 'n_seeds']})"
            if t in cells.index
            else "-"
            for t in tasks
        ]
        mean = f"{rows['accuracy'].mean():.1f}" if len(rows) == len(tasks) else "-"
        lines.append(f"| {method} | {rows['params_M'].iloc[0] * 1e6:,.0f} | " + " | ".join(text) + f" | {mean} |")
    return "\n".join(lines)


def pareto_svg(rows: pd.DataFrame, width: int = 760, height: int = 440) -> str:
    """The README's figure of measured rows (a results file's), as a self-contained SVG: each method's mean test
    accuracy over the tasks against its trainable parameters without the head (log scale; the linear probe's 0 at
    the left edge), with the spread over seeds as a bar and the Pareto front (fewer parameters, higher accuracy) as
    a staircase; methods measured on fewer tasks than the most are left out. Empty when nothing is measured."""
    from html import escape

    import numpy as np

    from core.pareto import MINI_BENCHMARK_NAME, mini_benchmark_results, pareto_front, reference_points

    if rows.empty or rows["test_acc"].isna().all():
        return ""
    points = reference_points(MINI_BENCHMARK_NAME, "mean19", results=mini_benchmark_results(rows), prefer="without")
    points = points[points["n_tasks"] == points["n_tasks"].max()].reset_index(drop=True)  # complete rows only
    points["front"] = pareto_front(points, x="params", y="accuracy")
    left, right, top, bottom = 70, 190, 20, 50
    decades = np.log10(points["params"].clip(lower=1))
    low, high = 2.0, float(np.ceil(decades.max()))
    accuracy_low = float(np.floor((points["accuracy"] - points["accuracy_std"].fillna(0)).min() / 5) * 5)
    accuracy_high = float(np.ceil((points["accuracy"] + points["accuracy_std"].fillna(0)).max() / 5) * 5)

    def x(params: float) -> float:
        decade = np.log10(params) if params >= 1 else low - 0.6  # the linear probe's 0, left of the first decade
        return left + (decade - (low - 0.8)) / (high - (low - 0.8)) * (width - left - right)

    def y(accuracy: float) -> float:
        return top + (accuracy_high - accuracy) / (accuracy_high - accuracy_low) * (height - top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for decade in range(int(low), int(high) + 1):
        position = x(10.0**decade)
        parts.append(f'<line x1="{position:.1f}" y1="{top}" x2="{position:.1f}" y2="{height - bottom}" stroke="#eee"/>')
        parts.append(f'<text x="{position:.1f}" y="{height - bottom + 16}" text-anchor="middle">1e{decade}</text>')
    parts.append(f'<text x="{x(0):.1f}" y="{height - bottom + 16}" text-anchor="middle">0</text>')
    for accuracy in np.arange(accuracy_low, accuracy_high + 0.1, 5.0):
        position = y(accuracy)
        parts.append(f'<line x1="{left}" y1="{position:.1f}" x2="{width - right}" y2="{position:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{position + 4:.1f}" text-anchor="end">{accuracy:.0f}</text>')
    parts.append(
        f'<text x="{(left + width - right) / 2:.0f}" y="{height - 12}" text-anchor="middle">trainable parameters '
        "without the head (log scale)</text>"
    )
    parts.append(
        f'<text transform="translate(18,{(top + height - bottom) / 2:.0f}) rotate(-90)" text-anchor="middle">'
        "mean test accuracy over the six tasks (%)</text>"
    )
    front = points[points["front"]].sort_values("params")
    corners = []
    for previous, row in zip([None, *front.itertuples()], front.itertuples(), strict=False):
        if previous is not None:
            corners.append(f"{x(row.params):.1f},{y(previous.accuracy):.1f}")
        corners.append(f"{x(row.params):.1f},{y(row.accuracy):.1f}")
    parts.append(f'<polyline points="{" ".join(corners)}" fill="none" stroke="#999" stroke-dasharray="4 3"/>')
    placed = [(x(p) - 5, x(p) + 5, y(a) + 4) for p, a in zip(points["params"], points["accuracy"], strict=True)]
    # (left, right, baseline) of what a label must not cover: every point, and the labels drawn so far
    for row in points.sort_values("accuracy", ascending=False).itertuples():
        center_x, center_y = x(row.params), y(row.accuracy)
        spread = 0.0 if np.isnan(row.accuracy_std) else row.accuracy_std
        color = "#d62728" if row.front else "#1f77b4"
        parts.append(
            f'<line x1="{center_x:.1f}" y1="{y(row.accuracy - spread):.1f}" x2="{center_x:.1f}" '
            f'y2="{y(row.accuracy + spread):.1f}" stroke="{color}" stroke-opacity="0.5"/>'
        )
        parts.append(f'<circle cx="{center_x:.1f}" cy="{center_y:.1f}" r="4" fill="{color}"/>')
        text = str(row.method)
        span = 6.5 * len(text)
        for shift, side in itertools.product((0, -11, 11, -22, 22, -33, 33), (1, -1)):  # beside it, then nearby
            start = center_x + 7 if side > 0 else center_x - 7 - span
            baseline = center_y + 4 + shift
            if not any(
                start < b_end and b_start < start + span and abs(baseline - b_line) < 12
                for b_start, b_end, b_line in placed
            ):
                break
        placed.append((start, start + span, baseline))
        parts.append(f'<text x="{start:.1f}" y="{baseline:.1f}">{escape(text)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def one_cpu_per_point(device: str, address: str | None) -> int | None:
    """1 (one thread per point, a point per core at once) when the points run on this machine's CPU; None (a
    whole node's CPUs, or one GPU: `core.jobs.default_resources`) on a cluster or with a GPU. On 2 quiet cores two
    one-thread points took 0.81x the time of the same two points one after the other with two threads each; beside
    other sessions' tests a two-thread point took 150-570 s, a one-thread point 30-65 s (quiet: 13-16 s and 24-27
    s; bench/mini_vtab/README.md)."""
    if address or os.environ.get(ADDRESS_ENV) or device.startswith("cuda"):
        return None
    import torch

    return 1 if device == "cpu" or not torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE, help="the run store folder (default %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--img-size", type=int, default=None, help="image side (default: grid.toml's, 56)")
    parser.add_argument("--address", default=None, help="a Ray cluster (default: an embedded local Ray)")
    parser.add_argument(
        "--cpus-per-point",
        type=int,
        default=None,
        help="CPUs (torch threads) each point reserves (default: 1 when the points run on this machine's CPU, "
        "one point per core at once; else a whole node's, or one GPU)",
    )
    parser.add_argument("--stop-after", type=float, default=None, metavar="MINUTES", help="cancel after this long")
    parser.add_argument("--results-only", action="store_true", help="only write the results from the store")
    parser.add_argument("--out", type=Path, default=None, help="the results file (needed with other settings)")
    parser.add_argument("--table", action="store_true", help="print the results file as a Markdown table, run none")
    ns = parser.parse_args(argv)
    if ns.table:
        print(markdown_table(ns.out or RESULTS))
        return 0
    grid = read_toml(GRID)
    committed = ns.img_size in (None, grid["data"]["img_size"]) and ns.device == "auto"
    out = ns.out or (RESULTS if committed else None)
    if out is None:
        parser.error("results of other settings than the committed ones need --out FILE.csv")
    grid = with_settings(grid, ns.device, ns.img_size)
    search = read_toml(LR_SEARCH)
    store = RunStore(ns.store)
    deadline = None if ns.stop_after is None else time.monotonic() + 60 * ns.stop_after

    cpus = ns.cpus_per_point if ns.cpus_per_point is not None else one_cpu_per_point(ns.device, ns.address)
    running = not ns.results_only
    lr_spec = search_spec(grid, search)
    if not LR_CHOICE.is_file():
        search_done = run_sweep(lr_spec, store, deadline, ns.address, cpus) if running else False
        search_rows = point_rows(store, lr_spec, grid_points(lr_spec))
        search_rows.to_csv(HERE / "lr_search.csv", index=False, float_format="%.6g")
        if search_done or len(search_rows) == len(sweeps.check_points(lr_spec)):
            choice = choose_rates(search_rows)
            LR_CHOICE.write_text(json.dumps({"search": search, "choice": choice}, indent=1) + "\n")
    if LR_CHOICE.is_file():
        choice = {key: entry["lr"] for key, entry in json.loads(LR_CHOICE.read_text())["choice"].items()}
        spec = grid_spec(grid, choice)
        stopped = deadline is not None and time.monotonic() > deadline
        if running and not stopped:
            run_sweep(spec, store, deadline, ns.address, cpus)
        points = grid_points(spec)
        rows = point_rows(store, spec, points)
        search_state = "complete"
    else:  # the grid waits for its learning rates: its points are all missing (those of grid.toml's rates)
        choice, points = {}, grid_points(sweeps.SweepSpec.from_dict(grid))
        rows = pd.DataFrame(columns=COLUMNS)
        search_state = f"{len(pd.read_csv(HERE / 'lr_search.csv'))} of {len(sweeps.check_points(lr_spec))} points"
        print(f"the learning-rate search is not complete ({search_state}): run the same command again to go on")
    rows = write_results(rows, out)
    command = "python bench/mini_vtab/run.py" + "".join(
        f" --{name.replace('_', '-')} {shlex.quote(str(value))}"
        for name, value in (
            ("device", ns.device),
            ("img_size", ns.img_size),
            ("cpus_per_point", ns.cpus_per_point),
            ("out", ns.out),
        )
        if value not in (None, "auto")
    )
    settings = {"device": ns.device, "img_size": grid["data"]["img_size"], "lr": choice, "lr_search": search_state}
    info = coverage(points, rows, command=command, settings=settings)
    head = json.dumps({k: v for k, v in info.items() if k != "missing"}, indent=1)[:-2]
    missing = ",\n".join(f"  {json.dumps(point)}" for point in info["missing"])  # a point a line
    out.with_suffix(".json").write_text(f'{head},\n "missing": [\n{missing}\n ]\n}}\n')
    if out == RESULTS:  # the committed results: also the package's copy, which core.pareto reads
        shutil.copyfile(out, ASSETS / "mini_benchmark.csv")
        shutil.copyfile(out.with_suffix(".json"), ASSETS / "mini_benchmark.json")
        (HERE / "pareto.svg").write_text(pareto_svg(rows))  # the README's figure
    print(f"{out}: {info['measured']} of {info['points']} points of the grid have results")
    return 0 if info["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
