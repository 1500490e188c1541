"""Spectra: what a completed run did to each adapted weight matrix, seen through its singular values."""

import streamlit as st

from app import charts, forms, state
from core.spectra import SpectraReport

METRICS = {
    "update_fro_ratio": "||dW||_F / ||W0||_F: how large the update is",
    "rel_change_mean_abs": "mean relative change of the singular values",
    "rel_change_max_abs": "largest relative change of a singular value",
    "left_overlap": "overlap of the top-k output-side subspaces (1: unchanged)",
    "intruders": "intruder dimensions: new top singular vectors unlike any pretrained one",
    "update_effective_rank": "effective rank of the update (Roy & Vetterli)",
    "update_stable_rank": "stable rank of the update",
    "right_overlap": "overlap of the top-k input-side subspaces",
}
NEEDS_VECTORS = {"left_overlap", "right_overlap", "intruders"}

MODES = {"one": "one run, and how it got there", "compare": "two runs side by side"}


def report_of(run_id: str, k: int, threshold: float, with_vectors: bool) -> SpectraReport | None:
    """The run's spectra report, or None with a note when its method makes no weight update; stops on an error."""
    try:
        with st.spinner("Rebuilding the run's model and decomposing every adapted matrix..."):
            report = state.spectra(str(store.root), run_id, k, float(threshold), with_vectors)
    except ValueError as exc:
        st.error(str(exc))
        st.stop()
    if report is None:
        run = store.get_run(run_id)
        st.info(
            f"{run['method']} makes no weight update to analyse: it trains prompts, a bottleneck module, biases or "
            "the head only. Pick a run of FacT, RLRR, KAdaptation, LoRA, SSF or full fine-tuning."
        )
    return report


def describe(run_id: str) -> str:
    run = store.get_run(run_id)
    acc = f", test accuracy {run['test_acc']:.2f}%" if run["test_acc"] is not None else ""
    count = f", {run['trainable_params']:,} trainable" if run["trainable_params"] is not None else ""
    return f"`{run_id}`: {run['method']} ({forms.options_text(run['method_options'])}){count}{acc}"


st.title("Spectra")
st.write(
    "Singular values of each adapted matrix before (W0) and after (W0 + dW) fine-tuning, of the update dW itself, "
    "the rotation of the top singular subspaces and intruder dimensions (Shuttleworth et al. 2024)."
)
store = state.store()
pair = state.comparison()
if "spectra.mode" not in st.session_state:
    st.session_state["spectra.mode"] = "compare" if pair else "one"
mode = st.radio("View", list(MODES), key="spectra.mode", horizontal=True, format_func=MODES.get)

if mode == "compare" and pair is not None:
    waiting = [r for r in pair if store.get_run(r)["status"] in ("queued", "running")]
    if waiting:

        @st.fragment(run_every=1.5)
        def comparison_progress() -> None:
            """The two demos' progress; the page reruns once both have ended."""
            for run_id in pair:
                run = store.get_run(run_id)
                total = run["train_config"]["steps"]
                left = state.time_left(store.metrics(run_id), total) if run["status"] == "running" else None
                eta = f", about {forms.duration(left)} left" if left is not None else ""
                st.progress(
                    min((run["steps"] or 0) / total, 1.0),
                    text=f"{run['method']} `{run_id}`: {run['status']}, step {run['steps'] or 0:,} of {total:,}{eta}",
                )
            if all(store.get_run(r)["status"] not in ("queued", "running") for r in pair):
                st.rerun(scope="app")

        st.info("Training the two runs to compare: they run one after the other, and show here when both are done.")
        comparison_progress()
        st.stop()

runs = store.list_runs(status="completed")
if runs.empty:
    st.info("No completed run yet: the spectra compare a run's tuned weights with its pretrained ones.")
    st.stop()
labels = forms.run_labels(runs, with_status=False)
ids = list(labels)
cells = st.columns(3)
k = int(cells[0].number_input("Top-k subspace size", min_value=1, max_value=256, value=10, key="spectra.k"))
threshold = cells[1].number_input("Intruder cosine threshold", 0.05, 0.95, 0.5, step=0.05, key="spectra.eps")
with_vectors = cells[2].checkbox("Singular vectors (angles, intruders)", value=True, key="spectra.vectors")
available = [m for m in METRICS if with_vectors or m not in NEEDS_VECTORS]

if mode == "compare":
    for side, default in zip(("left", "right"), pair or (ids[0], ids[min(1, len(ids) - 1)]), strict=True):
        if f"spectra.{side}" not in st.session_state and default in ids:
            st.session_state[f"spectra.{side}"] = default
    cells = st.columns(2)
    chosen = [
        cells[i].selectbox(f"{side.capitalize()} run", ids, format_func=labels.get, key=f"spectra.{side}")
        for i, side in enumerate(("left", "right"))
    ]
    reports = [report_of(run_id, k, threshold, with_vectors) for run_id in chosen]
    if any(r is None for r in reports):
        st.stop()
    metric = st.selectbox("Metric", available, format_func=lambda m: f"{m}: {METRICS[m]}", key="spectra.metric")
    zrange = charts.metric_range([r.summary for r in reports], metric)
    names = [n for n in reports[0].summary["name"] if n in set(reports[1].summary["name"])]
    names = names or list(reports[0].summary["name"])
    name = st.selectbox("Matrix (adapted in both runs first)", names, key="spectra.compare.matrix")
    log_range = charts.value_range([r.values[r.values["name"] == name] for r in reports])
    for cell, run_id, report, side in zip(st.columns(2), chosen, reports, ("left", "right"), strict=True):
        with cell:
            st.markdown(describe(run_id))
            st.plotly_chart(charts.spectra_heatmap(report.summary, metric, zrange), key=f"spectra.{side}.heatmap")
            if name in set(report.summary["name"]):
                st.plotly_chart(charts.singular_values(report.values, name, log_range), key=f"spectra.{side}.values")
            else:
                st.info(f"This run does not adapt {name}.")
    st.caption("Both sides share one colour scale and one y scale, so sizes compare directly.")
    st.stop()

run_id = st.selectbox("Completed run", ids, format_func=labels.get, key="spectra.run")
report = report_of(run_id, k, threshold, with_vectors)
if report is None:
    st.stop()

st.caption(f"{describe(run_id)}: {len(report.summary):,} adapted matrices, k = {report.k}.")
metric = st.selectbox("Metric", available, format_func=lambda m: f"{m}: {METRICS[m]}", key="spectra.metric")
st.plotly_chart(charts.spectra_heatmap(report.summary, metric), key="spectra.heatmap")
with st.expander("Per-matrix summary"):
    st.dataframe(report.summary, hide_index=True, key="spectra.summary")

name = st.selectbox("Matrix", list(report.summary["name"]), key="spectra.matrix")
st.plotly_chart(charts.singular_values(report.values, name), key="spectra.values")
st.markdown("**Singular-value shifts**: the relative change of each pretrained singular value")
st.plotly_chart(charts.relative_changes(report.changes, name), key="spectra.changes")
if with_vectors:
    st.markdown("**Principal angles** between the pretrained and tuned top-k singular subspaces")
    st.plotly_chart(charts.principal_angles(report.angles, name), key="spectra.angles")
    st.markdown(f"**Intruder dimensions** (max |cos| with every pretrained vector below {report.intruder_threshold})")
    intruders = report.intruders[report.intruders["is_intruder"]]
    if intruders.empty:
        st.write("None: every top-k tuned singular vector resembles a pretrained one.")
    else:
        st.dataframe(intruders, hide_index=True, key="spectra.intruders")

st.subheader("Over training")
with st.spinner("Decomposing the adapter snapshots kept during training..."):
    snapshots = state.snapshot_spectra(str(store.root), run_id)
if len(snapshots) < 2:
    st.info(
        "This run kept no snapshots during training (runs from before snapshots existed, and methods without a "
        "small weight update, keep none)."
    )
    st.stop()
steps = list(snapshots)
step = st.select_slider(
    "Training step", steps, value=steps[-1], key="spectra.step", format_func=lambda s: f"step {s:,}"
)
st.caption(
    f"The adapter as it was after step {step:,} (snapshots at step 0 and at every validation point; the final "
    "adapter above is the one with the best validation accuracy). Scales stay fixed while you step."
)
summaries = {s: r.summary for s, r in snapshots.items()}
cells = st.columns(2)
zrange = charts.metric_range(list(summaries.values()), "update_fro_ratio")
cells[0].plotly_chart(
    charts.spectra_heatmap(snapshots[step].summary, "update_fro_ratio", zrange), key="spectra.step.heatmap"
)
cells[1].plotly_chart(charts.update_size_over_training(summaries, step), key="spectra.step.sizes")
if name in set(snapshots[step].summary["name"]):
    log_range = charts.value_range([r.values[r.values["name"] == name] for r in snapshots.values()])
    st.plotly_chart(charts.singular_values(snapshots[step].values, name, log_range), key="spectra.step.values")
