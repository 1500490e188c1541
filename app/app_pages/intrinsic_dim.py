"""Intrinsic dimension: d90 of parameter groups by random-subspace training, and the targets it recommends."""

import dataclasses
import time

import pandas as pd
import streamlit as st

from app import charts, forms, state
from core.backbone import BackboneSpec
from core.data import DataSpec
from core.experiment import MEASUREMENT_PRESETS, IntrinsicDimRequest, estimate_seconds
from core.intrinsic_dim import GROUP_SCHEMES, REPRESENTATION_ID_LABEL, IntrinsicDimConfig

JOB_KEY = "measurement"  # also the page address parameter that finds the job again after a reload
TRIAL_COLUMNS = ["group", "d", "accuracy", "kind", "target"]
CUSTOM = "custom"
PRESET_NOTES = {
    "quick": "see how d90 works: attention vs MLP, few short trials",
    "standard": "attention vs MLP with the default settings",
    "thorough": "each matrix type, longer trials",
}


def apply_preset() -> None:
    """Write the chosen preset into the page's widget keys (a callback: it runs before the widgets are drawn)."""
    request = MEASUREMENT_PRESETS[st.session_state["id.preset"]]
    data = request.data
    for key in ("name", "img_size", "normalization", "n_train", "n_val", "n_test"):
        st.session_state[f"id.data.{key}"] = getattr(data, key)
    st.session_state["id.scheme"] = request.groups if isinstance(request.groups, str) else CUSTOM
    for key, value in dataclasses.asdict(request.config).items():
        st.session_state[f"id.config.{key}"] = value


st.title("Intrinsic dimension")
st.write(
    "KAdaptation chooses the submodules to adapt by their local intrinsic dimension: train only d random directions "
    "of a group's weights (Li et al. 2018) and find d90, the smallest d reaching 90% of training the whole group. "
    "Groups with a low d90 adapt with few degrees of freedom."
)

if "id.preset" not in st.session_state:
    st.session_state["id.preset"] = "quick"
    apply_preset()
st.radio(
    "Preset",
    list(MEASUREMENT_PRESETS),
    key="id.preset",
    horizontal=True,
    on_change=apply_preset,
    format_func=lambda p: f"{p}: {PRESET_NOTES.get(p, '')}",
)
default = MEASUREMENT_PRESETS[st.session_state["id.preset"]]

st.subheader("Data")
data_values = forms.data_inputs("id.data", default.data)
with st.expander("Advanced: backbone, groups and measurement settings"):
    st.markdown("**Backbone**")
    backbone_values = forms.backbone_inputs("id.backbone")
    st.markdown("**Groups**")
    scheme = st.selectbox(
        "Groups to compare",
        [*GROUP_SCHEMES, CUSTOM],
        key="id.scheme",
        format_func=lambda s: f"{s}: {GROUP_SCHEMES[s]}" if s in GROUP_SCHEMES else "custom: targets strings",
    )
    groups: str | tuple[str, ...] = scheme
    if scheme == CUSTOM:
        text = st.text_input("Groups, separated by |", value="q,v | fc1,fc2", key="id.custom")
        groups = tuple(g.strip() for g in text.split("|") if g.strip())
    st.markdown("**Measurement settings**")
    config_values = forms.dataclass_form(IntrinsicDimConfig, key="id.config", defaults=default.config, columns=4)
    representation = st.checkbox(
        "Also estimate each block's representation dimension (one forward pass; a different quantity)", key="id.repr"
    )

request: IntrinsicDimRequest | None = None
try:
    request = IntrinsicDimRequest(
        data=DataSpec(**data_values),
        backbone=BackboneSpec(**backbone_values),
        groups=groups,
        config=IntrinsicDimConfig(**forms.coerce(IntrinsicDimConfig, config_values)),
        representation=representation,
    )
    trials, seconds = estimate_seconds(request)
    st.caption(
        f"Planned: up to {trials:,} trials of {request.config.steps:,} steps, after the head alone. Estimated "
        f"time on a 2-core CPU: up to about {forms.duration(seconds)} (the search often stops earlier; a GPU is "
        "much faster). The measured pace replaces this estimate once trials finish."
    )
except ValueError as exc:
    request = None
    st.error(str(exc))

if st.button("Measure", type="primary", key="id.start", disabled=request is None):
    try:
        st.session_state["id.selected"] = state.submit("intrinsic_dim", request)
        state.remember(JOB_KEY, st.session_state["id.selected"])
    except ValueError as exc:
        st.error(str(exc))

run_id, started_here = state.current_job("intrinsic_dim", JOB_KEY)
past = state.store().list_runs(kind="intrinsic_dim")
if len(past):
    st.divider()
    labels = {
        r["id"]: f"{r['id']}  {r['status']}  {r['dataset.name']}  groups "
        + forms.groups_text(r["method_options.groups"])
        for _, r in past.iterrows()
    }
    ids = list(labels)
    chosen = st.selectbox(
        "Measurement (every measurement is kept in the run store)",
        ids,
        index=ids.index(run_id) if run_id in ids else 0,
        format_func=labels.get,
        key="id.selected",
    )
    started_here = started_here and chosen == run_id
    run_id = chosen
else:
    run_id = None
if run_id is not None:
    live = state.store().get_run(run_id)["status"] in ("queued", "running")

    @st.fragment(run_every=1.5 if live else None)
    def progress_panel() -> None:
        """Shows the trials so far while the measurement runs; reruns the page once when it ends."""
        store = state.store()
        run = store.get_run(run_id)
        active = run["status"] in ("queued", "running")
        if active:
            result = run["result"] or {}
            trials = pd.DataFrame(result.get("trials", []), columns=TRIAL_COLUMNS)
            full = trials[trials["kind"] == "full"]
            if run["status"] == "queued":
                st.info(f"Measurement {run_id} is queued: number {store.queue_position(run_id)} for its resources.")
            else:
                st.progress(*trial_progress(result))
            targets = dict(zip(full["group"], full["target"], strict=True))
            st.plotly_chart(charts.intrinsic_dim_curves(trials, targets), key="id.live")
            asked = run["cancel_requested_at"] is not None
            if state.may_cancel(run, started_here) and st.button("Cancel", key="id.cancel", disabled=asked):
                status = store.request_cancel(run_id)
                st.toast("Cancelled." if status == "cancelled" else "Cancelling: it stops before its next step.")
            if asked:
                st.info("Cancel requested: the measurement stops before its next training step.")
        if live and not active:
            st.rerun(scope="app")

    def trial_progress(result: dict) -> tuple[float, str]:
        """(fraction, text) of a running measurement: trials done out of the planned most, and the time left at
        the pace so far."""
        done, planned = len(result.get("trials", [])), result.get("planned") or 0
        text = f"{done:,} of up to {planned:,} trials done" if planned else f"{done:,} trials done"
        started, trials = result.get("started"), result.get("trials", [])
        if planned and started and trials and "time" in trials[-1]:
            pace = (trials[-1]["time"] - started) / len(trials)
            text += f", at most about {forms.duration(pace * (planned - done))} left"
        elif started:
            text += f" ({forms.duration(time.time() - started)} so far: the head alone trains first)"
        return (min(done / planned, 1.0) if planned else 0.0), text

    progress_panel()

    run = state.store().get_run(run_id)
    result = run["result"] or {}
    if run["status"] not in ("queued", "running") and "groups" not in result:
        forms.show_failure(run["message"], prefix=f"Measurement {run_id} {run['status']}: ")
    elif "groups" in result:
        table = pd.DataFrame(result["groups"])
        unmeasured = list(table.loc[table["d90"].isna() & table["reason"].str.contains("cancelled"), "group"])
        if result["cancelled"]:
            st.warning(
                "The measurement was cancelled: the numbers below are partial. Not measured: "
                + (", ".join(unmeasured) if unmeasured else "none")
                + (
                    f". Its partial choice `{result['recommended']}` leaves those groups out, so it is not a "
                    "recommendation."
                    if result["recommended"]
                    else "."
                )
            )
        st.caption(result["backbone"])
        targets = dict(zip(table["group"], table["target"], strict=True))
        curves = pd.DataFrame(result["curves"])
        st.plotly_chart(charts.intrinsic_dim_curves(curves, targets, result["head_only_accuracy"]), key="id.curves")
        st.dataframe(table, hide_index=True, key="id.table")
        st.text(result["explanation"])
        for note in result["notes"]:
            st.caption(note)
        if result["recommended"] and not result["cancelled"]:
            st.success(f"Recommended targets: `{result['recommended']}`")
            data = run["dataset"]
            if st.button(f"Fine-tune with these targets (on {data['name']} at {data['img_size']} px)", key="id.use"):
                st.session_state["prefill_targets"] = {"targets": result["recommended"], "dataset": data}
                st.switch_page("app_pages/train.py")
        if result["representation"] is not None:
            with st.expander("Representation dimension per block (a different quantity)"):
                st.caption(REPRESENTATION_ID_LABEL)
                st.dataframe(pd.DataFrame(result["representation"]), hide_index=True, key="id.repr.table")
