"""Pareto: accuracy versus trainable parameters over completed runs, with the front and the papers' points."""

import streamlit as st

from app import charts, state
from core import methods
from core.pareto import combine_points, fronts_by_kind

ALL_RUNS = "every run (single runs and sweeps)"
TABLE = ["kind", "label", "method", "accuracy", "params", "params_convention", "ppt", "front", "backbone", "dataset",
         "source"]  # fmt: skip

st.title("Accuracy versus trainable parameters")
cells = st.columns(4)
benchmark = cells[0].selectbox("Reference benchmark", state.reference_benchmarks(), key="pareto.benchmark")
average = cells[1].radio(
    "Averaging",
    ["mean19", "groups"],
    key="pareto.average",
    format_func=lambda a: {"mean19": "mean over tasks (RLRR)", "groups": "mean of group means (FacT)"}[a],
)
head = cells[2].radio(
    "Parameter count", ["without", "with"], key="pareto.head", format_func=lambda h: f"{h} the classifier head"
)
show_refs = cells[3].checkbox("Show the papers' points", value=True, key="pareto.refs")
name_refs = cells[3].checkbox(
    "Name the papers' points", value=False, key="pareto.names", help="their names overlap in dense clusters: hover"
)

refs = state.references(benchmark, average, head) if show_refs else None
if refs is not None:
    backbones = ", ".join(sorted(refs["backbone"].dropna().unique()))
    st.warning(
        f"The papers' points are averages over **{benchmark}** tasks on **{backbones}**, not results on your dataset "
        "or backbone: read them as the shape of the trade-off, not as accuracies to match. Points marked * use the "
        "AugReg-pretrained ViT-B/16, a different starting point from the IN-21k rows."
    )

runs = state.store().list_runs(status="completed")
# A sweep opened from the Sweeps page arrives as this widget's value ("Open on the Pareto page").
sweep_ids = sorted(runs["sweep_id"].dropna().unique(), reverse=True) if "sweep_id" in runs else []
if st.session_state.get("pareto.sweep") not in [ALL_RUNS, *sweep_ids]:
    st.session_state["pareto.sweep"] = ALL_RUNS  # a sweep with no completed point yet, or none asked for
sweep = st.selectbox("Your runs from", [ALL_RUNS, *sweep_ids], key="pareto.sweep")
if sweep != ALL_RUNS:
    runs = runs[runs["sweep_id"] == sweep]
datasets = sorted(runs["dataset.name"].dropna().unique()) if "dataset.name" in runs else []
if datasets:
    chosen = st.multiselect("Your runs on", datasets, default=datasets, key="pareto.datasets")
    runs = runs[runs["dataset.name"].isin(chosen)]
else:
    st.info("No completed run yet: your runs appear here once they complete (accuracy = test accuracy).")

points = combine_points(runs, refs, prefer=head)
points["front"] = fronts_by_kind(points)  # your dataset and the benchmark are different tasks

colors = charts.method_colors(methods.list_methods())
st.plotly_chart(charts.pareto(points, colors, label_references=name_refs), key="pareto.chart")
st.caption(
    "PPT (V-PETL Bench) = accuracy / 100 x exp(-log10(params / 1e7 + 1)): higher is a better trade-off. Parameter "
    f"counts {head} the head where the source gives that count, else the other (see params_convention)."
)
table = points[[c for c in TABLE if c in points.columns]].sort_values(["kind", "ppt"], ascending=[False, False])
st.dataframe(
    table,
    hide_index=True,
    key="pareto.table",
    column_config={
        "params": st.column_config.NumberColumn(format="localized"),
        "accuracy": st.column_config.NumberColumn(format="%.2f"),
        "ppt": st.column_config.NumberColumn(format="%.3f"),
    },
)
