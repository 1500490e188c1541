"""Fine-tune: data, backbone, method (a form generated from its config), training; runs in the background."""

import dataclasses

import streamlit as st

from app import charts, forms, state
from core import methods
from core.backbone import BackboneSpec
from core.data import DataSpec
from core.experiment import DEMO, Experiment
from core.train import TrainConfig

# CPU-friendly defaults: the CLI's demo, a few minutes on 2 cores with the offline default backbone.
DEFAULT_DATA, DEFAULT_TRAIN = DEMO.data, DEMO.train
JOB_KEY = "train.job"

st.title("Fine-tune")

# Targets recommended by the intrinsic-dimension page arrive here once.
prefill = st.session_state.pop("prefill_targets", None)
if prefill:
    chosen = st.session_state.get("ft.method")  # KAdaptation, whose paper selects this way, unless one is chosen
    if chosen is None or "targets" not in {f.name for f in dataclasses.fields(methods.get_method(chosen).config)}:
        st.session_state["ft.method"] = chosen = "kadaptation"
    st.session_state[f"ft.method.{chosen}.targets"] = prefill
    st.info(f"Targets `{prefill}` pre-filled from the intrinsic-dimension measurement (method {chosen}).")

st.subheader("Data")
data_values = forms.data_inputs("ft.data", DEFAULT_DATA)

st.subheader("Backbone")
backbone_values = forms.backbone_inputs("ft.backbone")

st.subheader("Method")
if "ft.method" not in st.session_state:
    st.session_state["ft.method"] = "fact"
method = st.selectbox(
    "Method", methods.list_methods(), key="ft.method", format_func=lambda n: f"{n}: {methods.get_method(n).summary}"
)
st.caption(methods.get_method(method).paper)
config_cls = methods.get_method(method).config
option_values = forms.dataclass_form(config_cls, key=f"ft.method.{method}")
options: dict | None = None
try:
    options = methods.make_config(method, **forms.coerce(config_cls, option_values)).to_dict()
    count, width = state.trainable_count(backbone_values["name"], data_values["img_size"], method, options)
    st.metric("Trainable parameters (without head)", f"{count:,}")
    st.caption(f"The classifier head adds C x ({width} + 1) for C classes; counted on a weightless copy.")
except ValueError as exc:
    options = None
    st.error(str(exc))

st.subheader("Training")
train_values = forms.dataclass_form(TrainConfig, key="ft.train", defaults=DEFAULT_TRAIN, columns=4)
label = st.text_input("Label (optional)", key="ft.label").strip() or None

if st.button("Start", type="primary", disabled=options is None, key="ft.start"):
    try:
        experiment = Experiment(
            data=DataSpec(**data_values),
            backbone=BackboneSpec(**backbone_values),
            method=method,
            options=options or {},
            train=TrainConfig(**forms.coerce(TrainConfig, train_values)),
            label=label,
        )
        st.session_state[JOB_KEY] = state.start_training(experiment).id  # checks the options first
    except ValueError as exc:
        st.error(str(exc))

job = state.current_job("train", JOB_KEY)
if job is not None:
    st.divider()
    live = job.active

    @st.fragment(run_every=1.0 if live else None)
    def progress_panel() -> None:
        """Polls the job and the run store; when the job ends, reruns the page once to stop polling."""
        current = state.job(job.id)
        assert current is not None
        st.subheader(f"Run: {current.title}")
        run = state.store().get_run(current.run_id) if current.run_id else None
        metrics = state.store().metrics(current.run_id) if current.run_id else None
        total = current.total or DEFAULT_TRAIN.steps
        st.progress(min(current.step / total, 1.0), text=f"{current.phase}: step {current.step} of {total}")
        loss = metrics[(metrics["split"] == "train") & (metrics["name"] == "loss")] if metrics is not None else None
        acc = metrics[(metrics["split"] == "val") & (metrics["name"] == "acc")] if metrics is not None else None
        cells = st.columns(4)
        cells[0].metric("Status", run["status"] if run else current.status)
        cells[1].metric("Latest train loss", f"{loss['value'].iloc[-1]:.4f}" if loss is not None and len(loss) else "-")
        cells[2].metric("Latest val accuracy", f"{acc['value'].iloc[-1]:.2f}%" if acc is not None and len(acc) else "-")
        cells[3].metric("Run id", current.run_id or "-")
        if metrics is not None:
            st.plotly_chart(charts.training_curves(metrics), key="ft.curves")
        if current.active:
            if st.button("Cancel", key="ft.cancel", disabled=current.token.cancelled):
                current.cancel()
                st.toast("Cancelling: the trainer stops before its next step.")
        elif current.error:
            st.error(current.error)
        elif run is not None:
            show = {"completed": st.success, "cancelled": st.warning}.get(run["status"], st.error)
            show(f"{run['status']}: {run['message']}")
        if live and not current.active:
            st.rerun(scope="app")

    progress_panel()
