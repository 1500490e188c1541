"""Sweeps: the cartesian product of methods with their option lists, datasets, seeds and training settings, every
point a fine-tune run in the store tagged with one sweep id.

Read in this order:
    1. The grid: a typed `SweepSpec`, from a TOML file (`load_grid`) or the command line's flags (`spec_from_flags`);
       both go through `SweepSpec.from_dict`, so they expand to the same points. Anywhere in the grid a list is an
       axis: ``rank = [4, 8]``, ``lr = [1e-3, 5e-3]``, ``img_size = [56, 112]``.
    2. The points: `expand` builds every point and checks every one (options against the backbone's shape on a
       weightless model, data and training settings) before anything is submitted; a bad point refuses the whole
       sweep with a message naming it. A point's identity (`point_key`) is its method, resolved options, dataset
       spec, backbone and training settings (the seed among them), never its label.
    3. Submitting, resuming, cancelling: `submit_sweep` records the sweep and submits each point through
       `core.jobs.submit`; submitting it again under the same id (`resume_sweep`) skips the points that already
       have a completed (or diverged) run, or one queued or running. `cancel_sweep` ends its queued points at once
       and asks its running ones to stop. `summarize` / `list_sweeps` count the points by the status of their
       latest run.
    4. The time estimate shown before starting (`estimate`): a cost model from steps, batch, tokens and the
       backbone's size, calibrated by the wall times of recent completed runs in the store when there are some.

A sweep is recorded as one JSON file, ``sweeps/<sweep_id>.json`` under the run store's folder: its grid, its points'
identities, labels and estimates, and each submission. The runs table stays the only record of what ran (each run
carries the sweep id), so the file is written only when a sweep is submitted, resumed or cancelled, by the caller,
and needs no change to the run store's schema.

Points run as jobs of `core.jobs` rather than Ray Tune trials: the job engine already queues each point as a Ray task
that reserves its resources, records it in the run store, cancels it from there and lets it outlive the command
(``--detach``). Tune would add a second driver loop and trial records beside the store, and its ASHA early stopping
would need the trainer to report to Tune at every step, for grids of short runs where a whole point costs little.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import math
import os
import re
import secrets
import statistics
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import methods
from core.backbone import BackboneSpec, skeleton
from core.config import coerce_fields, unwrap_optional
from core.data import DataSpec
from core.experiment import CheckedExperiment, Experiment, experiment_record, validate
from core.runs import ACTIVE_STATUSES, RunStore, default_root
from core.train import TrainConfig

if TYPE_CHECKING:
    from core.jobs import Resources

SWEEPS_DIR = "sweeps"
KEY_FIELDS = ("method", "method_options", "backbone", "dataset", "train_config")
"""The run record's fields that make a point's identity (the seed is in ``train_config``)."""
SETTLED_STATUSES = ("completed", "diverged")
"""A point with a run in one of these has its result: resuming does not run it again (a diverged run is a result of
its settings, and would diverge again)."""

Axis = tuple[Any, ...]


# ----------------------------------------------------------------------------------------------------------------
# 1. The grid
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodGrid:
    """One method of a sweep and its axes.

    Attributes:
        name: A registered method.
        options: Option name -> the values it takes (one point per combination); options left out keep the
            method's defaults.
        train: Training settings of this method's points only (e.g. its own learning rate grid); each replaces
            the sweep's axis of the same name.
    """

    name: str
    options: dict[str, Axis] = field(default_factory=dict)
    train: dict[str, Axis] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepSpec:
    """A grid of fine-tunes: methods x datasets x data axes x training axes x seeds.

    Attributes:
        methods: The methods and their option axes.
        datasets: Each ``{"name": ..., **DataSpec fields}``: fields given here hold for that dataset only, over
            ``data``.
        seeds: Training seeds (`TrainConfig.seed`); the data split stays fixed by ``data``'s ``seed``.
        data: `DataSpec` fields (not ``name``) for every dataset; a tuple of several values is an axis.
        train: `TrainConfig` fields (not ``seed``) for every point; a tuple of several values is an axis.
        backbone: The backbone, built for each point at the data's size and class count.
        name: A short name, shown in listings and put in front of each run's label.
    """

    methods: tuple[MethodGrid, ...]
    datasets: tuple[dict[str, Any], ...]
    seeds: tuple[int, ...] = (0,)
    data: dict[str, Axis] = field(default_factory=dict)
    train: dict[str, Axis] = field(default_factory=dict)
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    name: str | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SweepSpec:
        """The spec from its TOML shape (see ``bench/mini_vtab/grid.toml``)::

            name = "..."; seeds = [0, 1]; datasets = ["digits", {name = "count", n_generated = 1300}]
            [backbone] name, weights, drop_path_rate
            [data]     DataSpec fields          [train]  TrainConfig fields
            [[method]] name = "lora"; rank = [4, 8]; targets = "q,v"; train = {lr = [1e-3, 5e-3]}

        Values may be text (from the command line); they are converted to the field types when the points are
        built. Raises ValueError for an unknown or misplaced key, naming it.
        """
        _refuse_unknown("the sweep", raw, {"name", "seeds", "datasets", "backbone", "data", "train", "method"})
        if not raw.get("method"):
            raise ValueError(
                "a sweep needs at least one method ([[method]] in a grid file, --method on the command line)"
            )
        if not raw.get("datasets"):
            raise ValueError("a sweep needs at least one dataset (datasets = [...], or --dataset)")
        grids = []
        for entry in _as_list(raw["method"]):
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise ValueError(f"each method of a sweep is a table with a name, got {entry!r}")
            methods.get_method(entry["name"])  # an unknown name fails here, listing the registered ones
            options = {k: _axis(k, v) for k, v in entry.items() if k not in ("name", "train")}
            grids.append(MethodGrid(entry["name"], options, _train_axes(entry.get("train", {}), entry["name"])))
        datasets = []
        for entry in _as_list(raw["datasets"]):
            entry = {"name": entry} if isinstance(entry, str) else dict(entry)
            if "name" not in entry:
                raise ValueError(f"a dataset of a sweep needs a name, got {entry!r}")
            _refuse_unknown(f"dataset {entry['name']!r}", entry, _field_names(DataSpec))
            datasets.append(entry)
        data = dict(raw.get("data", {}))
        _refuse_unknown("[data]", data, _field_names(DataSpec) - {"name"}, name="name the datasets in datasets")
        backbone = dict(raw.get("backbone", {}))
        from_data = "each point's backbone is built at its data's size, with its classes"
        _refuse_unknown("[backbone]", backbone, {"name", "weights", "drop_path_rate"}, img_size=from_data)
        try:
            seeds = tuple(int(seed) for seed in _axis("seeds", raw.get("seeds", 0)))
        except (TypeError, ValueError):
            raise ValueError(f"seeds are whole numbers, got {raw.get('seeds')!r}") from None
        return cls(
            methods=tuple(grids),
            datasets=tuple(datasets),
            seeds=seeds,
            data={k: _axis(k, v) for k, v in data.items()},
            train=_train_axes(raw.get("train", {}), "the sweep"),
            backbone=BackboneSpec(**coerce_fields(BackboneSpec, backbone)),
            name=raw.get("name"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The TOML shape `from_dict` reads (an axis of one value written as that value); JSON-ready."""

        def plain(axes: Mapping[str, Axis]) -> dict[str, Any]:
            return {k: list(v) if len(v) > 1 else v[0] for k, v in axes.items()}

        method_tables = []
        for grid in self.methods:
            table = {"name": grid.name, **plain(grid.options)}
            if grid.train:
                table["train"] = plain(grid.train)
            method_tables.append(table)
        backbone = dataclasses.asdict(self.backbone)
        return {
            **({"name": self.name} if self.name else {}),
            "seeds": list(self.seeds),
            "datasets": [d["name"] if len(d) == 1 else dict(d) for d in self.datasets],
            "backbone": {k: backbone[k] for k in ("name", "weights", "drop_path_rate")},
            "data": plain(self.data),
            "train": plain(self.train),
            "method": method_tables,
        }


def load_grid(path: Path | str) -> SweepSpec:
    """A `SweepSpec` from a TOML grid file. Raises ValueError for a malformed file or grid."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as a package
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        raw = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None
    return SweepSpec.from_dict(raw)


_NEW_OPTION = re.compile(r",(?=\s*\w+\s*=)")


def parse_method_flag(text: str) -> dict[str, Any]:
    """One ``--method`` flag as a method table: ``NAME[:OPTION=VALUES[,OPTION=VALUES...]]``.

    VALUES are alternatives separated by ``,`` (``lora:rank=4,8``); options whose text itself holds commas
    (``targets``: ``q,v``) separate their alternatives by ``|`` only (``lora:rank=8,targets=q,v|all``). A new
    option starts at a comma followed by ``NAME=``.
    """
    name, _, rest = text.partition(":")
    table: dict[str, Any] = {"name": name.strip()}
    method = methods.get_method(table["name"])
    hints = typing.get_type_hints(method.config)
    for item in _NEW_OPTION.split(rest) if rest.strip() else []:
        key, equals, values = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ValueError(f"--method {text!r}: {item!r} is not OPTION=VALUE[,VALUE...]")
        hint = unwrap_optional(hints[key])[0] if key in hints else str
        separators = r"\|" if callable(getattr(hint, "parse", None)) else r"[,|]"
        table[key] = [v.strip() for v in re.split(separators, values)]
    return table


def spec_from_flags(
    method_flags: Sequence[str],
    datasets: Sequence[str],
    seeds: str | Sequence[int] = "0",
    data: Mapping[str, str] | None = None,
    train: Mapping[str, str] | None = None,
    backbone: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> SweepSpec:
    """A `SweepSpec` from command-line text: ``--method`` flags (`parse_method_flag`), dataset names (each may list
    several, comma-separated), seeds ``"0,1"``, and data / training settings as text where ``a,b`` is an axis."""

    def axes(values: Mapping[str, str] | None) -> dict[str, list[str]]:
        return {k: [v.strip() for v in str(text).split(",")] for k, text in (values or {}).items()}

    raw: dict[str, Any] = {
        "method": [parse_method_flag(flag) for flag in method_flags],
        "datasets": [n.strip() for names in datasets for n in names.split(",") if n.strip()],
        "seeds": [int(s) for s in seeds.split(",")] if isinstance(seeds, str) else list(seeds),
        "data": axes(data),
        "train": axes(train),
        "backbone": dict(backbone or {}),
    }
    if name:
        raw["name"] = name
    return SweepSpec.from_dict(raw)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _axis(name: str, value: Any) -> Axis:
    values = tuple(_as_list(value))
    if not values:
        raise ValueError(f"{name} = [] leaves the sweep without points; give at least one value")
    return values


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _train_axes(values: Mapping[str, Any], where: str) -> dict[str, Axis]:
    known = _field_names(TrainConfig) - {"seed"}
    _refuse_unknown(f"the training settings of {where}", values, known, seed="training seeds go in seeds = [...]")
    return {k: _axis(k, v) for k, v in values.items()}


def _refuse_unknown(where: str, values: Mapping[str, Any], known: set[str], **misplaced: str) -> None:
    """ValueError naming the keys of ``values`` not in ``known``; ``misplaced`` says where a key belongs instead."""
    unknown = sorted(set(values) - known)
    if unknown:
        hints = "".join(f"; {key}: {misplaced[key]}" for key in unknown if key in misplaced)
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {where}{hints}; known: {', '.join(sorted(known))}")


# ----------------------------------------------------------------------------------------------------------------
# 2. The points
# ----------------------------------------------------------------------------------------------------------------
def _product(axes: Mapping[str, Axis]) -> Iterator[dict[str, Any]]:
    names = list(axes)
    for values in itertools.product(*(axes[n] for n in names)):
        yield dict(zip(names, values, strict=True))


class _RawPoint(typing.NamedTuple):
    """A point as written in the grid: values may still be text."""

    method: str
    options: dict[str, Any]
    data: dict[str, Any]
    train: dict[str, Any]
    description: str


def _raw_points(spec: SweepSpec) -> Iterator[_RawPoint]:
    """Every point of the grid, seeds outermost (so a sweep stopped half-way has whole seeds done), then datasets,
    then methods. The description names the method, its options, the axes that vary, the dataset and the seed."""
    data_varying = sorted(k for k, v in spec.data.items() if len(v) > 1)
    for seed in spec.seeds:
        for dataset in spec.datasets:
            for data_values in _product(spec.data):
                data_text = "".join(f" {k}={data_values[k]}" for k in data_varying)
                for grid in spec.methods:
                    train_axes = {**spec.train, **grid.train}
                    train_varying = sorted(k for k, v in train_axes.items() if len(v) > 1)
                    for options in _product(grid.options):
                        for train_values in _product(train_axes):
                            parts = [grid.name, *(f"{k}={v}" for k, v in options.items())]
                            parts += [f"{k}={train_values[k]}" for k in train_varying]
                            description = f"{' '.join(parts)} · {dataset['name']}{data_text} · seed {seed}"
                            yield _RawPoint(
                                grid.name,
                                options,
                                {**data_values, **dataset},
                                {**train_values, "seed": seed},
                                description,
                            )


def check_points(spec: SweepSpec) -> list[CheckedExperiment]:
    """Every point of the sweep, built and checked (see `expand`), with its trainable parameter counts."""
    checked: list[CheckedExperiment] = []
    seen: set[str] = set()
    by_method: dict[str, CheckedExperiment] = {}  # the check depends on the method, its options and the size only
    raw = list(_raw_points(spec))
    for index, point in enumerate(raw, 1):
        try:
            experiment = Experiment(
                data=DataSpec(**coerce_fields(DataSpec, point.data)),
                backbone=spec.backbone,
                method=point.method,
                options=point.options,
                train=TrainConfig(**coerce_fields(TrainConfig, point.train)),
                label=f"{spec.name}: {point.description}" if spec.name else point.description,
            )
            check_key = json.dumps([point.method, point.options, experiment.data.img_size], sort_keys=True, default=str)
            if check_key not in by_method:
                by_method[check_key] = validate(experiment)
            reference = by_method[check_key]
        except ValueError as err:
            raise ValueError(
                f"sweep point {index} of {len(raw)} ({point.description}): {err}; no point is run"
            ) from None
        experiment = dataclasses.replace(experiment, options=reference.experiment.options)
        key = point_key(experiment)
        if key not in seen:  # the same point written twice (e.g. an option given at its default) runs once
            seen.add(key)
            checked.append(CheckedExperiment(experiment, reference.params))
    return checked


def expand(spec: SweepSpec) -> list[Experiment]:
    """Every point of the sweep as an experiment with its options resolved (defaults filled in), in submission
    order; duplicates (the same point written twice) appear once.

    Raises:
        ValueError: a bad point (an option, a data or training setting), naming the point: no point is usable then.
    """
    return [point.experiment for point in check_points(spec)]


def point_key(point: Experiment | Mapping[str, Any]) -> str:
    """The identity of a point: of a (resolved) experiment, or of the record of a run in the store."""
    record = experiment_record(point) if isinstance(point, Experiment) else point
    text = json.dumps({k: record[k] for k in KEY_FIELDS}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# 3. Submitting, resuming, cancelling, listing
# ----------------------------------------------------------------------------------------------------------------
def submit_sweep(
    spec: SweepSpec,
    root: Path | str | None = None,
    *,
    sweep_id: str | None = None,
    address: str | None = None,
    persistent: bool = False,
    resources: Resources | None = None,
    data_root: Path | None = None,
    owner: str | None = None,
) -> str:
    """Check every point, record the sweep, and submit its points as jobs (`core.jobs.submit`); returns the sweep
    id once every point is submitted. The points then wait in Ray's queue for their resources.

    With the ``sweep_id`` of a recorded sweep it resumes it with ``spec`` as its grid from now on: points with a
    completed or diverged run, or one still queued or running, are skipped; the others (never submitted, failed,
    cancelled, interrupted) are submitted. A cancel of the sweep while its points are being submitted stops the
    submitting.

    Args:
        spec: The grid.
        root: The run store folder (default `default_root`).
        sweep_id: A recorded sweep to resume (or a unique prefix of its id); None starts a new one.
        address, persistent, resources, data_root, owner: As in `core.jobs.submit`, for every point.

    Raises:
        ValueError: a bad point (nothing is recorded or submitted), or an ambiguous sweep id prefix.
        KeyError: no recorded sweep has that id.
    """
    from core import jobs

    points = check_points(spec)
    store = RunStore(root)
    if sweep_id is None:
        record: dict[str, Any] = {"id": _new_sweep_id(), "created_at": _now(), "submissions": []}
    else:
        record = load_sweep(store.root, sweep_id)
    sweep_id = record["id"]
    taken = {key for key, status in _latest_statuses(store, sweep_id).items() if status in _KEEP_STATUSES}
    guess = estimate(points, store)
    record |= {
        "name": spec.name,
        "spec": spec.to_dict(),
        "points": [
            {"key": point_key(p.experiment), "label": p.experiment.label, "estimate_s": round(s, 1)}
            for p, s in zip(points, guess.seconds, strict=True)
        ],
        "estimate_s": round(guess.total_s, 1),
        "estimate_basis": guess.basis,
        "cancelled_at": None,
    }
    submission: dict[str, Any] = {"at": _now(), "skipped": 0, "submitted": []}
    record["submissions"].append(submission)
    _write_sweep(store.root, record)
    for point in points:
        if point_key(point.experiment) in taken:
            submission["skipped"] += 1
            continue
        if load_sweep(store.root, sweep_id)["cancelled_at"]:  # cancelled while submitting: submit no more
            break
        run_id = jobs.submit(
            "finetune",
            point,
            store.root,
            address=address,
            persistent=persistent,
            resources=resources,
            data_root=data_root,
            owner=owner,
            sweep_id=sweep_id,
        )
        submission["submitted"].append(run_id)
    cancelled_at = load_sweep(store.root, sweep_id)["cancelled_at"]
    record["cancelled_at"] = cancelled_at
    _write_sweep(store.root, record)
    if cancelled_at:  # a point submitted after the cancel looked at the runs
        _cancel_runs(store, sweep_id)
    return sweep_id


def resume_sweep(sweep_id: str, root: Path | str | None = None, **submit_options: Any) -> str:
    """Submit again the points of a recorded sweep that have no result yet (`submit_sweep` with its own grid)."""
    record = load_sweep(_root(root), sweep_id)
    return submit_sweep(SweepSpec.from_dict(record["spec"]), root, sweep_id=record["id"], **submit_options)


def cancel_sweep(sweep_id: str, root: Path | str | None = None) -> dict[str, int]:
    """Cancel a sweep: its queued points end ``cancelled`` at once, its running ones stop before their next step,
    and a submission still going on submits no more. Returns how many runs were ``cancelled`` and ``stopping``."""
    store = RunStore(root)
    record = load_sweep(store.root, sweep_id)
    record["cancelled_at"] = _now()
    _write_sweep(store.root, record)
    return _cancel_runs(store, record["id"])


def _cancel_runs(store: RunStore, sweep_id: str) -> dict[str, int]:
    counts = {"cancelled": 0, "stopping": 0}
    for run_id in store.list_runs(status=ACTIVE_STATUSES, sweep_id=sweep_id)["id"]:
        status = store.request_cancel(run_id)
        if status in ("cancelled", "running"):
            counts["cancelled" if status == "cancelled" else "stopping"] += 1
    return counts


@dataclass(frozen=True)
class SweepSummary:
    """Where a sweep stands: its points counted by the status of each one's latest run.

    Attributes:
        id: The sweep id.
        name: Its name, if any.
        created_at: UTC ISO time it was first submitted.
        points: Points in its grid.
        done: Points with a completed run.
        diverged: Points whose run diverged (a result: resuming does not repeat them).
        failed: Points whose latest run failed or was interrupted (a killed worker, a stopped embedded Ray).
        cancelled: Points whose latest run was cancelled.
        running: Points running now.
        queued: Points waiting for resources.
        not_submitted: Points without any run (a submission stopped by a cancel, or one still going on).
        estimate_s: The estimated time of all its points, one after another (an estimate, see `estimate`).
        cancel_requested: Whether the sweep was cancelled (and not resumed since).
    """

    id: str
    name: str | None
    created_at: str
    points: int
    done: int
    diverged: int
    failed: int
    cancelled: int
    running: int
    queued: int
    not_submitted: int
    estimate_s: float | None
    cancel_requested: bool

    @property
    def finished(self) -> int:
        """Points whose latest run ended, however."""
        return self.done + self.diverged + self.failed + self.cancelled

    @property
    def status(self) -> str:
        """``running`` while any point runs or waits, else ``completed`` when every point has its result,
        ``cancelled`` after a cancel, and ``incomplete`` otherwise (resume it)."""
        if self.running or self.queued:
            return "running"
        if self.done + self.diverged == self.points:
            return "completed"
        return "cancelled" if self.cancel_requested else "incomplete"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "status": self.status}


_KEEP_STATUSES = (*SETTLED_STATUSES, *ACTIVE_STATUSES)
_SUMMARY_GROUPS = {"completed": "done", "diverged": "diverged", "failed": "failed", "interrupted": "failed"}
_SUMMARY_GROUPS |= {"cancelled": "cancelled", "running": "running", "queued": "queued"}


def summarize(store: RunStore, sweep_id: str) -> SweepSummary:
    """Where the sweep stands now (see `SweepSummary`), from its record and the runs in the store."""
    record = load_sweep(store.root, sweep_id)
    latest = _latest_statuses(store, record["id"])
    counts = dict.fromkeys(["done", "diverged", "failed", "cancelled", "running", "queued", "not_submitted"], 0)
    for point in record["points"]:
        status = latest.get(point["key"])
        counts["not_submitted" if status is None else _SUMMARY_GROUPS[status]] += 1
    return SweepSummary(
        id=record["id"],
        name=record.get("name"),
        created_at=record["created_at"],
        points=len(record["points"]),
        estimate_s=record.get("estimate_s"),
        cancel_requested=bool(record.get("cancelled_at")),
        **counts,
    )


def list_sweeps(root: Path | str | None = None) -> list[SweepSummary]:
    """Every recorded sweep, newest first."""
    store = RunStore(root)
    folder = store.root / SWEEPS_DIR
    ids = sorted((path.stem for path in folder.glob("*.json")), reverse=True) if folder.is_dir() else []
    return [summarize(store, sweep_id) for sweep_id in ids]


def wait_sweep(
    store: RunStore,
    sweep_id: str,
    timeout: float | None = None,
    on_update: Callable[[SweepSummary], None] | None = None,
    poll_s: float = 1.0,
) -> SweepSummary:
    """Poll the store until no point of the sweep is queued or running; returns its summary then. ``on_update``
    sees the summary at every poll.

    Raises:
        TimeoutError: points still queued or running after ``timeout`` seconds (they go on).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        summary = summarize(store, sweep_id)
        if on_update is not None:
            on_update(summary)
        if not (summary.running or summary.queued):
            return summary
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"sweep {summary.id}: {summary.running} running and {summary.queued} queued after {timeout:.0f} s"
            )
        time.sleep(poll_s)


def _latest_statuses(store: RunStore, sweep_id: str) -> dict[str, str]:
    """Point key -> the status of the newest run of that point in the sweep."""
    latest: dict[str, str] = {}
    for run_id in reversed(list(store.list_runs(sweep_id=sweep_id)["id"])):  # oldest first: newer ones overwrite
        run = store.get_run(run_id)
        latest[point_key(run)] = run["status"]
    return latest


def load_sweep(root: Path | str, sweep_id: str) -> dict[str, Any]:
    """The record of a sweep (its grid, points, estimate and submissions) by its id or a unique prefix of it.

    Raises:
        KeyError: no such sweep; ValueError: an ambiguous prefix.
    """
    folder = Path(root) / SWEEPS_DIR
    path = folder / f"{sweep_id}.json"
    if not path.is_file():
        matches = sorted(folder.glob(f"{glob.escape(sweep_id)}*.json")) if folder.is_dir() and sweep_id else []
        if not matches:
            raise KeyError(f"no sweep with id {sweep_id!r} (nor one starting with it) in {folder}")
        if len(matches) > 1:
            raise ValueError(f"sweep id prefix {sweep_id!r} matches {', '.join(m.stem for m in matches[:5])}")
        path = matches[0]
    return json.loads(path.read_text())


def _write_sweep(root: Path, record: Mapping[str, Any]) -> None:
    """Write a sweep's record atomically (a reader never sees half a file)."""
    folder = root / SWEEPS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{record['id']}.json.{os.getpid()}.partial"
    partial.write_text(json.dumps(record, indent=1, default=str))
    os.replace(partial, folder / f"{record['id']}.json")


def _new_sweep_id() -> str:
    return f"sweep-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _root(root: Path | str | None) -> Path:
    return Path(root).expanduser() if root is not None else default_root()


# ----------------------------------------------------------------------------------------------------------------
# 4. The time estimate
# ----------------------------------------------------------------------------------------------------------------
CPU_S_PER_PARAM_TOKEN = 1.3e-11
"""Seconds a forward pass costs per backbone parameter and token of one image on a 2-thread CPU in fp32: fitted to
head-only steps of ViT-S and ViT-B at 64 to 197 tokens, batch 32. Attention grows faster than this at many tokens."""
STEP_COST = {"frozen": 2.2, "full": 3.5}
"""A training step's cost in forward passes: a backward through a frozen backbone (any PETL method) and one that
also computes every weight's gradient (full fine-tuning)."""
START_S = 5.0
"""A point's fixed cost: its worker starting, the data and the backbone loading."""
SPLIT_GUESS = {"n_train": 1000, "n_val": 200, "n_test": 500}
"""Split sizes assumed where the data spec caps none (the estimate does not load the data)."""
CALIBRATION_RUNS = 30


@dataclass(frozen=True)
class Estimate:
    """An estimate of how long points take: a cost model, scaled to this machine by recent completed runs.

    Attributes:
        seconds: Each point's estimate.
        total_s: All points one after another (CPU jobs reserve a whole machine, so that is how they run on one).
        basis: How it was made, to show beside it.
    """

    seconds: tuple[float, ...]
    total_s: float
    basis: str


@lru_cache(maxsize=32)
def _backbone_size(name: str, img_size: int) -> tuple[int, int]:
    """(parameters, patch side) of a backbone, from its weightless skeleton."""
    model = skeleton(BackboneSpec(name=name, weights="none", img_size=img_size, num_classes=0))
    patch = model.patch_embed.patch_size
    return sum(p.numel() for p in model.parameters()), int(patch[0] if isinstance(patch, tuple | list) else patch)


def model_seconds(point: Experiment, head_only: bool, threads: int = 2) -> float:
    """The cost model's training time for one point on a CPU with ``threads`` threads, without `START_S`."""
    params, patch = _backbone_size(point.backbone.name, point.data.img_size)
    tokens = (point.data.img_size // patch) ** 2 + 1 + int(point.options.get("tokens", 0) or 0)  # VPT's prompts
    forward_s = CPU_S_PER_PARAM_TOKEN * params * tokens * 2 / max(1, threads)  # one image
    n = {name: getattr(point.data, name) or guess for name, guess in SPLIT_GUESS.items()}
    train = point.train
    if head_only and train.cache_features:  # the features once, then steps on the head alone
        return forward_s * (n["n_train"] + n["n_val"] + n["n_test"])
    step = STEP_COST["full" if methods.get_method(point.method).backbone == "all" else "frozen"]
    if head_only:
        step = 1.0
    evaluations = math.ceil(train.steps / train.eval_every)
    return forward_s * (train.steps * train.batch_size * step + evaluations * n["n_val"] + n["n_test"])


def estimate(points: Sequence[CheckedExperiment], store: RunStore | None = None, device: str | None = None) -> Estimate:
    """How long the points take, one after another: `model_seconds` plus `START_S` each, scaled by the median ratio
    of measured to modelled training time over the last completed fine-tunes in ``store`` on the same kind of
    device (``cuda`` or ``cpu``; default: CUDA when this machine has it). An estimate, not a measurement.
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = os.cpu_count() or 1
    ratios = _calibration(store, device, threads) if store is not None else []
    if ratios:
        scale = statistics.median(ratios)
        basis = f"cost model x{scale:.2g}, calibrated by {len(ratios)} recent completed runs on {device}"
    else:
        scale = 1.0
        basis = f"cost model for this machine's {threads} CPU threads, not calibrated (no completed runs on {device})"
    seconds = tuple(START_S + scale * model_seconds(p.experiment, p.params.without_head == 0, threads) for p in points)
    return Estimate(seconds, sum(seconds), f"estimate: {basis}")


def _calibration(store: RunStore, device: str, threads: int) -> list[float]:
    """Measured / modelled training time of the recent completed fine-tunes on ``device``'s kind."""
    runs = store.list_runs(status="completed")
    ratios: list[float] = []
    for run_id in runs["id"]:
        run = store.get_run(run_id)
        if not run.get("wall_time_s") or ("cuda" in str(run.get("device"))) != (device == "cuda"):
            continue
        try:
            point = Experiment(
                data=DataSpec.from_dict(run["dataset"]),
                backbone=BackboneSpec(**run["backbone"]),
                method=run["method"],
                options=run["method_options"] or {},
                train=TrainConfig(**run["train_config"]),
            )
            modelled = model_seconds(point, run["trainable_params"] == 0, threads)
        except (TypeError, ValueError, KeyError):  # a record of an older PETLab, or an unknown backbone
            continue
        ratios.append(run["wall_time_s"] / modelled)
        if len(ratios) == CALIBRATION_RUNS:
            break
    return ratios


__all__ = [
    "Estimate",
    "MethodGrid",
    "SweepSpec",
    "SweepSummary",
    "cancel_sweep",
    "check_points",
    "estimate",
    "expand",
    "list_sweeps",
    "load_grid",
    "load_sweep",
    "parse_method_flag",
    "point_key",
    "resume_sweep",
    "spec_from_flags",
    "submit_sweep",
    "summarize",
    "wait_sweep",
]
