"""What the app keeps between reruns, in one place: the run store, cached analyses and background jobs.

Pages never cache on their own and never train in the script thread. Long work (a fine-tune, an intrinsic-dimension
sweep) runs in a `Job`: a daemon thread with a `CancelToken`, kept in a `JobRegistry` that ``st.cache_resource``
holds for the whole server process. A page keeps only the job's id in ``st.session_state`` and polls: fine-tunes
through the run store (every run is recorded there by ``run_experiment``), sweeps through ``Job.trials``.

Nothing here is trained in place: fine-tunes build their own model inside ``run_experiment``; the spectra rebuild the
run's backbone (``load_run_model`` copies it before loading the adapter); the intrinsic-dimension sweep builds its
own backbone in its thread and never writes to it.
"""

from __future__ import annotations

import dataclasses
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import streamlit as st
import torch

from core import methods
from core.backbone import BackboneSpec, build_backbone, skeleton
from core.data import DataSpec, load_data
from core.experiment import Experiment, check_options, run_experiment, run_weight_updates
from core.intrinsic_dim import (
    IntrinsicDimConfig,
    IntrinsicDimResult,
    Trial,
    measure_intrinsic_dimension,
    representation_dimension,
    resolve_groups,
)
from core.pareto import load_reference_results, reference_points
from core.runs import RunStore, default_root
from core.spectra import MatrixSVD, SpectraReport, decompose, spectra_report
from core.train import Callback, CancelToken, StepInfo

JobKind = Literal["train", "intrinsic_dim"]
JobStatus = Literal["running", "completed", "cancelled", "failed"]


# ----------------------------------------------------------------------------------------------------------------
# The run store
# ----------------------------------------------------------------------------------------------------------------
def store(root: Path | str | None = None) -> RunStore:
    """The run store under ``root`` (default ``$PETLAB_HOME`` or the user's data folder, read at each call)."""
    return _open_store(str(Path(root).expanduser() if root is not None else default_root()))


@st.cache_resource(show_spinner=False)
def _open_store(root: str) -> RunStore:
    return RunStore(root)  # one instance per folder: it opens one SQLite connection per thread by itself


def export_csv(runs: RunStore) -> bytes:
    """Every run, flattened as in ``list_runs``, as CSV bytes (``RunStore.export`` through a temporary file)."""
    with tempfile.TemporaryDirectory() as folder:
        return runs.export(Path(folder) / "runs.csv").read_bytes()


# ----------------------------------------------------------------------------------------------------------------
# Cached computations
# ----------------------------------------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=256)
def trainable_count(backbone: str, img_size: int, method: str, options: Mapping[str, Any]) -> tuple[int, int]:
    """(trainable parameters without the head, width d) of ``method`` on a weightless (meta-device) backbone.

    Raises:
        ValueError: a bad backbone name or size, or a bad option (the message says which).
    """
    model = skeleton(BackboneSpec(name=backbone, weights="none", img_size=img_size, num_classes=2))
    width = methods.inspect_vit(model).embed_dim
    with torch.device("meta"):
        methods.apply(model, method, **options)
    return methods.count_trainable(model, include_head=False), width


@st.cache_data(show_spinner=False, max_entries=16)
def spectra(
    root: str, run_id: str, k: int = 10, threshold: float = 0.5, with_vectors: bool = True
) -> SpectraReport | None:
    """The spectra report of a completed run (None when its method makes no weight update), cached by run id."""
    updates = run_weight_updates(store(root), run_id)  # rebuilds the pretrained backbone, copies it for the adapter
    if not updates:
        return None
    cache = _pretrained_decompositions(_weights_key(store(root).get_run(run_id)["backbone"]))
    missing = {name: w0 for name, (w0, _) in updates.items() if name not in cache}
    cache.update(decompose(missing, with_vectors=True, keep=0))
    return spectra_report(updates, k=k, intruder_threshold=threshold, with_vectors=with_vectors, pretrained=cache)


def _weights_key(backbone: Mapping[str, Any]) -> str:
    """What identifies a run's pretrained matrices: the model and its weights (a file also by size and time)."""
    key = f"{backbone['name']}|{backbone['weights']}"
    path = Path(str(backbone["weights"])).expanduser()
    if path.is_file():
        stat = path.stat()
        key += f"|{stat.st_size}|{stat.st_mtime_ns}"
    return key


@st.cache_resource(show_spinner=False, max_entries=2)
def _pretrained_decompositions(weights_key: str) -> dict[str, MatrixSVD]:
    """The decompositions of one backbone's pretrained matrices, filled as runs need them: they are the same for
    every run on it and are half the work of a report (ViT-B: 4.3 s once, then 2.4 s per report instead of 6.2 s).
    A ViT-B's take about 340 MB (every singular vector of the short side, float64), a ViT-S's 85 MB."""
    return {}


@st.cache_data(show_spinner=False)
def reference_benchmarks() -> list[str]:
    """The benchmarks of the papers' shipped reference results."""
    return list(load_reference_results()["benchmark"].unique())


@st.cache_data(show_spinner=False)
def references(
    benchmark: str, average: Literal["mean19", "groups"], prefer: Literal["without", "with"]
) -> pd.DataFrame:
    """The papers' points for one benchmark and convention (``core.pareto.reference_points``)."""
    return reference_points(benchmark, average, prefer=prefer)


# ----------------------------------------------------------------------------------------------------------------
# Background jobs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One piece of long work running in a daemon thread; its fields are written by that thread, read by pages.

    Attributes:
        id: short random id (what a page keeps in its session state).
        kind: ``train`` or ``intrinsic_dim``.
        title: one line for the page.
        token: cancel it to stop the work (before the next training step or trial step).
        phase: what it is doing now, in words.
        run_id: the run a fine-tune recorded, as soon as it is recorded.
        step: training steps done (fine-tunes; updated every step, finer than the run store).
        total: training steps planned.
        trials: one dict per finished intrinsic-dimension trial: group, d, accuracy, kind (``full`` for the
            group's whole-weights baseline, reported with d = D, else ``subspace``) and target (the group's
            target accuracy, on its ``full`` row).
        result: what the work returned (a run id, an `IntrinsicDimOutcome`), once finished.
        error: the exception text when it failed.
    """

    id: str
    kind: JobKind
    title: str
    token: CancelToken = field(default_factory=CancelToken)
    phase: str = "starting"
    run_id: str | None = None
    step: int = 0
    total: int = 0
    trials: list[dict[str, Any]] = field(default_factory=list)
    result: Any = None
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self.finished_at is None

    @property
    def status(self) -> JobStatus:
        if self.active:
            return "running"
        if self.error is not None:
            return "failed"
        if isinstance(self.result, IntrinsicDimOutcome) and self.result.result.cancelled:
            return "cancelled"
        return "cancelled" if self.token.cancelled else "completed"

    def cancel(self) -> None:
        self.token.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the work ends (tests and scripts only, never a page); True when it ended."""
        if self.thread is not None:
            self.thread.join(timeout)
        return not self.active


class JobRegistry:
    """Every job this server process started, by id; safe to use from several sessions at once."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def submit(self, kind: JobKind, title: str, work: Callable[[Job], Any]) -> Job:
        """Run ``work(job)`` in a new daemon thread; its return value becomes ``job.result``."""
        job = Job(id=secrets.token_hex(4), kind=kind, title=title)

        def target() -> None:
            try:
                job.result = work(job)
            except BaseException as exc:  # the thread must not die silently: the page shows the error
                job.error = f"{type(exc).__name__}: {exc}"
            finally:
                job.phase = "finished"
                job.finished_at = time.time()

        job.thread = threading.Thread(target=target, name=f"petlab-{kind}-{job.id}", daemon=True)
        with self._lock:
            self._jobs[job.id] = job
        job.thread.start()
        return job

    def get(self, job_id: str | None) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id) if job_id else None

    def jobs(self, kind: JobKind | None = None) -> list[Job]:
        """Jobs of one kind (or all), newest first."""
        with self._lock:
            found = [j for j in self._jobs.values() if kind is None or j.kind == kind]
        return sorted(found, key=lambda j: j.started_at, reverse=True)


@st.cache_resource(show_spinner=False)
def job_registry() -> JobRegistry:
    """The process-wide job registry (survives reruns, page switches and new sessions)."""
    return JobRegistry()


def job(job_id: str | None) -> Job | None:
    return job_registry().get(job_id)


def current_job(kind: JobKind, session_key: str) -> Job | None:
    """The job a page shows: the one this session started, else the newest running one of that kind."""
    mine = job(st.session_state.get(session_key))
    if mine is not None:
        return mine
    running = [j for j in job_registry().jobs(kind) if j.active]
    return running[0] if running else None


# Fine-tunes ------------------------------------------------------------------------------------------------------
class _JobStore(RunStore):
    """The run store, telling the job its run id as soon as ``run_experiment`` records the run."""

    def __init__(self, root: Path | str, job: Job) -> None:
        super().__init__(root)
        self._job = job

    def create_run(self, record: Mapping[str, Any], status: Literal["running", "queued"] = "running") -> str:
        run_id = super().create_run(record, status)
        self._job.run_id = run_id
        self._job.phase = "loading data and backbone"
        return run_id


class _Progress(Callback):
    def __init__(self, job: Job) -> None:
        self.job = job

    def on_start(self, total_steps: int, device: str) -> None:
        self.job.total, self.job.phase = total_steps, f"training on {device}"

    def on_step(self, info: StepInfo) -> None:
        self.job.step = info.step

    def on_end(self, result: Any) -> None:
        self.job.phase = "saving"


def start_training(experiment: Experiment, root: Path | str | None = None, data_root: Path | None = None) -> Job:
    """Check the options (ValueError here, in the caller), then run ``run_experiment`` in the background.

    Raises:
        ValueError: bad method options or a backbone that cannot take them (nothing is started or recorded).
    """
    check_options(experiment)
    folder = Path(root).expanduser() if root is not None else default_root()
    title = f"{experiment.method} on {experiment.data.name} at {experiment.data.img_size} px"

    def work(job: Job) -> str:
        job.total = experiment.train.steps
        return run_experiment(experiment, _JobStore(folder, job), [_Progress(job)], job.token, data_root)

    return job_registry().submit("train", experiment.label or title, work)


# Intrinsic dimension ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntrinsicDimRequest:
    """What to measure: the data, the backbone (built at the data's size and class count), the groups."""

    data: DataSpec
    backbone: BackboneSpec
    groups: str | tuple[str, ...] = "attn-mlp"
    config: IntrinsicDimConfig = field(default_factory=IntrinsicDimConfig)
    representation: bool = False


@dataclass
class IntrinsicDimOutcome:
    result: IntrinsicDimResult
    representation: pd.DataFrame | None
    backbone: str


def start_intrinsic_dim(request: IntrinsicDimRequest, data_root: Path | None = None) -> Job:
    """Validate the backbone and groups (ValueError here), then measure d90 per group in the background.

    ``job.trials`` grows by one dict per trial; ``job.result`` is an `IntrinsicDimOutcome`.
    """
    spec = dataclasses.replace(request.backbone, img_size=request.data.img_size)
    depth = len(skeleton(spec).blocks)
    groups = request.groups if isinstance(request.groups, str) else list(request.groups)
    resolve_groups(groups, depth)

    def work(job: Job) -> IntrinsicDimOutcome:
        job.phase = "loading data"
        data = load_data(request.data, data_root)
        job.phase = "building the backbone"
        model, info = build_backbone(dataclasses.replace(spec, num_classes=data.num_classes))
        job.phase = "measuring"

        def on_trial(trial: Trial) -> None:
            job.trials.append(dataclasses.asdict(trial))

        result = measure_intrinsic_dimension(
            model,
            data.train,
            data.val,
            groups,
            request.config,
            on_trial=on_trial,
            should_stop=lambda: job.token.cancelled,
        )
        representation = None
        if request.representation and not result.cancelled:
            job.phase = "representation-dimension proxy"
            representation = representation_dimension(model, data.val, max_images=128, max_points=1000)
        return IntrinsicDimOutcome(result, representation, info.description)

    return job_registry().submit("intrinsic_dim", f"intrinsic dimension on {request.data.name}", work)
