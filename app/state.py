"""What the app keeps between reruns, in one place: the run store, cached analyses and its jobs.

Pages never cache on their own and never train: long work (a fine-tune, an intrinsic-dimension measurement) is a
Ray job (`core.jobs`) in a worker process. A page keeps the job's run id (in the session and the page's address,
so a reload finds it) and polls the run store, the single source of truth: every session sees every job's
progress, and the session that started a job gets its Cancel button.

Nothing here is trained in place: the spectra rebuild the run's backbone (``load_run_model`` copies it before
loading the adapter).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import streamlit as st

from core import jobs
from core.backbone import BackboneSpec
from core.experiment import (
    Experiment,
    IntrinsicDimRequest,
    classroom,
    count_params,
    run_weight_updates,
    snapshot_weight_updates,
)
from core.pareto import load_reference_results, reference_points
from core.runs import RunStore, default_root
from core.spectra import MatrixSVD, SpectraReport, decompose, spectra_report, weights_key

JobKind = Literal["finetune", "intrinsic_dim"]
FINETUNE_KEY = "run"  # the Fine-tune page's job, also its address parameter (a reload finds the job again)
COMPARE_KEY = "compare"  # the Spectra page's two compared runs, "ID,ID", also its address parameter


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
    """(trainable parameters without the head, width d) of ``method`` on a weightless backbone
    (``core.experiment.count_params``), cached by its arguments.

    Raises:
        ValueError: a bad backbone name or size, or a bad option (the message says which).
    """
    spec = BackboneSpec(name=backbone, weights="none", img_size=img_size, num_classes=2)
    count = count_params(spec, method, options)
    return count.without_head, count.width


@st.cache_data(show_spinner=False, max_entries=16)
def spectra(
    root: str, run_id: str, k: int = 10, threshold: float = 0.5, with_vectors: bool = True
) -> SpectraReport | None:
    """The spectra report of a completed run (None when its method makes no weight update), cached by run id."""
    updates = run_weight_updates(store(root), run_id)  # rebuilds the pretrained backbone, copies it for the adapter
    if not updates:
        return None
    cache = _pretrained_decompositions(weights_key(store(root).get_run(run_id)["backbone"]))
    missing = {name: w0 for name, (w0, _) in updates.items() if name not in cache}
    cache.update(decompose(missing, with_vectors=True, keep=0))
    return spectra_report(updates, k=k, intruder_threshold=threshold, with_vectors=with_vectors, pretrained=cache)


@st.cache_data(show_spinner=False, max_entries=8)
def snapshot_spectra(root: str, run_id: str) -> dict[int, SpectraReport]:
    """Values-only spectra reports of a completed run's snapshots (`RunStore.snapshot_paths`) by training step,
    cached by run id; empty when it kept none."""
    runs = store(root)
    cache = _pretrained_decompositions(weights_key(runs.get_run(run_id)["backbone"]))
    reports = {}
    for step, updates in snapshot_weight_updates(runs, run_id):
        missing = {name: w0 for name, (w0, _) in updates.items() if name not in cache}
        cache.update(decompose(missing, with_vectors=True, keep=0))
        reports[step] = spectra_report(updates, with_vectors=False, pretrained=cache)
    return reports


@st.cache_resource(show_spinner=False, max_entries=2)
def _pretrained_decompositions(key: str) -> dict[str, MatrixSVD]:
    """The decompositions of one backbone's pretrained matrices (``core.spectra.weights_key``), filled as runs need
    them: they are the same for every run on it and are about half the work of a report. A ViT-B's take about
    340 MB (every singular vector of the short side, float64), a ViT-S's 85 MB."""
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
# Jobs: submitted to Ray through core.jobs, followed through the run store
# ----------------------------------------------------------------------------------------------------------------
def submit(kind: JobKind, spec: Experiment | IntrinsicDimRequest, root: Path | str | None = None) -> str:
    """Submit a fine-tune or a measurement as a Ray job (`core.jobs.submit`) for the signed-in user (its owner)
    and return its run id at once; the page keeps it (`remember`) and polls the store. The first call starts the
    embedded Ray (a few seconds) unless ``$PETLAB_RAY_ADDRESS`` names a cluster.

    Raises:
        ValueError: a bad option, backbone, group, data folder or weights file, or nobody signed in where sign-in
            is configured (nothing is recorded or started).
    """
    if not may_start():
        raise ValueError("Sign in (in the sidebar) to start jobs on this server.")
    folder = Path(root).expanduser() if root is not None else default_root()
    _connected()
    return jobs.submit(kind, spec, folder, owner=user_email())


# ----------------------------------------------------------------------------------------------------------------
# Sign-in: Streamlit's own (st.login with an OIDC provider in .streamlit/secrets.toml), when configured
# ----------------------------------------------------------------------------------------------------------------
def sign_in_configured() -> bool:
    """Whether the server has sign-in configured: ``st.user`` then always says whether someone is logged in
    (Streamlit adds ``is_logged_in`` only when ``secrets.toml`` has an ``[auth]`` section)."""
    return "is_logged_in" in st.user


def user_email() -> str | None:
    """The signed-in user's email (the provider's subject id if it gives none), recorded as the owner of the jobs
    they start; None when nobody is signed in or sign-in is not configured."""
    if not sign_in_configured() or not st.user.is_logged_in:
        return None
    email = st.user.get("email") or st.user.get("sub")
    return str(email) if email else None


def may_start() -> bool:
    """Whether this browser may start jobs and upload data: anyone on an open server, else a signed-in user."""
    return not sign_in_configured() or user_email() is not None


def owns(run: Mapping[str, Any]) -> bool:
    """Whether this browser's user may change a run (cancel or delete it): anyone on an open server; with sign-in
    configured, only the signed-in user who started it."""
    return not sign_in_configured() or (user_email() is not None and run.get("owner") == user_email())


def may_cancel(run: Mapping[str, Any], started_here: bool) -> bool:
    """Whether to offer a Cancel button for a queued or running job: with sign-in configured, to its owner in any
    browser; on an open server, to the browser that started it."""
    return owns(run) and (started_here or sign_in_configured())


@st.cache_resource(show_spinner="Starting Ray (once per server)...")
def _connected() -> str:
    """Connect this server to Ray (`core.jobs.connect`, which starts it from a thread that lives as long as the
    server) and return the cluster's address."""
    return jobs.connect()


def remember(key: str, run_id: str) -> None:
    """Keep ``run_id`` as the job this browser started for a page: in the session and in the page's address, so
    a reload of the page finds it again (and keeps its Cancel button)."""
    st.session_state[key] = run_id
    st.query_params[key] = run_id


def mine(key: str) -> str | None:
    """The job this browser started from the page (see `remember`), if it is still in the store."""
    run_id = st.session_state.get(key) or st.query_params.get(key)
    if not run_id:
        return None
    try:
        return store().resolve(run_id)
    except (KeyError, ValueError):
        return None


def current_job(kind: JobKind, key: str) -> tuple[str | None, bool]:
    """(run id, started here) of the job a page shows: the one this browser started, else the newest queued or
    running job of that kind (started elsewhere: shown live, without a Cancel button)."""
    run_id = mine(key)
    if run_id is not None:
        return run_id, True
    active = store().list_runs(status=["running", "queued"], kind=kind)
    return (str(active["id"].iloc[0]) if len(active) else None), False


def waiting_jobs(kind: JobKind | None = None) -> pd.DataFrame:
    """Queued and running jobs (of one kind, or all), newest first: what a new job would wait behind."""
    return store().list_runs(status=["running", "queued"], kind=kind)


def start_classroom(method: str) -> str:
    """Submit the classroom demo of ``method`` (`core.experiment.classroom`) as this browser's Fine-tune job."""
    run_id = submit("finetune", classroom(method))
    remember(FINETUNE_KEY, run_id)
    return run_id


def start_comparison(first: str = "fact", second: str = "lora") -> tuple[str, str]:
    """Queue the classroom demos of two methods and keep them as this browser's comparison (Spectra page)."""
    pair = (submit("finetune", classroom(first)), submit("finetune", classroom(second)))
    st.session_state[COMPARE_KEY] = ",".join(pair)
    st.query_params[COMPARE_KEY] = ",".join(pair)
    st.session_state["spectra.mode"] = "compare"  # the Spectra page opens on them
    for side, run_id in zip(("spectra.left", "spectra.right"), pair, strict=True):
        st.session_state[side] = run_id
    return pair


def comparison() -> tuple[str, str] | None:
    """The two runs this browser compares on the Spectra page (from `start_comparison` or the page address)."""
    text = st.session_state.get(COMPARE_KEY) or st.query_params.get(COMPARE_KEY)
    ids = [i for i in (text or "").split(",") if i]
    try:
        pair = tuple(store().resolve(i) for i in ids)
    except (KeyError, ValueError):
        return None
    return pair if len(pair) == 2 else None  # type: ignore[return-value]


def time_left(metrics: pd.DataFrame, total_steps: int) -> float | None:
    """Seconds until step ``total_steps`` at the pace of the recorded training steps (None before two steps)."""
    steps = metrics[(metrics["split"] == "train") & (metrics["name"] == "loss")]
    if len(steps) < 2:
        return None
    first, last = steps.iloc[0], steps.iloc[-1]
    if last["step"] <= first["step"] or last["time"] <= first["time"]:
        return None
    per_step = (last["time"] - first["time"]) / (last["step"] - first["step"])
    return max(total_steps - int(last["step"]), 0) * per_step
