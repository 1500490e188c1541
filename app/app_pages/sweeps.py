"""Sweeps: a grid of fine-tunes (methods x ranks x datasets x seeds) from a small form, its point count and time
estimate before it starts, its progress, and a way to the Pareto page. The points are Ray jobs (`core.sweeps`)."""

import dataclasses

import streamlit as st

from app import state
from core import methods, sweeps
from core.data import list_datasets

SWEEP_KEY = "sweep"  # also the page address parameter that finds the sweep again after a reload
PARETO_KEY = "pareto.sweep"  # the sweep the Pareto page is asked to show


def has_rank(method: str) -> bool:
    return "rank" in {f.name for f in dataclasses.fields(methods.get_method(method).config)}


st.title("Sweeps")
st.caption(
    "Every combination of the methods (at each rank, for those that have one), datasets and seeds is a fine-tune "
    "run tagged with the sweep's id. Points wait in the job queue and run one after another on a CPU machine; a "
    "sweep started again skips the points that have a result (`python -m core sweep resume SWEEP`)."
)

cells = st.columns([2, 1, 2, 1])
chosen = cells[0].multiselect("Methods", methods.list_methods(), default=["lora", "fact"], key="sw.methods")
ranks = cells[1].text_input("Ranks", "4,8", key="sw.ranks", help="for the methods with a rank, comma-separated")
datasets = cells[2].multiselect("Datasets", list_datasets(), default=["digits"], key="sw.datasets")
seeds = cells[3].text_input("Seeds", "0", key="sw.seeds", help="training seeds, comma-separated")
cells = st.columns(7)
data = {
    "img_size": cells[0].number_input("Image size", 14, 518, 56, step=14, key="sw.img_size"),
    "n_train": cells[1].number_input("Train images", 1, 100_000, 200, key="sw.n_train"),
    "n_val": cells[2].number_input("Validation images", 1, 100_000, 100, key="sw.n_val"),
    "n_test": cells[3].number_input("Test images", 1, 100_000, 200, key="sw.n_test"),
}
train = {
    "steps": cells[4].number_input("Steps", 1, 100_000, 50, key="sw.steps"),
    "batch_size": cells[5].number_input("Batch size", 1, 1024, 16, key="sw.batch_size"),
    "lr": cells[6].number_input("Learning rate", 1e-6, 1.0, 3e-3, format="%.0e", key="sw.lr"),
}
train |= {"eval_every": train["steps"], "warmup_steps": min(5, train["steps"] - 1)}
name = st.text_input("Name (optional)", key="sw.name").strip() or None

spec, points = None, []
try:
    flags = [f"{m}:rank={ranks}" if has_rank(m) else m for m in chosen]
    as_text = {k: str(v) for k, v in data.items()}, {k: str(v) for k, v in train.items()}
    spec = sweeps.spec_from_flags(flags, datasets, seeds, *as_text, name=name)
    points = sweeps.check_points(spec)
except ValueError as exc:
    st.error(str(exc))
if points:
    guess = sweeps.estimate(points, state.store())
    cells = st.columns(3)
    cells[0].metric("Points", len(points))
    cells[1].metric("Estimated time", f"{guess.total_s / 60:.1f} min")
    cells[2].metric("Jobs waiting now", len(state.waiting_jobs()))
    st.caption(f"One after another on one machine; {guess.basis}.")
if st.button("Start", type="primary", disabled=not points, key="sw.start"):
    started = sweeps.submit_sweep(spec, state.store().root)
    state.remember(SWEEP_KEY, started)
    st.session_state["sw.shown"] = started

store = state.store()
recorded = sweeps.list_sweeps(store.root)
mine = st.session_state.get(SWEEP_KEY) or st.query_params.get(SWEEP_KEY)
ids = [s.id for s in recorded]
if recorded:
    st.divider()
    active = [s.id for s in recorded if s.status == "running"]
    if st.session_state.get("sw.shown") not in ids:  # yours, else the newest running one, else the newest
        st.session_state["sw.shown"] = mine if mine in ids else (active[0] if active else ids[0])
    sweep_id = st.selectbox(
        "Sweep",
        ids,
        key="sw.shown",
        format_func=lambda i: f"{i} {next(s.name or '' for s in recorded if s.id == i)}" + " (yours)" * (i == mine),
    )
    live = sweeps.summarize(store, sweep_id).status == "running"

    @st.fragment(run_every=2.0 if live else None)
    def progress_panel() -> None:
        """Polls the run store; when the sweep ends, reruns the page once to stop polling."""
        summary = sweeps.summarize(store, sweep_id)
        st.progress(
            summary.finished / summary.points if summary.points else 1.0,
            text=f"{summary.status}: {summary.done} of {summary.points} points done, {summary.running} running, "
            f"{summary.queued} queued, {summary.failed} failed, {summary.cancelled} cancelled",
        )
        runs = store.list_runs(sweep_id=sweep_id)
        columns = ["id", "label", "status", "steps", "best_val_acc", "test_acc", "trainable_params", "wall_time_s"]
        st.dataframe(runs[[c for c in columns if c in runs]], hide_index=True, key="sw.points")
        if summary.not_submitted:
            st.caption(f"{summary.not_submitted} points not submitted (resume the sweep to submit them).")
        yours = summary.status == "running" and sweep_id == mine  # only the browser that started it cancels it
        if yours and st.button("Cancel the sweep", key="sw.cancel", disabled=summary.cancel_requested):
            counts = sweeps.cancel_sweep(sweep_id, store.root)
            st.toast(f"Cancelled {counts['cancelled']} queued points; {counts['stopping']} running ones stop.")
        if live and summary.status != "running":
            st.rerun(scope="app")

    progress_panel()
    if st.button("Open on the Pareto page", key="sw.pareto"):
        st.session_state[PARETO_KEY] = sweep_id
        st.switch_page("app_pages/pareto.py")
