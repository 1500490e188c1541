"""Spectra: what a completed run did to each adapted weight matrix, seen through its singular values."""

import streamlit as st

from app import charts, forms, state

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

st.title("Spectra")
st.write(
    "Singular values of each adapted matrix before (W0) and after (W0 + dW) fine-tuning, of the update dW itself, "
    "the rotation of the top singular subspaces and intruder dimensions (Shuttleworth et al. 2024)."
)
store = state.store()
runs = store.list_runs(status="completed")
if runs.empty:
    st.info("No completed run yet: the spectra compare a run's tuned weights with its pretrained ones.")
    st.stop()

labels = forms.run_labels(runs, with_status=False)
run_id = st.selectbox("Completed run", list(labels), format_func=labels.get, key="spectra.run")
cells = st.columns(3)
k = int(cells[0].number_input("Top-k subspace size", min_value=1, max_value=256, value=10, key="spectra.k"))
threshold = cells[1].number_input("Intruder cosine threshold", 0.05, 0.95, 0.5, step=0.05, key="spectra.eps")
with_vectors = cells[2].checkbox("Singular vectors (angles, intruders)", value=True, key="spectra.vectors")

run = store.get_run(run_id)
try:
    with st.spinner("Rebuilding the run's model and decomposing every adapted matrix..."):
        report = state.spectra(str(store.root), run_id, k, float(threshold), with_vectors)
except ValueError as exc:
    st.error(str(exc))
    st.stop()
if report is None:
    st.info(
        f"{run['method']} makes no weight update to analyse: it trains prompts, a bottleneck module, biases or the "
        "head only. Pick a run of FacT, RLRR, KAdaptation, LoRA, SSF or full fine-tuning."
    )
    st.stop()

st.caption(f"{run['method']} {run['method_options']}: {len(report.summary)} adapted matrices, k = {report.k}.")
available = [m for m in METRICS if with_vectors or m not in NEEDS_VECTORS]
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
