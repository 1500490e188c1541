"""Fine-tune: data, backbone, method (a form generated from its config), training; runs in the background."""

import dataclasses

import streamlit as st

from app import charts, forms, state, uploads
from core import methods
from core.backbone import BackboneSpec
from core.data import DataSpec
from core.experiment import DEMO, PRESETS, Experiment
from core.train import TrainConfig

# CPU-friendly defaults: the CLI's demo, a few minutes on 2 cores with the offline default backbone.
DEFAULT_DATA, DEFAULT_TRAIN = DEMO.data, DEMO.train
JOB_KEY = state.FINETUNE_KEY  # also the page address parameter that finds the job again after a reload
PRESET_NOTES = {"classroom": "about a minute on a 2-core laptop", "demo": "a few minutes on a 2-core laptop"}


def fill_form(experiment: Experiment) -> None:
    """Write an experiment into the form's widget keys (a button callback: it runs before the widgets)."""
    data = experiment.data
    values = {f"ft.data.{k}": getattr(data, k) for k in ("img_size", "normalization", "n_train", "n_val", "n_test")}
    values |= {"ft.data.name": data.name, "ft.method": experiment.method, "ft.label": experiment.label or ""}
    values |= {f"ft.train.{k}": v for k, v in experiment.train.to_dict().items()}
    values |= {f"ft.method.{experiment.method}.{k}": v for k, v in experiment.options.items()}
    for key, value in values.items():
        st.session_state[key] = "" if value is None and key.startswith("ft.train.") else value


st.title("Fine-tune")

# Targets recommended by the intrinsic-dimension page arrive here once, with the data they were measured on.
prefill = st.session_state.pop("prefill_targets", None)
if prefill:
    chosen = st.session_state.get("ft.method")  # KAdaptation, whose paper selects this way, unless one is chosen
    if chosen is None or "targets" not in {f.name for f in dataclasses.fields(methods.get_method(chosen).config)}:
        st.session_state["ft.method"] = chosen = "kadaptation"
    st.session_state[f"ft.method.{chosen}.targets"] = prefill["targets"]
    for key in ("name", "img_size", "normalization"):
        st.session_state[f"ft.data.{key}"] = prefill["dataset"][key]
    st.info(
        f"Targets `{prefill['targets']}` pre-filled from the intrinsic-dimension measurement (method {chosen}), "
        f"with its data: {prefill['dataset']['name']} at {prefill['dataset']['img_size']} px."
    )

with st.container(border=True):
    st.markdown("**Presets**: fill the form with a known-good run, or start the classroom demo in one click.")
    cells = st.columns([2, 1, 2])
    preset = cells[0].selectbox(
        "Preset", list(PRESETS), key="ft.preset", format_func=lambda p: f"{p} ({PRESET_NOTES.get(p, '')})"
    )
    cells[1].button("Fill the form", key="ft.fill", on_click=fill_form, args=(PRESETS[preset],))
    demo_method = st.session_state.get("ft.method", "fact")
    if cells[2].button(f"Run the classroom demo ({demo_method})", type="primary", key="ft.classroom"):
        try:
            state.start_classroom(demo_method)
        except ValueError as exc:
            st.error(str(exc))

st.subheader("Data")
uploads.upload_section("ft.data")  # before the data picker, which it sets to the dataset it unpacks
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

waiting = state.waiting_jobs()
start_label = f"Start (queues behind {len(waiting)} job{'s' * (len(waiting) != 1)})" if len(waiting) else "Start"
if st.button(start_label, type="primary", disabled=options is None, key="ft.start"):
    try:
        experiment = Experiment(
            data=DataSpec(**data_values),
            backbone=BackboneSpec(**backbone_values),
            method=method,
            options=options or {},
            train=TrainConfig(**forms.coerce(TrainConfig, train_values)),
            label=label,
        )
        state.remember(JOB_KEY, state.submit("finetune", experiment))  # checks the options first
    except ValueError as exc:
        st.error(str(exc))

run_id, started_here = state.current_job("finetune", JOB_KEY)
if run_id is not None:
    if started_here:
        st.query_params[JOB_KEY] = run_id  # a job started on another page (Learn) is found again after a reload
    st.divider()
    live = state.store().get_run(run_id)["status"] in ("queued", "running")

    @st.fragment(run_every=1.0 if live else None)
    def progress_panel() -> None:
        """Polls the run store; when the job ends, reruns the page once to stop polling."""
        store = state.store()
        run = store.get_run(run_id)
        metrics = store.metrics(run_id)
        total = run["train_config"]["steps"]
        st.subheader(f"{run['label'] or run['method']} on {run['dataset']['name']}")
        st.caption(f"Run `{run_id}`: {run['method']} ({forms.options_text(run['method_options'])})")
        left = state.time_left(metrics, total) if run["status"] == "running" else None
        if run["status"] == "queued":
            st.info(
                f"Queued: number {store.queue_position(run_id)} in the queue for its resources; it starts when the "
                "jobs ahead of it finish."
            )
        else:
            where = f" on {run['hostname']}" if run["status"] == "running" else ""
            eta = f", about {forms.duration(left)} left" if left is not None else ""
            st.progress(
                min((run["steps"] or 0) / total, 1.0),
                text=f"{run['status']}{where}: step {run['steps'] or 0:,} of {total:,}{eta}",
            )
        loss = metrics[(metrics["split"] == "train") & (metrics["name"] == "loss")]
        acc = metrics[(metrics["split"] == "val") & (metrics["name"] == "acc")]
        cells = st.columns(4)
        cells[0].metric("Status", run["status"])
        cells[1].metric("Latest train loss", f"{loss['value'].iloc[-1]:.4f}" if len(loss) else "-")
        cells[2].metric("Latest val accuracy", f"{acc['value'].iloc[-1]:.2f}%" if len(acc) else "-")
        if run["status"] == "completed" and run["test_acc"] is not None:
            cells[3].metric("Test accuracy", f"{run['test_acc']:.2f}%")
        else:
            cells[3].metric("Time left", forms.duration(left) if left is not None else "-")
        if len(metrics):
            st.plotly_chart(charts.training_curves(metrics), key="ft.curves")
        active = run["status"] in ("queued", "running")
        uploads.skipped_files(run)
        if active and state.may_cancel(run, started_here):
            asked = run["cancel_requested_at"] is not None
            if st.button("Cancel", key="ft.cancel", disabled=asked):
                status = store.request_cancel(run_id)
                st.session_state["ft.cancelled"] = run_id
                st.toast(
                    "Cancelled." if status == "cancelled" else "Cancelling: the trainer stops before its next step."
                )
            if asked:
                st.info("Cancel requested: the trainer stops before its next step.")
        elif not active:
            show_outcome(run)
        if live and not active:
            st.rerun(scope="app")

    def show_outcome(run: dict) -> None:
        """How the run ended, in words: finished, cancelled (by whom and when), or why it failed."""
        total = run["train_config"]["steps"]
        if run["status"] == "completed":
            st.success(f"Completed: {run['message']}")
        elif run["status"] == "cancelled":
            who = "You cancelled it" if st.session_state.get("ft.cancelled") == run["id"] else "Cancelled"
            st.warning(f"{who} after {run['steps'] or 0:,} of {total:,} steps: {run['message']}")
        else:
            forms.show_failure(run["message"], prefix=f"{run['status'].capitalize()}: ")

    progress_panel()
