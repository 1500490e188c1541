"""Runs: every recorded fine-tune, one run's record and curves, delete and export."""

import streamlit as st

from app import charts, forms, state, uploads

COLUMNS = [
    "id", "status", "label", "method", "dataset.name", "backbone.name", "trainable_params", "best_val_acc", "test_acc",
    "steps", "wall_time_s", "created_at",
]  # fmt: skip

st.title("Runs")
store = state.store()
runs = store.list_runs()
st.caption(f"Run store: `{store.root}` (set `PETLAB_HOME` to use another folder).")
if runs.empty:
    st.info("No runs recorded yet: start one on the Fine-tune page (or with `python -m core train`).")
    st.stop()

st.dataframe(
    runs[[c for c in COLUMNS if c in runs.columns]],
    hide_index=True,
    key="runs.table",
    column_config={
        "trainable_params": st.column_config.NumberColumn(format="localized"),
        "steps": st.column_config.NumberColumn(format="localized"),
    },
)
st.download_button("Export all runs as CSV", state.export_csv(store), file_name="petlab_runs.csv", mime="text/csv")

labels = forms.run_labels(runs)
run_id = st.selectbox("Run", list(labels), format_func=labels.get, key="runs.selected")
run = store.get_run(run_id)

st.subheader(run["label"] or f"{run['method']} on {(run['dataset'] or {}).get('name', '?')}")
cells = st.columns(5)
cells[0].metric("Status", run["status"])
cells[1].metric("Test accuracy", f"{run['test_acc']:.2f}%" if run["test_acc"] is not None else "-")
cells[2].metric("Best val accuracy", f"{run['best_val_acc']:.2f}%" if run["best_val_acc"] is not None else "-")
cells[3].metric("Trainable (no head)", f"{run['trainable_params']:,}" if run["trainable_params"] is not None else "-")
cells[4].metric("Wall time", f"{run['wall_time_s']:.1f} s" if run["wall_time_s"] is not None else "-")
st.caption(f"{run['method']}: {forms.options_text(run['method_options'])}")
if run["status"] in ("failed", "interrupted"):
    forms.show_failure(run["message"], prefix=f"{run['status'].capitalize()}: ")
elif run["message"]:
    st.caption(run["message"])
uploads.skipped_files(run)
st.plotly_chart(charts.training_curves(store.metrics(run_id)), key="runs.curves")
with st.expander("Everything recorded for this run"):
    st.json(run)

if st.button("Delete this run", key="runs.delete", disabled=not state.owns(run)):
    st.session_state["runs.confirm"] = run_id
if st.session_state.get("runs.confirm") == run_id:
    st.warning(f"Delete run {run_id}, its metric history and its adapter file? This cannot be undone.")
    yes, no = st.columns(2)
    if yes.button("Yes, delete it", type="primary", key="runs.delete.yes"):
        del st.session_state["runs.confirm"]
        try:
            store.delete_run(run_id)
        except ValueError as exc:
            st.error(str(exc))
        else:
            st.rerun()
    if no.button("Keep it", key="runs.delete.no"):
        del st.session_state["runs.confirm"]
        st.rerun()
