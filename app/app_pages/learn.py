"""Learn: one method at a time: what it changes (formulas), what it trains (its count, live), where the papers put it,
what it should do to the spectrum, and a one-click classroom demo."""

import streamlit as st

from app import charts, forms, state
from core import methods
from core.backbone import BackboneSpec, skeleton
from core.experiment import CLASSROOM, count_params, native_img_size
from core.methods import explain
from core.pareto import combine_points, fronts_by_kind

SHAPES = ["vit_small_patch14_dinov2", "vit_tiny_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"]
EXCLUDE = ("targets",)  # the default targets are what the formulas show; the Fine-tune page has every option

st.title("Learn")
st.write(
    "One method at a time: the weights it changes, written as the papers do; how many parameters it trains on a "
    "backbone you choose; where the papers put it on the accuracy / parameters plot; and what it should do to the "
    "singular values of the weights. Then run it."
)

names = methods.list_methods()
method = st.selectbox(
    "Method", names, key="learn.method", format_func=lambda n: f"{n}: {methods.get_method(n).summary}"
)
entry, registered = explain.explain(method), methods.get_method(method)

st.header(entry.title)
st.caption(registered.paper)
st.markdown(entry.changes)

st.subheader("Try it")
demo = dict(CLASSROOM.data.to_dict())
st.write(
    f"The classroom demo trains {method} on `{demo['name']}` at {demo['img_size']} px for "
    f"{CLASSROOM.train.steps} steps on the offline backbone: about a minute on a 2-core laptop."
)
left, right = st.columns(2)
if left.button(f"Run the {method} classroom demo", type="primary", key="learn.demo"):
    try:
        state.start_classroom(method)
    except ValueError as exc:
        st.error(str(exc))
    else:
        st.switch_page("app_pages/train.py")
if right.button("Compare FacT vs LoRA (two demos, side by side)", key="learn.compare"):
    state.start_comparison("fact", "lora")
    st.switch_page("app_pages/spectra.py")

st.subheader("What it changes")
for line in entry.update:
    st.latex(line)

st.subheader("What it trains")
st.latex(entry.count)
cells = st.columns(2)
shape = cells[0].selectbox("Backbone shape", SHAPES, key="learn.backbone")
classes = int(cells[1].number_input("Classes (for the head)", min_value=2, max_value=100_000, value=100))
options = forms.dataclass_form(registered.config, key=f"learn.{method}", exclude=EXCLUDE)
try:
    options = forms.coerce(registered.config, options)
    spec = BackboneSpec(name=shape, weights="none", img_size=native_img_size(shape), num_classes=classes)
    closed = explain.closed_form(method, skeleton(spec), options)
    count = count_params(spec, method, options)
except ValueError as exc:
    st.error(str(exc))
else:
    st.latex(closed.worked)
    cells = st.columns(3)
    cells[0].metric("Trainable (no head)", f"{count.without_head:,}")
    cells[1].metric("With the head", f"{count.with_head:,}")
    share = count.without_head / max(count_params(spec, "full").without_head, 1)
    cells[2].metric("Share of the backbone", f"{share:.3%}")
    if closed.value == count.without_head:
        st.caption(
            f"The formula agrees with the code's count on a weightless {shape} "
            f"({forms.options_text(count.options)}); the head adds C x (d + 1) = {classes:,} x ({count.width:,} + 1)."
        )
    else:
        st.warning(f"The formula gives {closed.value:,} but the code trains {count.without_head:,}: please report.")

st.subheader("Where the papers put it")
refs = None
for benchmark in state.reference_benchmarks() if entry.references else []:
    points = state.references(benchmark, "mean19", "without")
    if points["method"].isin(entry.references).any():
        refs = points
        break
if refs is None:
    st.info(f"The papers' shipped results have no row for {method}.")
else:
    runs = state.store().list_runs(status="completed", method=method)
    points = combine_points(runs, refs)
    points["front"] = fronts_by_kind(points)
    st.plotly_chart(charts.pareto(points, charts.method_colors(names), highlight=entry.references), key="learn.pareto")
    st.caption(
        f"{benchmark}: the papers' averages over its tasks (mean over tasks, parameters without the head where "
        f"given), not results on your data; {method}'s rows are the large filled diamonds"
        + (", your completed runs of it the circles." if len(runs) else ".")
    )

st.subheader("What it should do to the spectrum")
st.markdown(entry.spectrum)
st.caption("Run it, then open the Spectra page: it compares the tuned weights with the pretrained ones.")
